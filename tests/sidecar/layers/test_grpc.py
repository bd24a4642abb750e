"""gRPC calls on the request path (sidecar/layers/grpc.py and its hooks in the attempts, the
inbound side, the metrics and the spans), with scripted upstreams on trio's fake clock: the
deadline from grpc-timeout and the reduced one passed on, the mesh's errors as
Trailers-Only answers, retries and the breaker by gRPC status, the grpc_status label and
the rpc.* span tags."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest
import trio

from meshlet.grpc import Status
from sidecar.core import errors
from sidecar.core.breaker import BreakerConfig
from sidecar.core.destination import DEFAULTS, Destinations, Settings
from sidecar.core.errors import MeshError
from sidecar.core.grpc import parse_timeout
from sidecar.core.http1 import RequestHead
from sidecar.core.outcome import Outcome, RetryOn
from sidecar.core.services import Endpoint, ServiceConfig
from sidecar.core.spans import Endpoint as SpanEndpoint
from sidecar.core.spans import Span
from sidecar.layers.base import Handler, Request, Response, filters_layer
from sidecar.layers.errors import errors_layer
from sidecar.layers.inbound import to_local_app
from sidecar.layers.metrics import metrics_layer
from sidecar.layers.resilience import resilience_layer
from sidecar.layers.tracing import Tracer, client_tracing, server_tracing
from sidecar.telemetry import Telemetry

from .test_resilience import A, B, Body, C, Upstreams

GRPC = (b"content-type", b"application/grpc")
PATH = b"/shop.Items/Get"


def trailers_only(status: int) -> tuple[int, list[tuple[bytes, bytes]]]:
    """An upstream's Trailers-Only answer, for Upstreams' script."""
    return 200, [GRPC, (b"grpc-status", b"%d" % status), (b"grpc-message", b"from%20the%20app")]


class Streamed:
    """An upstream answer whose gRPC status comes in its trailers (set as its body ends)."""

    def __init__(self, status: int) -> None:
        self.status = status


streamed = Streamed


class GrpcUpstreams(Upstreams):
    """Upstreams that answer gRPC (OK in the trailers) unless scripted otherwise."""

    def __init__(self, **script: object) -> None:
        super().__init__(**{"A": Streamed(Status.OK), "B": Streamed(Status.OK), "C": Streamed(Status.OK), **script})

    async def __call__(self, request: Request) -> Response:
        assert request.endpoint is not None
        what = self.script[request.endpoint]
        if not isinstance(what, Streamed):
            return await super().__call__(request)
        body = b""
        if request.body is not None:
            while (piece := await request.body.read()) is not None:
                body += piece
        self.calls.append((request.endpoint, dict(request.head.headers), body))
        response = Response(200, b"OK", [GRPC])
        response.framing = "chunked"
        response.trailers = [(b"grpc-status", b"%d" % what.status)]
        response.on_finish = self.finished.append
        return response


grpc_upstreams = GrpcUpstreams


def grpc_request(*headers: tuple[bytes, bytes], body: Body | None = None, version: str = "2") -> Request:
    head = RequestHead(b"POST", PATH, [GRPC, *headers], http_version=version)
    request = Request(head, Body(b"\0\0\0\0\0") if body is None else body, b"127.0.0.1")
    request.service = "item"
    return request


def outbound(
    upstreams: Handler,
    settings: Settings = DEFAULTS,
    endpoints: tuple[Endpoint, ...] = (A, B, C),
    telemetry: Telemetry | None = None,
) -> tuple[Handler, Destinations]:
    destinations = Destinations(random.Random(1))
    destinations.configure(
        {"item": ServiceConfig("item", endpoints)},
        {("item", None): replace(settings, load_balancer="round_robin")},
        {},
        trio.current_time(),
    )
    handler = errors_layer(
        resilience_layer(upstreams, destinations, rng=random.Random(2), timer=trio.current_time),
    )
    if telemetry is not None:
        handler = metrics_layer(handler, telemetry, "outbound", "user")
    return handler, destinations


RETRYING = replace(DEFAULTS, non_idempotent=True)  # gRPC calls are POSTs: retried only when allowed


def status_of(response: Response) -> int:
    return int(dict(response.headers)[b"grpc-status"])


# --- the deadline -------------------------------------------------------------------------


async def test_grpc_timeout_is_the_deadline_and_the_caller_gets_deadline_exceeded(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstreams = grpc_upstreams(A="hang", B="hang", C="hang")
    handler, _ = outbound(upstreams)
    start = trio.current_time()
    response = await handler(grpc_request((b"grpc-timeout", b"2S")))
    assert trio.current_time() - start == pytest.approx(2.0)  # not the 15 s of the policy
    assert response.status == 200 and status_of(response) == Status.DEADLINE_EXCEEDED
    assert response.mesh_error == "timeout" and dict(response.headers)[b"x-meshlet-error"] == b"timeout"
    assert len(upstreams.calls) == 1


@pytest.mark.parametrize(
    ("sent", "policy_timeout", "passed_on"),
    [
        (b"3S", 15.0, b"3S"),  # the caller's deadline, to the nanosecond (no time went by)
        (b"1H", 2.0, b"2S"),  # the policy's timeout is shorter: the app hears of that one
        (b"1500m", 15.0, b"1500m"),
        (None, 15.0, None),  # no grpc-timeout: none is made up
    ],
)
async def test_the_deadline_passed_on_is_the_smaller(
    sent: bytes | None, policy_timeout: float, passed_on: bytes | None, autojump_clock: trio.abc.Clock
) -> None:
    upstreams = grpc_upstreams()
    handler, _ = outbound(upstreams, replace(DEFAULTS, timeout=policy_timeout))
    headers = () if sent is None else ((b"grpc-timeout", sent),)
    await handler(grpc_request(*headers))
    ((_, seen, _),) = upstreams.calls
    assert seen.get(b"grpc-timeout") == passed_on


async def test_each_attempt_passes_on_the_time_left(autojump_clock: trio.abc.Clock) -> None:
    upstreams = grpc_upstreams(A=trailers_only(Status.UNAVAILABLE))
    gate_time = 0.7

    async def late_upstream(request: Request) -> Response:
        await trio.sleep(gate_time)  # time spent by this attempt before it is answered
        return await upstreams(request)

    handler, _ = outbound(late_upstream, RETRYING)
    response = await handler(grpc_request((b"grpc-timeout", b"3S")))
    assert response.status == 200 and b"grpc-status" not in dict(response.headers)  # B's own answer
    (_, first, _), (_, second, _) = upstreams.calls
    assert first[b"grpc-timeout"] == b"3S"
    left = parse_timeout(second[b"grpc-timeout"])  # 3 s less the first attempt and the backoff
    assert 2_270_000_000 < left <= 2_300_000_000


async def test_a_deadline_already_passed_sends_nothing(autojump_clock: trio.abc.Clock) -> None:
    upstreams = grpc_upstreams()
    handler, _ = outbound(upstreams)
    response = await handler(grpc_request((b"grpc-timeout", b"0n")))
    assert status_of(response) == Status.DEADLINE_EXCEEDED and upstreams.calls == []


@pytest.mark.parametrize("value", [b"1s", b"123456789S", b"S", b"-1S", b"1.5S"])
async def test_a_malformed_grpc_timeout_is_internal(value: bytes, autojump_clock: trio.abc.Clock) -> None:
    upstreams = grpc_upstreams()
    handler, _ = outbound(upstreams)
    response = await handler(grpc_request((b"grpc-timeout", value)))
    assert status_of(response) == Status.INTERNAL and response.mesh_error == "bad-request"
    assert b"malformed grpc-timeout" in dict(response.headers)[b"grpc-message"]
    assert upstreams.calls == []


async def test_two_grpc_timeouts_are_refused(autojump_clock: trio.abc.Clock) -> None:
    upstreams = grpc_upstreams()
    handler, _ = outbound(upstreams)
    response = await handler(grpc_request((b"grpc-timeout", b"1S"), (b"grpc-timeout", b"1H")))
    assert status_of(response) == Status.INTERNAL and upstreams.calls == []


@pytest.mark.parametrize(
    ("sent", "deadline_ms", "timeout", "passed_on"),
    [
        (b"1500m", None, 1.5, b"1500m"),
        (b"1500m", b"1000", 1.0, b"1S"),  # the calling sidecar has less left: the app hears of that
        (b"1H", None, 15.0, b"15S"),  # the inbound side's own timeout
        (None, None, 15.0, None),
    ],
)
async def test_the_inbound_side_keeps_to_the_deadline_and_tells_the_app(
    sent: bytes | None, deadline_ms: bytes | None, timeout: float, passed_on: bytes | None
) -> None:
    seen: list[Request] = []

    async def app(request: Request) -> Response:
        seen.append(request)
        return Response(200, b"OK", [GRPC])

    handler = errors_layer(filters_layer(app, to_local_app(Endpoint("127.0.0.1", 8080), "item")))
    headers = []
    if sent is not None:
        headers.append((b"grpc-timeout", sent))
    if deadline_ms is not None:
        headers.append((b"x-meshlet-deadline-ms", deadline_ms))
    await handler(grpc_request(*headers))
    (request,) = seen
    assert request.timeout == pytest.approx(timeout, abs=0.01)
    grpc_timeout = dict(request.head.headers).get(b"grpc-timeout")
    if passed_on is None:
        assert grpc_timeout is None
    else:
        assert grpc_timeout is not None and abs(parse_timeout(grpc_timeout) - parse_timeout(passed_on)) < 10_000_000
        assert request.head.headers[1][0] == b"grpc-timeout"  # rewritten in its place


# --- the mesh's errors as gRPC statuses -----------------------------------------------------


def raises(error: Exception) -> Callable[[Request], object]:
    def fail(_request: Request) -> object:
        raise error

    return fail


@pytest.mark.parametrize(
    ("behaviour", "status", "reason"),
    [
        ("refused", Status.UNAVAILABLE, "connect-failed"),
        ("reset", Status.UNAVAILABLE, "upstream-reset"),
        ("hang", Status.DEADLINE_EXCEEDED, "timeout"),
        (raises(MeshError(errors.NO_ROUTE, "no service")), Status.UNIMPLEMENTED, "no-route"),
        (raises(MeshError(errors.FORBIDDEN, "AccessPolicy says no")), Status.PERMISSION_DENIED, "forbidden"),
        (raises(RuntimeError("a bug")), Status.INTERNAL, "internal"),
    ],
)
async def test_mesh_errors_reach_a_grpc_caller_as_trailers_only(
    behaviour: object, status: int, reason: str, autojump_clock: trio.abc.Clock
) -> None:
    upstreams = grpc_upstreams(A=behaviour, B=behaviour, C=behaviour)
    handler, _ = outbound(upstreams)
    response = await handler(grpc_request((b"grpc-timeout", b"5S")))
    # One HEADERS frame with END_STREAM for the HTTP/2 writer: a structured head, no body.
    assert (response.status, response.raw, response.body, response.framing) == (200, None, None, "none")
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"application/grpc"
    assert status_of(response) == status
    assert headers[b"x-meshlet-error"] == reason.encode() and response.mesh_error == reason
    assert all(0x20 <= byte <= 0x7E for byte in headers[b"grpc-message"])


async def test_the_mesh_refusals_before_any_attempt(autojump_clock: trio.abc.Clock) -> None:
    handler, _ = outbound(grpc_upstreams(), replace(DEFAULTS, rate_limit=(1.0, 1)))
    await handler(grpc_request())
    limited = await handler(grpc_request())
    assert status_of(limited) == Status.RESOURCE_EXHAUSTED and b"retry-after" in dict(limited.headers)
    handler, _ = outbound(grpc_upstreams(), endpoints=())
    assert status_of(await handler(grpc_request())) == Status.UNAVAILABLE


async def test_a_request_that_is_not_grpc_gets_the_plain_answer(autojump_clock: trio.abc.Clock) -> None:
    handler, _ = outbound(grpc_upstreams(A="refused", B="refused", C="refused"))
    for request in (
        grpc_request(version="1.1"),  # gRPC runs over HTTP/2 only
        Request(RequestHead(b"POST", PATH, [(b"content-type", b"application/json")], http_version="2"), None, b""),
    ):
        request.service = "item"
        response = await handler(request)
        assert response.status == 503 and response.raw is not None and request.grpc is None


# --- retries and the breaker by gRPC status -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_on", "retried"),
    [
        (Status.UNAVAILABLE, None, True),  # "unavailable" is a default condition
        (Status.RESOURCE_EXHAUSTED, None, False),
        (Status.RESOURCE_EXHAUSTED, ["resource-exhausted"], True),
        (Status.INTERNAL, ["internal"], True),
        (Status.CANCELLED, ["cancelled"], True),
        (Status.DEADLINE_EXCEEDED, ["deadline-exceeded"], True),
        (Status.NOT_FOUND, ["unavailable", "5xx", "gateway-error"], False),
        (Status.OK, ["unavailable"], False),
        (Status.UNAVAILABLE, ["5xx"], False),  # an HTTP condition: the HTTP status is 200
    ],
)
async def test_a_trailers_only_answer_is_retried_by_its_status(
    status: int, retry_on: list[str] | None, retried: bool, autojump_clock: trio.abc.Clock
) -> None:
    settings = RETRYING if retry_on is None else replace(RETRYING, retry_on=RetryOn(retry_on))
    upstreams = grpc_upstreams(A=trailers_only(status))
    handler, _ = outbound(upstreams, settings)
    response = await handler(grpc_request(body=Body(b"\0\0\0\0\x02hi")))
    assert [endpoint for endpoint, _, _ in upstreams.calls] == ([A, B] if retried else [A])
    assert [body for _, _, body in upstreams.calls] == [b"\0\0\0\0\x02hi"] * len(upstreams.calls)  # replayed whole
    if retried:
        assert b"grpc-status" not in dict(response.headers) and upstreams.finished[0] is False
    else:
        assert status_of(response) == status


async def test_a_grpc_call_is_retried_only_when_the_policy_allows_a_post(autojump_clock: trio.abc.Clock) -> None:
    upstreams = grpc_upstreams(A=trailers_only(Status.UNAVAILABLE))
    handler, _ = outbound(upstreams)  # the defaults: POST is not repeated
    response = await handler(grpc_request())
    assert status_of(response) == Status.UNAVAILABLE and len(upstreams.calls) == 1


async def test_a_status_in_the_trailers_is_never_retried(autojump_clock: trio.abc.Clock) -> None:
    upstreams = grpc_upstreams(A=streamed(Status.UNAVAILABLE))
    handler, destinations = outbound(upstreams, RETRYING)
    response = await handler(grpc_request())
    assert len(upstreams.calls) == 1  # the response had started: it is the caller's
    response.finish(True)
    assert upstreams.finished == [True]


@pytest.mark.parametrize("how", ["trailers-only", "trailers"])
async def test_grpc_unavailable_with_http_200_opens_the_breaker(how: str, autojump_clock: trio.abc.Clock) -> None:
    settings = replace(DEFAULTS, attempts=0, breaker=BreakerConfig(min_requests=20, open_for=5))
    answer = trailers_only(Status.UNAVAILABLE) if how == "trailers-only" else streamed(Status.UNAVAILABLE)
    upstreams = grpc_upstreams(A=answer, B=answer, C=answer)
    handler, destinations = outbound(upstreams, settings)
    for _ in range(20):
        response = await handler(grpc_request())
        assert response.status == 200
        response.finish(True)
    breaker = destinations.get("item", None, trio.current_time()).breaker
    assert breaker.state == 1  # open
    refused = await handler(grpc_request())
    assert len(upstreams.calls) == 20  # answered at once, nothing sent
    assert status_of(refused) == Status.UNAVAILABLE and dict(refused.headers)[b"x-meshlet-error"] == b"circuit-open"


@pytest.mark.parametrize("status", [Status.NOT_FOUND, Status.INVALID_ARGUMENT, Status.CANCELLED, Status.OK])
async def test_the_callers_own_faults_do_not_open_the_breaker(status: int, autojump_clock: trio.abc.Clock) -> None:
    settings = replace(DEFAULTS, attempts=0, breaker=BreakerConfig(min_requests=20, open_for=5))
    upstreams = grpc_upstreams(A=streamed(status), B=trailers_only(status), C=streamed(status))
    handler, destinations = outbound(upstreams, settings)
    for _ in range(30):
        (await handler(grpc_request())).finish(True)
    assert destinations.get("item", None, trio.current_time()).breaker.state == 0
    assert len(upstreams.calls) == 30


async def test_a_call_cut_short_before_its_status_tells_the_breaker_nothing(autojump_clock: trio.abc.Clock) -> None:
    settings = replace(DEFAULTS, attempts=0, breaker=BreakerConfig(min_requests=5, open_for=5))
    upstreams = grpc_upstreams(A=streamed(Status.UNAVAILABLE))
    handler, destinations = outbound(upstreams, settings, endpoints=(A,))
    for _ in range(10):
        response = await handler(grpc_request())
        response.trailers = None  # the stream broke off before its trailers
        response.finish(False)
    breaker = destinations.get("item", None, trio.current_time()).breaker
    assert breaker.state == 0 and breaker.snapshot(trio.current_time())["calls"] == 0


async def test_the_outlier_detector_ejects_on_grpc_failures(autojump_clock: trio.abc.Clock) -> None:
    settings = replace(DEFAULTS, attempts=0, breaker=BreakerConfig(force="closed"))
    upstreams = grpc_upstreams(A=streamed(Status.UNAVAILABLE))
    handler, destinations = outbound(upstreams, settings)
    for _ in range(15):  # every third to A: its fifth failure in a row ejects it
        (await handler(grpc_request())).finish(True)
    outlier = destinations.get("item", None, trio.current_time()).outlier
    available, _ = outlier.available(trio.current_time())
    assert A not in available and B in available


def test_outcomes_by_grpc_status() -> None:
    unavailable = Outcome(200, grpc=Status.UNAVAILABLE)
    assert unavailable.failed and unavailable.name == "UNAVAILABLE"
    assert not Outcome(200, grpc=Status.NOT_FOUND).failed
    assert not Outcome(200, grpc=None).failed and Outcome(200).name == "200"
    assert Outcome(503, grpc=Status.UNAVAILABLE).failed
    assert RetryOn(["unavailable"]).matches(unavailable) and RetryOn(["unavailable"]).matches(Outcome(503))
    assert not RetryOn(["connect-failure"]).matches(unavailable)


# --- the metrics and the spans ------------------------------------------------------------


async def test_the_grpc_status_label(autojump_clock: trio.abc.Clock) -> None:
    telemetry = Telemetry()
    upstreams = grpc_upstreams(A=streamed(Status.OK), B=trailers_only(Status.NOT_FOUND), C=streamed(Status.DATA_LOSS))
    handler, _ = outbound(upstreams, telemetry=telemetry)
    for _ in range(3):
        (await handler(grpc_request())).finish(True)
    cut = await handler(grpc_request())  # A again
    cut.trailers = None
    cut.finish(False)
    handler_down, _ = outbound(grpc_upstreams(A="refused", B="refused", C="refused"), telemetry=telemetry)
    (await handler_down(grpc_request())).finish(True)
    plain = Request(RequestHead(b"GET", b"/x", []), None, b"")
    plain.service = "item"
    (await handler(plain)).finish(True)
    assert {(labels[4], labels[5], labels[6]): n for labels, n in telemetry.requests.items()} == {
        ("200", "", "0"): 1,
        ("200", "", "5"): 1,
        ("200", "", "15"): 1,
        ("200", "incomplete", "1"): 1,  # cut short before its status: CANCELLED, as the caller sees it
        ("200", "connect-failed", "14"): 1,
        ("200", "", ""): 1,  # not gRPC: no label
    }


def tracer(spans: list[Span], service: str) -> Tracer:
    return Tracer(service, SpanEndpoint(service, "127.0.0.1", 15001), spans.append, rng=random.Random(4))


async def test_client_and_server_spans_carry_the_rpc_tags(autojump_clock: trio.abc.Clock) -> None:
    spans: list[Span] = []
    upstreams = grpc_upstreams(A=trailers_only(Status.UNAVAILABLE), B=streamed(Status.OK))
    handler, _ = outbound(client_tracing(upstreams, tracer(spans, "user")), RETRYING)
    (await handler(grpc_request())).finish(True)
    failed, ok = spans
    for span in spans:
        assert span.tags["rpc.system"] == "grpc"
        assert (span.tags["rpc.service"], span.tags["rpc.method"]) == ("shop.Items", "Get")
    assert failed.tags["rpc.grpc.status_code"] == "14" and failed.tags["error"] == "UNAVAILABLE"
    assert ok.tags["rpc.grpc.status_code"] == "0" and "error" not in ok.tags

    spans.clear()

    async def app(_request: Request) -> Response:
        raise MeshError(errors.FORBIDDEN, "no")

    inbound = server_tracing(errors_layer(app), tracer(spans, "item"))
    (await inbound(grpc_request())).finish(True)
    (server,) = spans
    assert server.kind == "SERVER" and server.tags["rpc.grpc.status_code"] == "7"
    assert server.tags["rpc.method"] == "Get" and server.tags["meshlet.reason"] == "forbidden"


async def test_a_client_span_of_a_failed_attempt_tells_the_status_the_caller_gets(
    autojump_clock: trio.abc.Clock,
) -> None:
    spans: list[Span] = []
    handler, _ = outbound(
        client_tracing(grpc_upstreams(A="reset"), tracer(spans, "user")), replace(DEFAULTS, attempts=0)
    )
    await handler(grpc_request())
    (span,) = spans
    assert span.tags["rpc.grpc.status_code"] == "14" and span.tags["meshlet.reason"] == "upstream-reset"


async def test_a_failure_once_the_deadline_passed_is_deadline_exceeded(autojump_clock: trio.abc.Clock) -> None:
    upstreams = grpc_upstreams(A="reset")

    async def late(request: Request) -> Response:
        await trio.sleep(2.0)  # the upstream gave up on the same deadline, and reset its stream
        return await upstreams(request)

    handler, _ = outbound(late)
    response = await handler(grpc_request((b"grpc-timeout", b"1S")))
    assert status_of(response) == Status.DEADLINE_EXCEEDED and response.mesh_error == "upstream-reset"
