"""Zipkin's v2 HTTP API on the embedded store (control_plane/zipkin.py), through ASGI."""

from __future__ import annotations

import time

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette

from control_plane.span_tokens import GRACE, SpanTokens
from control_plane.traces import TraceStore
from control_plane.zipkin import check_span, zipkin_routes

NOW_US = int(time.time() * 1_000_000)


def span(**changes: object) -> dict[str, object]:
    return {
        "traceId": "A" * 32,  # upper case is taken and stored lower-cased
        "id": "1" * 16,
        "kind": "SERVER",
        "name": "get /items",
        "timestamp": NOW_US,
        "duration": 1500,
        "localEndpoint": {"serviceName": "item", "ipv4": "127.0.0.1"},
        "tags": {"http.status_code": "200"},
        **changes,
    }


API_TOKEN = "the-api-write-token"


def client(store: TraceStore, tokens: SpanTokens | None = None, token: str | None = API_TOKEN) -> httpx.AsyncClient:
    """A client of the routes; it carries the API's write token unless ``token`` says otherwise."""
    app = Starlette(routes=zipkin_routes(store, tokens if tokens is not None else SpanTokens(), API_TOKEN))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp", headers=headers)


async def test_spans_in_queries_out_in_zipkins_shapes() -> None:
    store = TraceStore()
    async with client(store) as api:
        posted = await api.post("/api/v2/spans", json=[span(), span(id="2" * 16, parentId="1" * 16, kind="CLIENT")])
        assert posted.status_code == 202
        assert (await api.get("/api/v2/services")).json() == ["item"]
        assert (await api.get("/api/v2/spans", params={"serviceName": "item"})).json() == ["get /items"]
        (trace,) = (await api.get("/api/v2/traces", params={"serviceName": "item", "limit": "5"})).json()
        assert {s["id"] for s in trace} == {"1" * 16, "2" * 16} and trace[0]["traceId"] == "a" * 32
        one = await api.get(f"/api/v2/trace/{'A' * 32}")
        assert one.status_code == 200 and len(one.json()) == 2
        assert (await api.get(f"/api/v2/trace/{'b' * 32}")).status_code == 404
        assert (await api.get("/api/v2/traces", params={"minDuration": "x"})).status_code == 400
        assert (await api.get("/api/v2/spans")).status_code == 400


async def test_the_rest_of_what_the_zipkin_ui_asks() -> None:
    # Zipkin's UI (Lens) also asks for remote services, the dependency graph, trace batches
    # and autocompletion; a UI pointed at the control plane gets answers, not 404s.
    store = TraceStore()
    caller = span(
        id="2" * 16, kind="CLIENT", localEndpoint={"serviceName": "user"}, remoteEndpoint={"serviceName": "item"}
    )
    async with client(store) as api:
        assert (await api.post("/api/v2/spans", json=[caller, span(parentId="2" * 16)])).status_code == 202
        assert (await api.get("/api/v2/remoteServices", params={"serviceName": "user"})).json() == ["item"]
        end_ts = str(NOW_US // 1000 + 1000)
        links = (await api.get("/api/v2/dependencies", params={"endTs": end_ts, "lookback": "60000"})).json()
        assert links == [{"parent": "user", "child": "item", "callCount": 1, "errorCount": 0}]
        many = (await api.get("/api/v2/traceMany", params={"traceIds": f"{'a' * 32},{'b' * 32}"})).json()
        assert len(many) == 1 and len(many[0]) == 2
        assert (await api.get("/api/v2/autocompleteKeys")).json() == []
        assert (await api.get("/api/v2/autocompleteValues", params={"key": "http.path"})).json() == []
        for path, params in (
            ("/api/v2/dependencies", {}),
            ("/api/v2/dependencies", {"endTs": "soon"}),
            ("/api/v2/remoteServices", {}),
            ("/api/v2/traceMany", {}),
        ):
            answer = await api.get(path, params=params)
            assert answer.status_code == 400 and answer.json()["problems"], (path, params)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"traceId": "xyz"}, "traceId must be 16 or 32 hex characters"),
        ({"id": "1" * 15}, "id must be 16 hex characters"),
        ({"parentId": 7}, "parentId must be 16 hex characters"),
        ({"kind": "client"}, "kind must be one of CLIENT, SERVER, PRODUCER, CONSUMER"),
        ({"duration": -1}, "duration must be a whole number of microseconds"),
        ({"timestamp": 1.5}, "timestamp must be a whole number of microseconds"),
        ({"localEndpoint": {"serviceName": 3}}, "localEndpoint must be an object with a string serviceName"),
        ({"tags": {"http.status_code": 200}}, "tags must map names to strings"),
    ],
)
def test_each_malformed_field_is_named(change: dict[str, object], problem: str) -> None:
    assert check_span(span(**change)) == problem


