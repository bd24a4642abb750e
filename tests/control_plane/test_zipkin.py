"""Zipkin's v2 HTTP API on the embedded store (control_plane/zipkin.py), through ASGI."""

from __future__ import annotations

import time

import httpx
import pytest
from starlette.applications import Starlette

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


def client(store: TraceStore) -> httpx.AsyncClient:
    app = Starlette(routes=zipkin_routes(store))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp")


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
