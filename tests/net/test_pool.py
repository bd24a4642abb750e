"""The upstream pool's bookkeeping with a fake clock: reuse, idle expiry, bounds."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sidecar.core.config import Endpoint
from sidecar.core.errors import MeshError
from sidecar.net.upstream import EndpointPool


@pytest.fixture
async def listener(nursery: trio.Nursery) -> int:
    """A TCP server that accepts and holds connections open; returns its port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    return listeners[0].socket.getsockname()[1]


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


async def test_connections_are_bounded(listener: int, autojump_clock: trio.testing.MockClock) -> None:
    pool = EndpointPool(Endpoint("127.0.0.1", listener), max_connections=2, max_idle=1)
    first, _ = await pool.acquire(1.0)
    second, _ = await pool.acquire(1.0)
    with trio.move_on_after(5) as scope:
        await pool.acquire(1.0)  # a third waits for a slot
    assert scope.cancelled_caught
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
