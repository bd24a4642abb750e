"""The sidecar's session moves through its control-plane addresses (sidecar/net/control.py):
a session ended after its maximum age (``session-age``) is no failure: the next address,
at once (a small jitter, no backoff); one that ends before any push counts as a failure.
Two fake control planes on 127.0.0.1, plaintext."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing

from meshlet import wire
from sidecar.net.control import AGED_RECONNECT_JITTER, BACKOFF_FIRST, ControlPlaneClient, InstanceInfo

ITEM = [wire.endpoint("item-1", "127.0.0.1:9001")]


class Recorded(random.Random):
    """Records the bound of every jittered wait, and waits none."""

    def __init__(self) -> None:
        super().__init__(0)
        self.bounds: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append(b)
        return a


@dataclass
class FakeControlPlane:
    """Welcomes a sidecar (once ``hold`` is set, if given), pushes one endpoint set (unless
    ``push`` is False), then, if ``end`` is True, tells it its session reached its maximum
    age; answers lookups (``watch``) with one endpoint each until the sidecar closes."""

    push: bool
    end: bool
    hold: trio.Event | None = None
    hello: trio.Event = field(default_factory=trio.Event)
    sessions: int = 0
    acked: int = 0
    connected: trio.Event = field(default_factory=trio.Event)
    closed_by_sidecar: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.sessions += 1
        conn = wire.ServerConnection("fake")
        while conn.hello is None:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
        self.hello.set()
        if self.hold is not None:
            await self.hold.wait()
        conn.choose_version()
        await stream.send_all(conn.accept())
        if self.push:
            resource = wire.Resource("item", wire.content_version(ITEM), ITEM)
            await stream.send_all(conn.push(wire.ENDPOINTS, "v1", (resource,), full=True)[1])
        else:
            await self._connected(stream)
        while data := await stream.receive_some(65536):  # until the sidecar closes
            for message in conn.receive_data(data):
                if isinstance(message, wire.Ack) and not self.acked:
                    self.acked += 1
                    await self._connected(stream)
                elif isinstance(message, wire.Watch):
                    found = {name: [wire.endpoint(f"{name}-1", "127.0.0.1:9002")] for name in message.add}
                    resources = tuple(wire.Resource(n, wire.content_version(b), b) for n, b in found.items())
                    await stream.send_all(conn.push(wire.ENDPOINTS, "v2", resources)[1])
        self.closed_by_sidecar.set()

    async def _connected(self, stream: trio.SocketStream) -> None:
        """The session is up (its first push answered, if any): say so, then end it if told to."""
        self.connected.set()
        if self.end:
            await stream.send_all(wire.encode(wire.Error(wire.SESSION_AGE, "the session reached its maximum age")))


async def _client_between(
    nursery: trio.Nursery, a: FakeControlPlane, b: FakeControlPlane, rng: Recorded
) -> ControlPlaneClient:
    """A client given A's address, then B's; both served in ``nursery``."""
    ports = []
    for fake in (a, b):
        listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
        ports.append(listeners[0].socket.getsockname()[1])
    return ControlPlaneClient(
        [("127.0.0.1", port) for port in ports],
        InstanceInfo("user", "user-1", "127.0.0.1:2", "127.0.0.1:3"),
        lambda snapshot: None,
        rng=rng,
    )


async def test_a_session_ended_for_its_age_reconnects_to_the_next_address_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "meshlet.control")
    a, b = FakeControlPlane(push=True, end=True), FakeControlPlane(push=True, end=False)
    rng = Recorded()
    async with trio.open_nursery() as nursery:
        client = await _client_between(nursery, a, b, rng)
        nursery.start_soon(client.serve)
        with trio.fail_after(10):
            await b.connected.wait()
        assert (a.sessions, a.acked, b.sessions) == (1, 1, 1)
        assert rng.bounds == [AGED_RECONNECT_JITTER]  # no backoff: only the small jitter
        assert client.last_error == "" and client.connected
        with trio.fail_after(10):
            await a.closed_by_sidecar.wait()  # the sidecar closed its end, as told
        nursery.cancel_scope.cancel()
    aged = [r for r in caplog.records if "maximum age" in r.getMessage()]
    assert [r.levelno for r in aged] == [logging.INFO]
    assert f"reconnecting to {client.addresses[1][0]}:{client.addresses[1][1]}" in aged[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_session_age_ending_before_any_push_is_a_failure_with_backoff() -> None:
    """Else a control plane could make a sidecar reconnect in a loop."""
    a, b = FakeControlPlane(push=False, end=True), FakeControlPlane(push=True, end=False)
    rng = Recorded()
    async with trio.open_nursery() as nursery:
        client = await _client_between(nursery, a, b, rng)
        nursery.start_soon(client.serve)
        with trio.fail_after(10):
            await b.connected.wait()
        assert rng.bounds == [BACKOFF_FIRST]
        assert wire.SESSION_AGE in client.last_error
        nursery.cancel_scope.cancel()


async def test_a_lookup_in_the_moment_between_two_sessions_waits_for_the_next() -> None:
    """An ending for age is planned: a request to a service not looked up yet is not failed
    for it (503 "the control plane is unreachable"), it waits for the next session."""
    a = FakeControlPlane(push=True, end=True)
    b = FakeControlPlane(push=True, end=False, hold=trio.Event())
    async with trio.open_nursery() as nursery:
        client = await _client_between(nursery, a, b, Recorded())
        nursery.start_soon(client.serve)
        with trio.fail_after(10):
            await b.hello.wait()  # A ended the session; B holds its welcome back
        assert not client.connected
        found = trio.Event()

        async def lookup() -> None:
            await client.discover("pay")  # MeshError (no-healthy-endpoints) fails the test
            found.set()

        nursery.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        assert not found.is_set()  # waiting, not failed
        b.hold.set()  # type: ignore[union-attr]
        with trio.fail_after(10):
            await found.wait()
        assert "pay" in client.config.discovered.endpoints
        nursery.cancel_scope.cancel()
