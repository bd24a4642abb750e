"""The tracing layers (sidecar/layers/tracing.py): a SERVER span per inbound request, a
CLIENT span per outbound attempt, parents and children through the headers."""

from __future__ import annotations

import random

import trio

from sidecar.core import tracecontext
from sidecar.core.destination import DEFAULTS, Destinations
from sidecar.core.http1 import RequestHead
from sidecar.core.services import ServiceConfig
from sidecar.core.spans import Endpoint, Span
from sidecar.layers.base import Request, Response
from sidecar.layers.errors import errors_layer
from sidecar.layers.resilience import resilience_layer
from sidecar.layers.tracing import Tracer, client_tracing, server_tracing

from .test_resilience import A, B, C, Upstreams

CALLER_CLIENT_SPAN = "00f067aa0ba902b7"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = (b"traceparent", f"00-{TRACE}-{CALLER_CLIENT_SPAN}-01".encode())


def tracer(spans: list[Span], service: str, rate: float = 1.0) -> Tracer:
    return Tracer(service, Endpoint(service, "127.0.0.1", 15001), spans.append, sample_rate=rate, rng=random.Random(4))


def request(*headers: tuple[bytes, bytes], method: bytes = b"GET") -> Request:
    made = Request(RequestHead(method, b"/items/1?x=1", list(headers)), None, b"127.0.0.1")
    made.service = "item"
    return made


async def test_a_server_span_is_the_child_of_the_callers_client_span_and_the_parent_of_the_apps_calls() -> None:
    spans: list[Span] = []
    seen: list[tracecontext.TraceContext | None] = []

    async def app(req: Request) -> Response:
        req.source = "user"  # what the inbound filters learn from x-meshlet-source
        seen.append(tracecontext.extract(req.head.headers))
        given_headers.update(req.head.headers)
        return Response(200, b"OK", [])

    given_headers: dict[bytes, bytes] = {}
    handler = server_tracing(app, tracer(spans, "item"))
    response = await handler(request(INCOMING, (b"x-b3-traceid", b"1" * 32), (b"accept", b"*/*")))
    response.finish(True)
    (span,) = spans
    out = span.to_json()
    assert (out["traceId"], out["parentId"], out["kind"], out["name"]) == (
        TRACE,
        CALLER_CLIENT_SPAN,
        "SERVER",
        "get /items/1",
    )
    assert out["remoteEndpoint"] == {"serviceName": "user"} and out["tags"]["http.status_code"] == "200"
    (given,) = seen  # W3C names only the parent: the app's calls will be children of the SERVER span
    assert given is not None and (given.trace_id, given.span_id) == (TRACE, span.span_id)
    assert given_headers[b"x-b3-parentspanid"] == CALLER_CLIENT_SPAN.encode()  # B3 names the grandparent too
    assert given_headers[b"x-b3-traceid"] == TRACE.encode()  # the caller's stray B3 header was replaced


async def test_without_a_context_a_trace_starts_and_an_unsampled_one_is_passed_on_not_recorded() -> None:
    spans: list[Span] = []
    heads: list[list[tuple[bytes, bytes]]] = []

    async def app(req: Request) -> Response:
        heads.append(list(req.head.headers))
        return Response(200, b"OK", [])

    handler = server_tracing(app, tracer(spans, "gateway", rate=0.0))
    (await handler(request())).finish(True)
    assert spans == []
    context = tracecontext.extract(heads[0])
    assert context is not None and context.sampled is False and context.parent_id is None

    handler = server_tracing(app, tracer(spans, "gateway", rate=1.0))
    (await handler(request())).finish(True)
    (root,) = spans
    assert root.parent_id is None and root.kind == "SERVER"


async def test_each_attempt_is_a_client_span_and_the_next_hop_sees_its_id(autojump_clock: trio.abc.Clock) -> None:
    spans: list[Span] = []
    upstreams = Upstreams(A=503, B="refused")
    destinations = Destinations(random.Random(1))
    from dataclasses import replace

    destinations.configure(
        {"item": ServiceConfig("item", (A, B, C))},
        {("item", None): replace(DEFAULTS, load_balancer="round_robin")},
        {},
        trio.current_time(),
    )
    app_context = (b"traceparent", f"00-{TRACE}-{'5' * 16}-01".encode())  # the app passed on its SERVER span
    handler = errors_layer(resilience_layer(client_tracing(upstreams, tracer(spans, "user")), destinations))
    response = await handler(request(app_context))
    response.finish(True)
    assert response.status == 200
    assert [s.tags.get("meshlet.attempt") for s in spans] == ["1", "2", "3"]
    assert [s.tags.get("error") for s in spans] == ["503", "connect-failed", None]
    assert spans[0].tags["meshlet.complete"] == "false"  # given up for the retry
    assert {s.parent_id for s in spans} == {"5" * 16} and {s.trace_id for s in spans} == {TRACE}
    assert [s.remote.port for s in spans if s.remote] == [A.port, B.port, C.port]
    # what each upstream received names that attempt's CLIENT span as the parent
    received = [tracecontext.extract(list(headers.items())) for _, headers, _ in upstreams.calls]
    assert [c.span_id for c in received if c] == [s.span_id for s in spans]
    b3 = [headers[b"x-b3-parentspanid"] for _, headers, _ in upstreams.calls]
    assert b3 == [b"5" * 16] * 3  # B3 multi always carries the parent


async def test_with_nowhere_to_send_spans_no_trace_is_started_but_one_that_came_in_goes_on() -> None:
    heads: list[list[tuple[bytes, bytes]]] = []

    async def app(req: Request) -> Response:
        heads.append(list(req.head.headers))
        return Response(200, b"OK", [])

    quiet = Tracer("item", Endpoint("item"), lambda span: None, recording=False)
    handler = server_tracing(app, quiet)
    (await handler(request((b"accept", b"*/*")))).finish(True)
    assert heads[0] == [(b"accept", b"*/*")]  # untouched: no trace started
    (await handler(request(INCOMING))).finish(True)
    passed_on = tracecontext.extract(heads[1])
    assert passed_on is not None and passed_on.trace_id == TRACE and passed_on.span_id != CALLER_CLIENT_SPAN


async def test_a_context_that_came_in_unsampled_is_passed_on_untouched_both_ways() -> None:
    # Nothing of an unsampled trace is recorded, so the headers go on as they came (no new
    # span id to write): only the trace id and the decision matter downstream.
    spans: list[Span] = []
    unsampled = [
        (b"traceparent", f"00-{TRACE}-{CALLER_CLIENT_SPAN}-00".encode()),
        (b"X-B3-TraceId", TRACE.encode()),
        (b"X-B3-SpanId", CALLER_CLIENT_SPAN.encode()),
        (b"X-B3-Sampled", b"0"),
    ]
    heads: list[list[tuple[bytes, bytes]]] = []

    async def app(req: Request) -> Response:
        heads.append(list(req.head.headers))
        return Response(200, b"OK", [])

    for layer in (server_tracing, client_tracing):
        response = await layer(app, tracer(spans, "user", rate=1.0))(request(*unsampled))
        response.finish(True)
    assert heads == [unsampled, unsampled] and spans == []
    # debug overrides "not sampled": recorded, with a new span id
    debug = [(b"b3", f"{TRACE}-{CALLER_CLIENT_SPAN}-d".encode())]
    (await server_tracing(app, tracer(spans, "user"))(request(*debug))).finish(True)
    (span,) = spans
    assert span.parent_id == CALLER_CLIENT_SPAN and heads[-1] != debug
