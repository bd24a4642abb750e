"""The control plane's HTTP API in one process (build_api on hypercorn, loopback): the route
table, the answers its modules share (400, 401, 405), and the shapes the dashboard and
Prometheus read. The 413 of a body over the limit and whole processes are in
tests/integration/test_control_plane.py; the CLI's view of the API in tests/meshlet/test_client.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from control_plane.api import build_api
from control_plane.ownership import Owner
from control_plane.policies import PolicyStore
from control_plane.registry import Instance, Registry
from control_plane.server import PushServer
from control_plane.store import MemoryStore

TOKEN = "s3cret"
LOCAL = Owner("item", "127.0.0.1")  # registered by a session from 127.0.0.1: its admin is scraped
WRITE = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an API whose registry holds item-1 (ready, zone=eu-1a) and item-2 (not ready)."""
    registry = Registry()
    now = trio.current_time()
    registry.register(
        Instance("item", "item-1", "127.0.0.1:9001", "127.0.0.1:9101", {"zone": "eu-1a"}, ready=True, owner=LOCAL),
        now,
    )
    registry.register(Instance("item", "item-2", "127.0.0.1:9002", "127.0.0.1:9102", node="n2", owner=LOCAL), now)
    push = PushServer(registry, policies=PolicyStore(MemoryStore()))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, build_api(push, token=TOKEN), config))  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=binds[0], timeout=10) as client:
        yield client


async def test_registry_views(api: httpx.AsyncClient) -> None:
    services = (await api.get("/v1/services")).json()["services"]
    assert [(s["name"], s["instances"], s["ready"]) for s in services] == [("item", 2, 1)]
    endpoints = (await api.get("/v1/endpoints", params={"service": "item"})).json()["endpoints"]["item"]
    assert [e["id"] for e in endpoints] == ["item-1", "item-2"]
    assert set(endpoints[0]) == {
        "id", "service", "address", "admin", "labels", "app_port", "protocol", "node", "ready", "connected", "lease_expires_in"
    }  # fmt: skip
    targets = (await api.get("/v1/prometheus/targets")).json()
    assert targets[0] == {
        "targets": ["127.0.0.1:9101"],
        "labels": {
            "service": "item",
            "instance": "item-1",
            "__meta_meshlet_node": "",
            "__meta_meshlet_ready": "true",
            "__meta_meshlet_address": "127.0.0.1:9001",
            "__meta_meshlet_label_zone": "eu-1a",
        },
    }
    assert targets[1]["labels"]["__meta_meshlet_ready"] == "false"


async def test_status_metrics_and_liveness(api: httpx.AsyncClient) -> None:
    status = (await api.get("/v1/status")).json()
    assert status["sidecars"] == [] and status["registry"]["instances"] == 2 and status["registry"]["ready"] == 1
    assert (status["pushes_total"], status["nacks_total"]) == (0, 0)
    metrics = await api.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    for line in (
        "meshlet_cp_registry_instances 2.0",
        "meshlet_cp_registry_ready_instances 1.0",
        'meshlet_cp_connections_refused_total{cap="max-connections"} 0.0',
        'meshlet_cp_convergence_seconds_bucket{le="+Inf"} 0.0',
    ):
        assert line in metrics.text, line
    for path in ("/live", "/ready"):
        assert (await api.get(path)).text == "live\n"


async def test_the_dashboard_without_a_scraper(api: httpx.AsyncClient) -> None:
    page = await api.get("/")
    assert page.headers["content-type"].startswith("text/html")
    data = (await api.get("/v1/dashboard")).json()
    assert set(data) == {"services", "sidecars", "policy_version", "policy_push_version", "window_seconds", "traces"}
    assert [e["id"] for e in data["services"]["item"]] == ["item-1", "item-2"]
    for path in ("/v1/stat", "/v1/stream"):
        answer = await api.get(path)
        assert (answer.status_code, answer.json()) == (
            404,
            {"problems": ["this control plane does not read sidecar metrics"]},
        )
    assert (await api.get("/v1/stat", params={"window": "0"})).json() == {
        "problems": ["window must be between 1 and 300 seconds"]
    }


async def test_writes_need_the_token_and_a_json_object(api: httpx.AsyncClient) -> None:
    refused = await api.put("/v1/policies", json={"files": []})
    assert refused.status_code == 401 and "api-token" in refused.json()["problems"][0]
    assert (await api.post("/v1/policies/rollback", json={"version": "x"})).status_code == 401
    for body, problem in (
        (b"{", "the body must be JSON"),
        (b"[]", "the body must be a JSON object"),
        (b'{"files": [["a.yaml"]]}', '"files" must be a list of [name, text] pairs'),
    ):
        answer = await api.put("/v1/policies", content=body, headers=WRITE)
        assert (answer.status_code, answer.json()) == (400, {"problems": [problem]})
    answer = await api.post("/v1/policies/rollback", json={"version": ""}, headers=WRITE)
    assert answer.json() == {"problems": ['"version" must be a version string (meshlet get policies --history)']}


async def test_one_route_per_path_so_a_wrong_method_names_every_allowed_one(api: httpx.AsyncClient) -> None:
    answer = await api.post("/v1/policies", json={})
    assert answer.status_code == 405
    assert set(answer.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT"}
    assert (await api.get("/v1/policies/rollback")).status_code == 405


async def test_explain_asks_for_a_url(api: httpx.AsyncClient) -> None:
    answer = await api.get("/v1/explain")
    assert answer.status_code == 400 and answer.json()["problems"][0].startswith("give url")
    explained = (await api.get("/v1/explain", params={"url": "http://item/x", "method": "post"})).json()
    assert (explained["host"], explained["method"]) == ("item", "POST")
