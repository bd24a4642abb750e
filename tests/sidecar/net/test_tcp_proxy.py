"""Opaque TCP's trio shell (sidecar/net/tcp_proxy.py) on real loopback sockets: a dead
endpoint skipped, a reset passed on, the idle timeout, an AccessPolicy per connection.
Plaintext here; mTLS and half-close between real sidecars: tests/integration/test_tcp.py."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from meshlet.access import AccessTable
from meshlet.io import Closed, Connection, Deadlines, listen_socket, serve_socket
from meshlet.policy import load_documents
from meshlet.schema import AccessPolicy
from sidecar.core.destination import Destinations, Settings
from sidecar.core.services import Endpoint, ServiceConfig
from sidecar.core.tcp import TcpStats
from sidecar.net.tcp_proxy import TcpProxy

BOUND = 5.0  # every wait here ends within this, or the test fails


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def listening(handler: Callable[[Connection], Awaitable[None]]) -> AsyncIterator[int]:
    """``handler`` serving each connection to a port of its own, until the block ends; yields the port."""
    sock = listen_socket("127.0.0.1", 0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_socket, sock, handler, nursery)
            yield sock.getsockname()[1]
            nursery.cancel_scope.cancel()
    finally:
        sock.close()


async def echo(io: Connection) -> None:
    try:
        while data := await io.recv():
            await io.send_all(data)
    finally:
        io.close()


def proxy_for(deadlines: Deadlines, *ports: int, idle: float = 3600.0) -> TcpProxy:
    service = ServiceConfig("db", tuple(Endpoint("127.0.0.1", p, protocol="tcp") for p in ports), protocol="tcp")
    destinations = Destinations()
    # Round robin: the dead endpoint gets its turns, whatever the latencies say.
    destinations.configure({"db": service}, {("db", None): Settings(load_balancer="round_robin")}, {}, 0.0)
    proxy = TcpProxy("user", destinations, deadlines, TcpStats(), idle_timeout=idle)
    proxy.use({"db": service}, None)
    return proxy


@asynccontextmanager
async def front(proxy: TcpProxy) -> AsyncIterator[int]:
    """A listener whose connections go to service db through ``proxy``."""

    async def accept(io: Connection) -> None:
        try:
            await proxy.outbound(io, "db")
        finally:
            io.close()

    async with listening(accept) as port:
        yield port


async def round_trip(port: int, data: bytes) -> bytes:
    with trio.fail_after(BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            await stream.send_eof()
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received


async def test_a_dead_endpoint_is_skipped_and_counted_against_it(nursery: trio.Nursery) -> None:
    deadlines = Deadlines(tick=0.01)
    await nursery.start(deadlines.serve)
    async with listening(echo) as alive:
        dead = dead_port()
        proxy = proxy_for(deadlines, dead, alive)
        async with front(proxy) as port:
            for i in range(6):
                assert await round_trip(port, b"ping %d" % i) == b"ping %d" % i
    stats = proxy.stats
    assert stats.connections == {("outbound", "user", "db", "ok"): 6}
    assert stats.bytes[("outbound", "user", "db", "received")] == 6 * len(b"ping 0")
    assert stats.open["outbound"] == 0
    destination = proxy.destinations.get("db", None, deadlines.clock())
    breaker = destination.breaker.snapshot(deadlines.clock())
    assert breaker["failures"] >= 2 and breaker["calls"] == 6 + breaker["failures"]  # its turns failed, then retried


async def test_a_reset_of_the_server_resets_the_client(nursery: trio.Nursery) -> None:
    async def resets(io: Connection) -> None:
        await io.recv()
        io.reset()

    deadlines = Deadlines(tick=0.01)
    await nursery.start(deadlines.serve)
    async with listening(resets) as server:
        proxy = proxy_for(deadlines, server)
        async with front(proxy) as port:
            with trio.fail_after(BOUND):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"hello")
                try:
                    assert await stream.receive_some(10) == b""
                except trio.BrokenResourceError:
                    pass  # the reset itself
                await stream.aclose()
                while proxy.stats.open["outbound"]:  # noqa: ASYNC110 - the proxy's side ends too (a count)
                    await trio.sleep(0.01)
    assert proxy.stats.connections == {("outbound", "user", "db", "reset"): 1}


async def test_a_connection_quiet_past_the_idle_timeout_is_reset(nursery: trio.Nursery) -> None:
    async def holds(io: Connection) -> None:
        try:
            await io.recv()  # never sends: waits until the proxy resets it
        except Closed:
            pass
        finally:
            io.close()

    deadlines = Deadlines(tick=0.01)
    await nursery.start(deadlines.serve)
    async with listening(holds) as server:
        proxy = proxy_for(deadlines, server, idle=0.1)
        async with front(proxy) as port:
            with trio.fail_after(BOUND):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                try:
                    assert await stream.receive_some(10) == b""
                except trio.BrokenResourceError:
                    pass
                await stream.aclose()
                while proxy.stats.open["outbound"]:  # noqa: ASYNC110 - a count, bounded by fail_after
                    await trio.sleep(0.01)
    assert proxy.stats.connections == {("outbound", "user", "db", "idle-timeout"): 1}


DENY = """\
kind: AccessPolicy
name: db-callers
service: db
rules:
  - sources: [billing]
  - sources: [user]
    methods: [GET]
"""


async def test_an_access_policy_refuses_a_caller_per_connection(nursery: trio.Nursery) -> None:
    (policy,) = load_documents([("a.yaml", DENY)])
    assert isinstance(policy, AccessPolicy)
    deadlines = Deadlines(tick=0.01)
    await nursery.start(deadlines.serve)
    async with listening(echo) as app_port:
        proxy = TcpProxy("db", Destinations(), deadlines, TcpStats())
        proxy.use({}, AccessTable(policy))
        app = Endpoint("127.0.0.1", app_port, protocol="tcp")
        for caller, expected in (("billing", b"hi"), ("user", b"")):

            async def accept(io: Connection, caller: str = caller) -> None:
                try:
                    await proxy.inbound(io, caller, app)
                finally:
                    io.close()

            async with listening(accept) as port:
                try:
                    assert await round_trip(port, b"hi") == expected
                except trio.BrokenResourceError:
                    assert expected == b""  # reset at once
    assert proxy.stats.connections == {
        ("inbound", "billing", "db", "ok"): 1,
        ("inbound", "user", "db", "denied"): 1,
    }