async def test_a_batch_with_a_bad_span_is_refused_whole() -> None:
    store = TraceStore()
    async with client(store) as api:
        refused = await api.post("/api/v2/spans", json=[span(), span(id="nope")])
        assert refused.status_code == 400
        assert refused.json() == {"problems": ["spans[1]: id must be 16 hex characters"]}
        assert store.span_count == 0  # nothing half-stored
        for body in (b"not json", b'{"a": 1}'):
            bad = await api.post("/api/v2/spans", content=body)
            assert bad.status_code == 400 and "JSON list of spans" in bad.json()["problems"][0]
        too_big = await api.post("/api/v2/spans", content=b"[" + b" " * (5 * 1024 * 1024) + b"]")
        assert too_big.status_code == 413


class Session:
    """What the push server grants a span token to."""


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "no-token"),
        ("Basic dXNlcjpwYXNz", "no-token"),
        ("Bearer ", "no-token"),
        ("Bearer mst_not-a-token-anybody-was-given", "unknown-token"),
        (f"Bearer {API_TOKEN}x", "unknown-token"),
    ],
)
async def test_posting_spans_needs_a_token(authorization: str | None, reason: str) -> None:
    store, tokens = TraceStore(), SpanTokens()
    async with client(store, tokens, token=None) as api:
        headers = {"authorization": authorization} if authorization else {}
        refused = await api.post("/api/v2/spans", json=[span()], headers=headers)
    assert refused.status_code == 401 and "span token" in refused.json()["problems"][0]
    assert store.span_count == 0
    assert tokens.posts_refused == {"no-token": 0, "unknown-token": 0, reason: 1}


async def test_a_span_token_writes_its_own_services_spans_only_until_its_grace_ends(
    mock_clock: trio.testing.MockClock,
) -> None:
    store, tokens, session = TraceStore(), SpanTokens(), Session()
    tokens.grant(session, "mst_" + "k" * 43, "item")
    forged = span(id="2" * 16, localEndpoint={"serviceName": "user"})
    nameless = span(id="3" * 16, localEndpoint=None)
    async with client(store, tokens, token="mst_" + "k" * 43) as api:
        assert (await api.post("/api/v2/spans", json=[span(), forged, nameless])).status_code == 202
        assert store.services() == ["item"] and store.span_count == 1
        assert tokens.spans_refused == {"other-service": 2}
        tokens.revoke(session, trio.current_time())  # the session ended: spans in flight still land
        mock_clock.jump(GRACE - 1)
        assert (await api.post("/api/v2/spans", json=[span(id="4" * 16)])).status_code == 202
        mock_clock.jump(1)
        assert (await api.post("/api/v2/spans", json=[span(id="5" * 16)])).status_code == 401
    assert store.span_count == 2


async def test_the_api_token_writes_any_services_spans() -> None:
    store = TraceStore()
    async with client(store) as api:
        posted = await api.post(
            "/api/v2/spans", json=[span(), span(id="2" * 16, localEndpoint={"serviceName": "user"})]
        )
    assert posted.status_code == 202 and store.services() == ["item", "user"]
