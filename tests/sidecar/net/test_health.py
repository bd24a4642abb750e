"""The app's health probe (sidecar/net/health.py), answered without a socket, on trio's
mock clock."""

from __future__ import annotations

import trio
import trio.testing

from sidecar.net.health import HEALTH_INTERVAL, AppHealth
from sidecar.net.poster import PostError


class Answers:
    """A client that answers each GET with the next status (or raises the next PostError)."""

    def __init__(self, answers: list[int | PostError]) -> None:
        self.answers = iter(answers)
        self.urls: list[str] = []
        self.closed = False

    async def get(self, url: str) -> int:
        self.urls.append(url)
        outcome = next(self.answers)
        if isinstance(outcome, PostError):
            raise outcome
        return outcome

    async def aclose(self) -> None:
        self.closed = True


async def test_the_probe_reports_each_change_once(autojump_clock: trio.testing.MockClock) -> None:
    client = Answers([200, 404, 503, 503, PostError("refused"), 204])
    seen: list[bool] = []
    health = AppHealth("http://app/healthz", client=client)
    assert not health.ready  # until a probe says so

    async def changed() -> None:
        seen.append(health.ready)
        if len(seen) == 3:  # every answer given
            health.stop()

    with trio.fail_after(10 * HEALTH_INTERVAL):
        await health.serve(changed)
    # ready (200, and 404: the app is up), not ready (503, no answer), ready again
    assert seen == [True, False, True]
    assert client.urls == ["http://app/healthz"] * 6 and client.closed


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


async def test_an_http_app_is_probed_with_a_get_over_http1(nursery: trio.Nursery) -> None:
    """The default client (sidecar/net/poster.py), on a real socket: a GET of the health path."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    heads: list[bytes] = []

    async def answer(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some(4096)
            if not data:
                return
            received += data
        heads.append(received.split(b"\r\n")[0])
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    nursery.start_soon(trio.serve_listeners, answer, listeners)
    assert await _one_change(AppHealth(f"http://127.0.0.1:{port}/health z"))  # 404: up, so ready
    assert heads == [b"GET /health%20z HTTP/1.1"]
