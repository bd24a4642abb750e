"""``--workers 2`` with a control plane: one sidecar to the control plane (one session, one
instance, one answer per push), every worker fed by the supervisor. A service looked up
through the supervisor and its endpoints pushed later reach both workers; a policy is ACKed
only once both serve it; the workers call over mTLS with the certificate the supervisor holds
and send their spans to the control plane's store; metrics add up exactly; a worker killed
comes back with the current policy; SIGTERM deregisters, then drains both workers (requests in
flight finish)."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable

import httpx
import trio

from ..helpers import sample
from ..mesh import Mesh

ROUTE = """\
kind: Route
name: item-tagged
host: item
rules:
  - name: all
    destinations: [{{service: item}}]
    headers:
      response: {{add: {{x-policy: {tag}}}}}
"""
SPREAD = 16  # requests, each on a connection of its own: the kernel spreads them over both workers


async def fresh_get(url: str, host: str = "item") -> httpx.Response:
    """On a new connection: SO_REUSEPORT picks a worker per connection."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url, headers={"host": host})


async def admin_json(admin: str, path: str) -> object:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"http://{admin}{path}")).json()


async def worker_requests(admin: str) -> list[int]:
    workers = await admin_json(admin, "/workers")
    assert isinstance(workers, list)
    return [w["requests"] or 0 for w in workers]


async def spread(url: str, admin: str) -> list[httpx.Response]:
    """SPREAD requests on fresh connections; both workers must have served some of them."""
    before = await worker_requests(admin)
    responses = [await fresh_get(url) for _ in range(SPREAD)]
    after = await worker_requests(admin)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    return responses


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    """Poll another process's state, bounded."""
    with trio.move_on_after(timeout):
        while not await predicate():  # noqa: ASYNC110 - another process's state: nothing to wait on
            await trio.sleep(0.1)
        return
    raise AssertionError(f"not within {timeout}s: {what}")


async def test_two_workers_are_one_sidecar_to_the_control_plane(mesh: Mesh) -> None:
    await mesh.control_plane()
    user = await mesh.sidecar("user", extra=["--workers", "2"])
    url = f"http://{user.outbound}/hello"
    counted: dict[int, int] = {}

    async def call() -> httpx.Response:
        response = await fresh_get(url)
        counted[response.status_code] = counted.get(response.status_code, 0) + 1
        return response

    async def ready() -> bool:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://{user.admin}/ready")).status_code == 200

    await wait_for(ready, "the supervisor ready")

    # item does not exist yet: each worker's lookup goes through the supervisor's session
    for _ in range(10):
        missing = await call()
        assert (missing.status_code, missing.headers["x-meshlet-error"]) == (404, "no-route"), missing.text

    # ... and once it registers, the endpoints pushed reach both workers
    item_app = await mesh.origin()
    item = await mesh.sidecar("item", app=item_app)

    async def routed() -> bool:
        return (await call()).status_code == 200

    await wait_for(routed, "item's endpoints pushed to user")
    before = await worker_requests(user.admin)
    for _ in range(SPREAD):
        assert (await call()).status_code == 200
    after = await worker_requests(user.admin)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

    # one instance, one session; the certificate both workers present proves "user" to item
    status = await admin_json(mesh.api, "/v1/status")
    assert isinstance(status, dict)
    users = [s for s in status["sidecars"] if s["service"] == "user"]
    assert len(users) == 1 and users[0]["registered"] and users[0]["connected"], users  # no app: not ready
    async with httpx.AsyncClient() as client:
        callee = (await client.get(f"http://{item.admin}/metrics")).text
        caller = (await client.get(f"http://{user.admin}/metrics")).text
    assert sample(callee, "meshlet_requests_total", direction="inbound", source="user") == counted[200]
    assert sample(callee, "meshlet_requests_total", direction="inbound", source="unauthenticated") == 0
    # the workers' counters add up to exactly what was sent
    assert sample(caller, "meshlet_requests_total", direction="outbound", code="200") == counted[200]
    assert sample(caller, "meshlet_requests_total", direction="outbound", code="404") == counted[404]
    assert sample(caller, "meshlet_control_plane_connected") == 1
    assert sample(caller, "meshlet_certificate_expiry_seconds") > 0

    # each worker sends its spans (one per call) to the control plane's store, with the session's token
    async def exported() -> bool:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://{user.admin}/metrics")).text
        assert sample(text, "meshlet_spans_dropped_total") == 0
        return sample(text, "meshlet_spans_exported_total") == counted[200]

    await wait_for(exported, "every span exported")

    # a policy is ACKed once both workers serve it: no request after the apply misses it
    await mesh.apply(ROUTE.format(tag="v1"))
    assert all(r.headers.get("x-policy") == "v1" for r in await spread(url, user.admin))
    status = await admin_json(mesh.api, "/v1/status")
    assert isinstance(status, dict)
    (session,) = [s for s in status["sidecars"] if s["service"] == "user"]
    assert session["last_answer"]["policies"] == "ack" and status["nacks_total"] == 0, session
    dump = await admin_json(user.admin, "/config_dump")
    assert isinstance(dump, dict)
    assert dump["control_plane"]["connected"] and dump["control_plane"]["nacks_sent"] == 0
    assert dump["listeners"]["admin"] == user.admin

    # kill -9 a worker, change the policy meanwhile: the new worker serves the current one
    workers = await admin_json(user.admin, "/workers")
    assert isinstance(workers, list)
    os.kill(workers[0]["pid"], signal.SIGKILL)
    await mesh.apply(ROUTE.format(tag="v2"))

    async def restarted() -> bool:
        now = await admin_json(user.admin, "/workers")
        assert isinstance(now, list)
        return bool(now[0]["ready"] and now[0]["pid"] != workers[0]["pid"])

    await wait_for(restarted, "worker 0 restarted")
    assert all(r.headers.get("x-policy") == "v2" for r in await spread(url, user.admin))

    # SIGTERM: deregistered at once, then both workers drain: requests in flight finish
    final = await admin_json(user.admin, "/workers")
    assert isinstance(final, list)
    results: list[int] = []
    delayed = item_app.stats.paths.count("/delay/2")

    async def slow() -> None:
        results.append((await fresh_get(f"http://{user.outbound}/delay/2")).status_code)

    async def arrived() -> bool:
        return item_app.stats.paths.count("/delay/2") == delayed + 6

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(slow)
        await wait_for(arrived, "the slow requests at item")
        nursery.start_soon(mesh.stop, user)
    assert results == [200] * 6
    assert user.process.returncode == 0
    assert not any(_alive(w["pid"]) for w in final)
    status = await admin_json(mesh.api, "/v1/status")
    assert isinstance(status, dict)
    assert not [s for s in status["sidecars"] if s["service"] == "user" and s["registered"]]
    assert "still in flight" not in user.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
