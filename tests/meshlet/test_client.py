"""The CLI's API client against the control plane's real API (build_api served by hypercorn
on loopback; the blocking client runs in a worker thread): typed results, and one error,
ApiError, carrying the status and the problems the commands print."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from control_plane.api import build_api
from control_plane.policies import PolicyStore
from control_plane.registry import Instance, Registry
from control_plane.server import PushServer
from control_plane.store import MemoryStore
from meshlet.cli.client import AdminClient, ApiClient, ApiError, problems

TOKEN = "s3cret"
POLICY = """\
kind: DestinationPolicy
name: item
service: item
circuit_breaker: {min_requests: 10, open_for: 3s}
"""

T = TypeVar("T")


@pytest.fixture
async def cp(nursery: trio.Nursery) -> AsyncIterator[str]:
    """HOST:PORT of a control plane's API with one ready `item` instance (token TOKEN)."""
    registry = Registry()
    registry.register(
        Instance("item", "item-1", "127.0.0.1:9001", "127.0.0.1:9101", {"version": "v1"}, ready=True),
        now=trio.current_time(),
    )
    push = PushServer(registry, policies=PolicyStore(MemoryStore()))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, build_api(push, token=TOKEN), config))  # type: ignore[arg-type]
    yield binds[0].removeprefix("http://")


async def call(blocking: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """A blocking client call, off the trio thread that serves the API."""
    return await trio.to_thread.run_sync(partial(blocking, *args, **kwargs))


async def raised(blocking: Callable[..., object], /, *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await call(blocking, *args, **kwargs)
    return caught.value


def answering(status: int, content: bytes, content_type: str = "application/json") -> httpx.MockTransport:
    return httpx.MockTransport(
        lambda request: httpx.Response(status, content=content, headers={"content-type": content_type})
    )


async def test_registry_reads(cp: str) -> None:
    with ApiClient(cp) as api:
        services = await call(api.services)
        endpoints = await call(api.endpoints, "item")
        unknown = await call(api.endpoints, "nothing")
        everything = await call(api.endpoints)
        status = await call(api.status)
    assert services == [{"name": "item", "instances": 1, "ready": 1, "version": services[0]["version"]}]
    assert list(endpoints) == ["item"] and [e["id"] for e in everything["item"]] == ["item-1"]
    assert endpoints["item"][0]["id"] == "item-1" and endpoints["item"][0]["labels"] == {"version": "v1"}
    assert unknown == {"nothing": []}
    assert status["registry"]["instances"] == 1 and status["sidecars"] == []


async def test_apply_dry_run_history_and_rollback(cp: str) -> None:
    added = [{"kind": "DestinationPolicy", "name": "item", "change": "added"}]
    with ApiClient(cp, TOKEN) as api:
        dry = await call(api.apply, [("item.yaml", POLICY)], source="test", dry_run=True)
        assert dry["applied"] is False and dry["changes"] == added
        assert (await call(api.policies))["version"] == ""
        applied = await call(api.apply, [("item.yaml", POLICY)], source="test")
        assert applied["applied"] is True and applied["previous"] == ""
        running = await call(api.policies)
        assert running["version"] == applied["version"] and running["push_version"]
        assert [d["name"] for d in running["documents"]] == ["item"]
        emptied = await call(api.apply, [], source="test")
        assert emptied["changes"] == [{"kind": "DestinationPolicy", "name": "item", "change": "removed"}]
        assert [v["version"] for v in await call(api.history)] == ["", applied["version"]]
        back = await call(api.rollback, applied["version"][:8])
    assert back["applied"] is True and back["version"] == applied["version"]


async def test_a_write_without_the_token_says_where_it_is(cp: str) -> None:
    for token in (None, "wrong"):
        with ApiClient(cp, token) as api:
            error = await raised(api.apply, [("item.yaml", POLICY)], source="test")
            assert error.status == 401 and "file api-token" in error.problems[0]
            assert (await raised(api.rollback, "abcd")).status == 401


async def test_invalid_policy_is_422_with_every_problem(cp: str) -> None:
    with ApiClient(cp, TOKEN) as api:
        error = await raised(api.apply, [("bad.yaml", "kind: DestinationPolicy\nname: item\n")], source="test")
        assert error.status == 422
        assert error.problems and all(p.startswith("bad.yaml:") for p in error.problems)
        error = await raised(api.rollback, "ffffffff")
    assert (error.status, error.problems) == (422, ["version 'ffffffff' is not in the history (latest: none)"])


async def test_explain(cp: str) -> None:
    with ApiClient(cp) as api:
        answer = await call(api.explain, "http://item/items/1", method="POST", headers=["x-user: 7"], source="user")
        error = await raised(api.explain, "http://item/", headers=["no-colon"])
    assert (answer["host"], answer["method"], answer["target"]) == ("item", "POST", "/items/1")
    assert answer["source"] == "user"
    assert (error.status, error.problems) == (400, ["header 'no-colon': expected NAME:VALUE"])


async def test_traces_and_stat(cp: str) -> None:
    with ApiClient(cp) as api:
        assert await call(api.trace, "4bf92f3577b34da6a3ce929d0e0e4736") is None
        assert await call(api.traces, limit=3, service="item") == []
        no_scraper = await raised(api.stat, "service", 30)
        bad_by = await raised(api.stat, "nothing", 30)
    assert (no_scraper.status, no_scraper.problems) == (404, ["this control plane does not read sidecar metrics"])
    assert bad_by.status == 400 and bad_by.problems[0].startswith("by must be one of")


def test_no_answer_has_no_status_and_says_why() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with ApiClient("127.0.0.1:9", transport=httpx.MockTransport(refuse)) as api, pytest.raises(ApiError) as caught:
        api.status()
    assert caught.value.status is None
    assert str(caught.value) == "[Errno 111] Connection refused"


def test_an_error_answer_that_is_not_the_apis_says_its_text() -> None:
    with ApiClient("127.0.0.1:9", transport=answering(502, b"<h1>Bad Gateway</h1>\n", "text/html")) as api:
        with pytest.raises(ApiError) as caught:
            api.services()
    assert (caught.value.status, caught.value.problems) == (502, ["<h1>Bad Gateway</h1>"])
    assert str(caught.value) == "answered 502: <h1>Bad Gateway</h1>"
    assert problems(httpx.Response(503)) == ["Service Unavailable"]


def test_a_success_that_is_not_json_is_an_api_error_not_a_traceback() -> None:
    with ApiClient("127.0.0.1:9", transport=answering(200, b"hello", "text/plain")) as api:
        with pytest.raises(ApiError) as caught:
            api.status()
    assert (caught.value.status, caught.value.problems) == (200, ["not a JSON answer: hello"])


def test_admin_client_reads_a_sidecars_explanations() -> None:
    seen: list[str] = []

    def admin(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.params.get("request_id") == "gone":
            return httpx.Response(404, json={"error": "no explanation kept for request 'gone'"})
        if "request_id" in request.url.params:
            return httpx.Response(200, json={"request_id": request.url.params["request_id"]})
        return httpx.Response(200, json=[])

    with AdminClient("127.0.0.1:16090", transport=httpx.MockTransport(admin)) as client:
        assert client.recent() == []
        assert client.explained("r-1") == {"request_id": "r-1"}
        with pytest.raises(ApiError) as caught:
            client.explained("gone")
    assert (caught.value.status, caught.value.problems) == (404, ["no explanation kept for request 'gone'"])
    assert seen[:2] == ["http://127.0.0.1:16090/explain", "http://127.0.0.1:16090/explain?request_id=r-1"]
