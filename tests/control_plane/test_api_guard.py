"""control_plane/api/guard.py on the real API (build_api on hypercorn, loopback): the read token,
the write token, and the policy a reader sees redacted or whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.requests import Request

from control_plane.api import build_api
from control_plane.api.guard import ApiGuard
from control_plane.policies import PolicyStore
from control_plane.registry import Registry
from control_plane.server import PushServer
from control_plane.store import MemoryStore

WRITE_TOKEN = "write-token-0123456789"
READ_TOKEN = "read-token-0123456789"
WRITE = {"authorization": f"Bearer {WRITE_TOKEN}"}
READ = {"authorization": f"Bearer {READ_TOKEN}"}
SECRET = "s3cret-route-credential"

POLICY = f"""\
kind: Route
name: item
host: item
rules:
  - name: keyed
    match: {{headers: {{x-api-key: {{exact: k3y-{SECRET}}}}}}}
    headers:
      request:
        add: {{authorization: "Bearer {SECRET}"}}
    destinations: [{{service: item}}]
  - name: teapot
    match: {{path: {{prefix: /tea}}}}
    direct_response: {{status: 418, headers: {{set-cookie: "sid={SECRET}"}}, body: short and stout}}
"""


async def start(nursery: trio.Nursery, read_token: str | None) -> str:
    push = PushServer(Registry(), policies=PolicyStore(MemoryStore()))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    app = build_api(push, token=WRITE_TOKEN, read_token=read_token)
    binds: list[str] = await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=binds[0], timeout=10) as client:
        applied = await client.put("/v1/policies", json={"files": [["route.yaml", POLICY]]}, headers=WRITE)
        assert applied.status_code == 200, applied.text
    return binds[0]


@pytest.fixture
async def open_api(nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=await start(nursery, None), timeout=10) as client:
        yield client


@pytest.fixture
async def guarded(nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=await start(nursery, READ_TOKEN), timeout=10) as client:
        yield client


READS = [
    "/v1/services",
    "/v1/endpoints",
    "/v1/status",
    "/v1/policies",
    "/v1/policies/history",
    "/v1/explain?url=http://item/",
    "/v1/dashboard",
    "/v1/prometheus/targets",
    "/api/v2/traces",
    "/api/v2/services",
]


@pytest.mark.parametrize("path", READS)
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong-token-0123456789"}, 401),
        ({"authorization": READ_TOKEN}, 401),  # not a Bearer credential
        ({"authorization": f"Basic {READ_TOKEN}"}, 401),
        (READ, 200),
        (WRITE, 200),
    ],
    ids=["none", "wrong", "no-scheme", "basic", "read-token", "write-token"],
)
async def test_reads_need_a_token_when_one_is_set(
    guarded: httpx.AsyncClient, path: str, headers: dict[str, str], status: int
) -> None:
    answer = await guarded.get(path, headers=headers)
    assert answer.status_code == status, answer.text
    if status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"
        (problem,) = answer.json()["problems"]
        assert "--api-read-token" in problem and "MESHLET_TOKEN" in problem
        assert READ_TOKEN not in answer.text and WRITE_TOKEN not in answer.text


@pytest.mark.parametrize("path", ["/", "/live", "/ready", "/metrics"])
async def test_probes_the_page_and_counters_stay_open(guarded: httpx.AsyncClient, path: str) -> None:
    assert (await guarded.get(path)).status_code == 200


async def test_span_posts_are_left_to_the_span_store(guarded: httpx.AsyncClient) -> None:
    """The read token gates reads only: a span post is the trace store's to judge (a span token
    or the write token), and its refusals are not counted as the read gate's."""
    span = {"traceId": "a" * 32, "id": "b" * 16, "name": "get /", "timestamp": 1, "duration": 1}
    assert (await guarded.post("/api/v2/spans", json=[span], headers=WRITE)).status_code == 202
    assert (await guarded.post("/api/v2/spans", json=[span])).status_code == 401
    metrics = (await guarded.get("/metrics")).text
    assert 'meshlet_cp_api_refused_total{need="read-token"} 0.0' in metrics
    assert 'meshlet_cp_span_posts_refused_total{reason="no-token"} 1.0' in metrics


