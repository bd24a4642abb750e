"""A listener's own limits: a new connection that sends nothing is closed after the header
timeout, and past its connection limit a listener closes new connections at once (counted,
logged once) instead of taking descriptors the other listeners need. Requests the listener
answers itself (a malformed, oversized or late head) are counted by code."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from meshlet.cli import main
from meshlet.io import ConnectionLimit, Deadlines, derived_connection_limits
from sidecar.app import serve_http
from sidecar.layers.base import Request, Response
from sidecar.net.admin import AdminHandler
from sidecar.net.downstream import Timeouts

from ...helpers import raw_exchange, run_sidecar, sample, write_static
from ...origin import Origin

LIVE = b"GET /live HTTP/1.1\r\nhost: x\r\n\r\n"


@dataclass
class Listener:
    port: int
    timeouts: Timeouts
    limit: ConnectionLimit
    clients: list[socket.socket]

    def connect(self) -> socket.socket:
        """A client connection, closed at the end of the test."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setblocking(False)
        self.clients.append(sock)
        return sock


def _handler() -> AdminHandler:
    return AdminHandler(metrics=lambda: b"", ready=lambda: (True, ""), config_dump=dict, clusters=dict)


@pytest.fixture
async def listener(nursery: trio.Nursery) -> AsyncIterator[Listener]:
    deadlines = Deadlines(tick=0.05)
    await nursery.start(deadlines.serve)
    timeouts = Timeouts(deadlines, header=0.5)
    limit = ConnectionLimit("inbound", 3)
    port = await nursery.start(partial(serve_http, "127.0.0.1", 0, _handler(), timeouts, limit=limit))
    clients: list[socket.socket] = []
    yield Listener(port, timeouts, limit, clients)
    for sock in clients:
        sock.close()


async def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    received = b""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


async def test_a_connection_that_never_sends_a_byte_is_closed_after_the_header_timeout(listener: Listener) -> None:
    quiet = listener.connect()
    talking = listener.connect()
    talking.send(LIVE)
    with trio.fail_after(5):  # the header timeout is 0.5 s; the idle timeout (300 s) must not apply
        assert await _read_until_closed(quiet) == b""  # closed without an answer: nothing was asked
    with trio.fail_after(1):
        await trio.lowlevel.wait_readable(talking)
    assert talking.recv(65536).startswith(b"HTTP/1.1 200 ")  # one that asked in time was answered
    assert listener.timeouts.expired["first-byte"] == 1


async def test_a_request_head_must_be_complete_within_the_header_timeout_of_the_accept(listener: Listener) -> None:
    slow = listener.connect()
    with trio.fail_after(5):
        for piece in (b"GET /live HTTP/1.1\r\n", b"host: x\r\n", b"a: b\r\n", b"c: d\r\n"):
            slow.send(piece)
            await trio.sleep(0.1)  # each piece in time, the head as a whole not
        await trio.sleep(0.3)
        assert (await _read_until_closed(slow)).startswith(b"HTTP/1.1 408 ")
    assert listener.timeouts.expired["request-head"] == 1
    assert listener.timeouts.rejected == {"400": 0, "408": 1, "414": 0, "431": 0, "505": 0}


async def test_past_its_limit_a_listener_closes_new_connections_at_once_and_logs_once(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshlet.listener")
    held = [listener.connect() for _ in range(3)]
    with trio.fail_after(2):
        while listener.limit.open < 3:  # noqa: ASYNC110 - the accept loop's progress
            await trio.sleep(0.01)
    refused = [listener.connect() for _ in range(5)]
    with trio.fail_after(2):
        for sock in refused:
            assert await _read_until_closed(sock) == b""
    assert listener.limit.open == 3 and listener.limit.rejected == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "limit of 3" in warnings[0].getMessage()

    for sock in held:  # room again: served as usual
        sock.close()
    with trio.fail_after(2):
        while listener.limit.open > 0:  # noqa: ASYNC110 - the connections' tasks ending
            await trio.sleep(0.01)
    fresh = listener.connect()
    fresh.send(LIVE)
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(fresh)
    assert fresh.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert listener.limit.open == 1 and listener.limit.rejected == 5


def test_default_limits_leave_descriptors_for_the_admin_listener_and_upstream_connections() -> None:
    limits = derived_connection_limits(1024)
    # Each data connection may need one upstream connection: both data listeners together,
    # doubled, plus the admin listener and a reserve, fit in the descriptor limit.
    assert 2 * (limits.inbound + limits.outbound) + limits.admin < 1024
    assert limits.inbound == limits.outbound >= 100
    assert limits.admin >= 16
    tiny = derived_connection_limits(64)  # too few descriptors: still serves a few
    assert tiny.inbound >= 1 and tiny.outbound >= 1 and tiny.admin >= 1
    huge = derived_connection_limits(1 << 20)
    assert huge.inbound <= 20_000  # memory, not descriptors, bounds it then


async def test_a_first_request_may_take_longer_than_the_header_timeout(nursery: trio.Nursery) -> None:
    """The header deadline covers the head only: once it is in, the idle timeout applies."""
    deadlines = Deadlines(tick=0.05)
    await nursery.start(deadlines.serve)
    admin = _handler()

    async def slow(request: Request) -> Response:
        await trio.sleep(1.0)
        return await admin(request)

    port = await nursery.start(partial(serve_http, "127.0.0.1", 0, slow, Timeouts(deadlines, header=0.3)))
    with trio.fail_after(5):
        answer = await raw_exchange(port, LIVE, read_until_close=False)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_limit_below_one_is_refused_as_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["sidecar", "--service", "a", "--app", "127.0.0.1:1", "--static", "x", "--max-admin-connections", "0"])
    assert exited.value.code == 2
    assert "--max-admin-connections 0: at least 1" in capsys.readouterr().err


async def test_requests_a_listener_rejects_itself_are_counted_by_listener_and_code(
    tmp_path: Path, origin: Origin
) -> None:
    """They never reach the request path, so meshlet_requests_total cannot see them."""
    static = write_static(tmp_path / "s.yaml", {})
    malformed = b"GET /hello HTTP/1.1\r\nhost: item\r\nno colon here\r\n\r\n"
    oversized = b"GET /hello HTTP/1.1\r\nhost: item\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
    async with run_sidecar(tmp_path, service="item", app=f"127.0.0.1:{origin.port}", static=static) as sidecar:
        inbound, outbound = sidecar.ports["inbound"], sidecar.ports["outbound"]
        with trio.fail_after(15):
            assert (await raw_exchange(inbound, malformed)).startswith(b"HTTP/1.1 400 ")
            assert (await raw_exchange(inbound, malformed)).startswith(b"HTTP/1.1 400 ")
            assert (await raw_exchange(inbound, oversized)).startswith(b"HTTP/1.1 431 ")
            assert (await raw_exchange(outbound, oversized)).startswith(b"HTTP/1.1 431 ")
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
    name = "meshlet_downstream_requests_rejected_total"
    assert sample(metrics, name, listener="inbound", code="400") == 2
    assert sample(metrics, name, listener="inbound", code="431") == 1
    assert sample(metrics, name, listener="outbound", code="431") == 1
    assert sample(metrics, name, listener="outbound", code="400") == 0
    assert sample(metrics, name) == 4
    assert sample(metrics, "meshlet_requests_total") == 0  # as before: the request path saw none of them
