"""A push-channel connection that says no hello within 5 s is closed, counted
(meshlet_cp_hello_timeouts_total) and, the first of a burst, logged: before, it went silently,
and a cold start that lost sessions this way left no trace on the control plane."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
import trio.testing

from control_plane.registry import Registry
from control_plane.server import HELLO_TIMEOUT, PushServer
from meshlet import wire
from tests.helpers import in_process_joins


async def started(nursery: trio.Nursery) -> tuple[PushServer, int, str]:
    joins, token = in_process_joins()
    push = PushServer(Registry(), joins=joins)
    port = await nursery.start(push.serve, "127.0.0.1", 0)
    return push, port, token


async def until(check: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not check():
            await trio.lowlevel.checkpoint()


def hello(token: str) -> wire.ClientConnection:
    return wire.ClientConnection(
        wire.Hello(
            (2,), "n-1", "item", {"instance_id": "i-1", "address": "127.0.0.1:9", "admin": "127.0.0.1:9"}, token=token
        )
    )


async def messages_until_close(stream: trio.SocketStream, conn: wire.ClientConnection) -> list[wire.Message]:
    got: list[wire.Message] = []
    with trio.fail_after(5):
        while data := await stream.receive_some():
            got += conn.receive_data(data)
            if any(isinstance(m, wire.Welcome) for m in got):
                break
    return got


async def test_a_silent_connection_is_closed_and_counted(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    push, port, token = await started(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await until(lambda: push.connections == 1)
    mock_clock.jump(HELLO_TIMEOUT + 1)
    await until(lambda: push.connections == 0)
    with trio.fail_after(5):
        assert await stream.receive_some() == b""  # closed, nothing said
    assert push.hello_timeouts.count == 1
    assert [r.getMessage() for r in caplog.records if "no hello within 5 s" in r.getMessage()] != []
    await stream.aclose()
    # a hello in time is welcome, and not counted
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = hello(token)
    await stream.send_all(conn.hello())
    assert any(isinstance(m, wire.Welcome) for m in await messages_until_close(stream, conn))
    assert push.hello_timeouts.count == 1
    await stream.aclose()
