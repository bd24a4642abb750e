"""The app's health probe (sidecar/net/health.py), answered without a socket, on trio's
mock clock."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from sidecar.net.health import HEALTH_INTERVAL, AppHealth


async def test_the_probe_reports_each_change_once(autojump_clock: trio.testing.MockClock) -> None:
    answers = iter([200, 404, 503, 503, httpx.ConnectError("refused"), 204])
    seen: list[bool] = []

    def answer(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == "http://app/healthz"
        outcome = next(answers)
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome)

    health = AppHealth("http://app/healthz", transport=httpx.MockTransport(answer))
    assert not health.ready  # until a probe says so

    async def changed() -> None:
        seen.append(health.ready)
        if len(seen) == 3:  # every answer given
            health.stop()

    with trio.fail_after(10 * HEALTH_INTERVAL):
        await health.serve(changed)
    # ready (200, and 404: the app is up), not ready (503, no answer), ready again
    assert seen == [True, False, True]


async def _one_change(health: AppHealth) -> bool:
    """The first answer (a change from 'not ready' when ready), then stop."""
    seen: list[bool] = []
    with trio.move_on_after(3 * HEALTH_INTERVAL) as scope:

        async def changed() -> None:
            seen.append(health.ready)
            scope.cancel()  # not stop(): serve would sleep an interval before it looks

        await health.serve(changed)
    return seen == [True]


async def test_an_http2_app_is_probed_over_http2(nursery: trio.Nursery) -> None:
    """An app declared http2 may speak nothing else (h2c, prior knowledge): the GET goes
    over HTTP/2 to its health path."""
    from tests.h2_server import H2Server, ServerStream

    paths: list[bytes | None] = []

    async def answer(stream: ServerStream) -> None:
        paths.append(stream.field(b":path"))
        await stream.respond(200, end=True)

    server = H2Server(answer)
    port = await server.start(nursery)
    assert await _one_change(AppHealth(f"h2c://127.0.0.1:{port}/healthz"))
    assert paths == [b"/healthz"]


async def test_a_grpc_app_is_probed_by_a_connect(nursery: trio.Nursery) -> None:
    """A gRPC server answers no plain GET: accepting the connection is its health."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[int] = []

    async def count(stream: trio.SocketStream) -> None:
        accepted.append(1)
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, count, listeners)
    assert await _one_change(AppHealth(f"tcp://127.0.0.1:{port}"))
    assert accepted == [1]