async def test_the_read_token_does_not_write(guarded: httpx.AsyncClient) -> None:
    answer = await guarded.put("/v1/policies", json={"files": []}, headers=READ)
    assert answer.status_code == 401 and "api-token" in answer.json()["problems"][0]
    answer = await guarded.post("/v1/policies/rollback", json={"version": "x"}, headers=READ)
    assert answer.status_code == 401


async def test_refusals_are_counted_by_the_token_needed(guarded: httpx.AsyncClient) -> None:
    await guarded.get("/v1/services")
    await guarded.get("/v1/services", headers={"authorization": "Bearer nope"})
    await guarded.put("/v1/policies", json={"files": []}, headers=READ)
    metrics = (await guarded.get("/metrics")).text
    assert 'meshlet_cp_api_refused_total{need="read-token"} 2.0' in metrics
    assert 'meshlet_cp_api_refused_total{need="write-token"} 1.0' in metrics


@pytest.mark.parametrize("reader", [{}, READ], ids=["anyone", "read-token"])
async def test_the_policy_is_redacted_for_readers_without_the_write_token(
    open_api: httpx.AsyncClient, guarded: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    api = open_api if not reader else guarded
    policies = (await api.get("/v1/policies", headers=reader)).json()
    assert policies["applied"]["redacted"] is True
    (text,) = policies["applied"]["texts"].values()
    assert "authorization: <redacted>" in text and "short and stout" in text
    explained = (await api.get("/v1/explain", params={"url": "http://item/x"}, headers=reader)).text
    teapot = (await api.get("/v1/explain", params={"url": "http://item/tea"}, headers=reader)).json()
    assert teapot["decision"]["direct_response"]["headers"] == {"set-cookie": "<redacted>"}
    keyed = await api.get(
        "/v1/explain", params={"url": "http://item/x", "header": f"x-api-key:k3y-{SECRET}"}, headers=reader
    )
    assert keyed.json()["rule"]["name"] == "keyed"  # matched on the real value, shown redacted
    assert keyed.json()["decision"]["headers"] == {"request": {"add": {"authorization": "<redacted>"}}}
    history = (await api.get("/v1/policies/history", headers=reader)).text
    for answer in (str(policies), explained, str(teapot), keyed.text, history):
        assert SECRET not in answer


async def test_the_write_token_sees_the_policy_whole(guarded: httpx.AsyncClient) -> None:
    policies = (await guarded.get("/v1/policies", headers=WRITE)).json()
    assert "redacted" not in policies["applied"]
    assert policies["applied"]["texts"] == {"route.yaml": POLICY}
    keyed = await guarded.get(
        "/v1/explain", params={"url": "http://item/x", "header": f"x-api-key:k3y-{SECRET}"}, headers=WRITE
    )
    assert keyed.json()["decision"]["headers"] == {"request": {"add": {"authorization": f"Bearer {SECRET}"}}}


def _request(headers: dict[str, str]) -> Request:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/tokens", "headers": raw, "client": ("1.2.3.4", 1)})


@pytest.mark.parametrize(
    ("write_token", "headers", "refused"),
    [
        (None, {}, True),  # writes are open (no token set), but this one never is
        (None, WRITE, True),
        (WRITE_TOKEN, {}, True),
        (WRITE_TOKEN, READ, True),
        (WRITE_TOKEN, WRITE, False),
    ],
)
def test_a_write_that_is_never_open(write_token: str | None, headers: dict[str, str], refused: bool) -> None:
    guard = ApiGuard(write_token, READ_TOKEN)
    answer = guard.write_refused_always_guarded(_request(headers), "minting join tokens")
    assert (answer is not None) == refused
    if answer is not None:
        assert answer.status_code == 401
    if answer is not None and write_token is None:
        assert b"minting join tokens needs the control plane's token" in answer.body
