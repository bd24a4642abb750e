"""The upstream pool's bookkeeping with a fake clock: reuse, idle expiry, bounds; and a
request past the pool's connection cap, which waits a bounded time for a connection."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from meshlet.io import Deadlines
from sidecar.app import build_inbound
from sidecar.core import errors
from sidecar.core.errors import MeshError
from sidecar.core.services import Endpoint
from sidecar.net import upstream
from sidecar.net.downstream import Timeouts
from sidecar.net.listeners import serve_http
from sidecar.net.upstream import EndpointPool, Forwarder, UpstreamPools
from sidecar.telemetry import Telemetry, render
from tests.helpers import raw_exchange, sample


async def _serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    """A TCP server on 127.0.0.1 handling each connection with ``handler``; returns its port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def _hold(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


@pytest.fixture
async def listener(nursery: trio.Nursery) -> int:
    """A TCP server that accepts and holds connections open; returns its port."""
    return await _serve(nursery, _hold)


async def test_released_connection_is_reused_then_expires(
    listener: int, autojump_clock: trio.testing.MockClock
) -> None:
    pool = EndpointPool(Endpoint("127.0.0.1", listener), idle_timeout=60)
    conn, reused = await pool.acquire(1.0)
    assert not reused and pool.connects == 1
    pool.release(conn, reusable=True)
    again, reused = await pool.acquire(1.0)
    assert reused and again is conn and pool.connects == 1
    pool.release(again, reusable=True)
    await trio.sleep(59)
    assert pool.expire_idle(trio.current_time()) == 0
    await trio.sleep(2)
    assert pool.expire_idle(trio.current_time()) == 1
    assert not pool.idle
    fresh, reused = await pool.acquire(1.0)
    assert not reused and pool.connects == 2
    pool.release(fresh, reusable=False)  # broken: closed, never pooled
    assert not pool.idle and pool.active == 0


async def test_idle_connection_past_timeout_is_not_handed_out(
    listener: int, autojump_clock: trio.testing.MockClock
) -> None:
    pool = EndpointPool(Endpoint("127.0.0.1", listener), idle_timeout=10)
    conn, _ = await pool.acquire(1.0)
    pool.release(conn, reusable=True)
    await trio.sleep(11)  # the sweeper has not run: acquire itself must skip the stale one
    other, reused = await pool.acquire(1.0)
    assert not reused and other is not conn
    pool.release(other, reusable=False)


@pytest.fixture
async def closing_listener(nursery: trio.Nursery) -> int:
    """A TCP server that closes each connection as soon as it is accepted."""
    return await _serve(nursery, trio.SocketStream.aclose)


async def test_a_connection_the_peer_closed_while_idle_is_checked_once_past_the_recheck_delay(
    closing_listener: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a connection goes back to work microseconds after its release: then the
    poll for a close is skipped. Past RECHECK_AFTER it is polled, and a closed one is dropped."""
    now = [1000.0]
    monkeypatch.setattr(upstream, "monotonic", lambda: now[0])
    pool = EndpointPool(Endpoint("127.0.0.1", closing_listener))
    conn, _ = await pool.acquire(1.0)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(conn.io.sock)  # the peer's FIN
    assert conn.io.sock.recv(1, socket.MSG_PEEK) == b""
    pool.release(conn, reusable=True)
    now[0] += upstream.RECHECK_AFTER / 2
    again, reused = await pool.acquire(1.0)
    assert reused and again is conn  # not checked: the exchange finds the close (and resends if it may)
    pool.release(again, reusable=True)
    now[0] += 2 * upstream.RECHECK_AFTER
    fresh, reused = await pool.acquire(1.0)
    assert not reused and fresh is not conn and conn.io.closed and pool.connects == 2
    pool.release(fresh, reusable=False)


async def test_connections_are_bounded(listener: int, autojump_clock: trio.testing.MockClock) -> None:
    pool = EndpointPool(Endpoint("127.0.0.1", listener), max_connections=2, max_idle=1)
    first, _ = await pool.acquire(1.0)
    second, _ = await pool.acquire(1.0)
    with trio.fail_after(30), pytest.raises(MeshError):
        await pool.acquire(1.0)  # a third waits for a slot, for the connect timeout
    pool.release(first, reusable=True)
    pool.release(second, reusable=True)  # max_idle 1: this one is closed, its slot freed
    assert len(pool.idle) == 1
    third, reused = await pool.acquire(1.0)
    assert reused and third is first
    pool.release(third, reusable=True)
    pool.close_all()
    assert pool.active == 0 and not pool.idle


async def test_connect_refused_is_connect_failed() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = EndpointPool(Endpoint("127.0.0.1", port))
    with pytest.raises(MeshError) as info:
        await pool.acquire(1.0)
    assert info.value.reason.name == "connect-failed"
    assert pool.errors == 1 and pool.active == 0


async def test_past_max_connections_a_request_waits_the_connect_timeout_then_is_overloaded(
    listener: int, autojump_clock: trio.testing.MockClock
) -> None:
    pool = EndpointPool(Endpoint("127.0.0.1", listener), max_connections=1)
    busy, _ = await pool.acquire(1.0)
    started = trio.current_time()
    with trio.fail_after(30):  # without a bound of its own, the wait lasted until a slot came free
        with pytest.raises(MeshError) as info:
            await pool.acquire(2.5)
    assert info.value.reason is errors.OVERLOADED
    assert trio.current_time() - started == pytest.approx(2.5)  # the fake clock: exactly the bound
    assert pool.overflows == 1 and pool.active == 1 and pool.errors == 0
    pool.release(busy, reusable=False)
    fresh, reused = await pool.acquire(1.0)  # the slot came back; the overflow took none
    assert not reused and pool.active == 1
    pool.release(fresh, reusable=False)


async def test_a_connection_freed_while_a_request_waits_is_handed_to_it(
    listener: int, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    pool = EndpointPool(Endpoint("127.0.0.1", listener), max_connections=1)
    busy, _ = await pool.acquire(1.0)

    async def finish_soon() -> None:
        await trio.sleep(0.5)
        pool.release(busy, reusable=True)

    nursery.start_soon(finish_soon)
    conn, reused = await pool.acquire(1.0)
    assert reused and conn is busy and pool.overflows == 0
    pool.release(conn, reusable=False)


async def test_a_request_that_gives_up_waiting_leaves_the_line_and_no_slot_is_lost(
    listener: int, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    pool = EndpointPool(Endpoint("127.0.0.1", listener), max_connections=1)
    busy, _ = await pool.acquire(1.0)
    got: list[object] = []

    async def impatient() -> None:
        with trio.move_on_after(0.2):  # e.g. its client went away
            got.append(await pool.acquire(10.0))

    async def patient() -> None:
        got.append(await pool.acquire(10.0))

    nursery.start_soon(impatient)
    await trio.sleep(0.1)
    nursery.start_soon(patient)
    await trio.sleep(1)
    assert got == []  # both waited; the impatient one left without a trace
    pool.release(busy, reusable=True)
    await trio.sleep(0.1)
    assert got == [(busy, True)] and pool.overflows == 0
    pool.release(busy, reusable=False)
    assert pool.open == 0 and pool.active == 0


async def test_an_inbound_request_past_the_pool_cap_gets_503_overloaded(nursery: trio.Nursery) -> None:
    """No bulkhead stands before the app's pool on the inbound side: a request that finds
    every connection to the app busy waits the connect timeout (1 s), then is answered."""
    accepted = trio.Event()

    async def slow_app(stream: trio.SocketStream) -> None:
        accepted.set()
        await trio.sleep_forever()  # reads nothing, answers nothing

    app_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, slow_app, app_listeners)
    app = Endpoint("127.0.0.1", app_listeners[0].socket.getsockname()[1])
    deadlines = Deadlines(tick=0.05)
    await nursery.start(deadlines.serve)
    pools = UpstreamPools(max_connections=1)
    telemetry = Telemetry()
    handler = build_inbound(app, Forwarder(pools, deadlines), telemetry, "item")

    port = await nursery.start(serve_http, "127.0.0.1", 0, handler, Timeouts(deadlines))
    first = await trio.open_tcp_stream("127.0.0.1", port)
    await first.send_all(b"GET /slow HTTP/1.1\r\nhost: item\r\n\r\n")
    with trio.fail_after(5):
        await accepted.wait()  # the first request holds the only connection to the app
    answer = await raw_exchange(port, b"GET /next HTTP/1.1\r\nhost: item\r\nconnection: close\r\n\r\n", timeout=5)
    await first.aclose()
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"x-meshlet-error: overloaded" in answer
    assert pools.get(app, "item").overflows == 1
    telemetry.pool_overflow_stats = pools.overflow_stats  # as the sidecar wires it
    metrics = render(lambda: [telemetry.snapshot()]).decode()
    assert sample(metrics, "meshlet_upstream_pool_overflow_total", destination="item", endpoint=app.address) == 1
    overloaded = {labels: n for labels, n in telemetry.requests.items() if labels[5] == "overloaded"}
    assert list(overloaded.values()) == [1] and next(iter(overloaded))[4] == "503"
