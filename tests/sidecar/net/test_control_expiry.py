"""A certificate that expires while nothing else changes: the registry hears that the sidecar
is not ready any more (peers would refuse its certificate), within a probe interval."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from meshlet import wire
from sidecar.net.control import ControlPlaneClient, InstanceInfo
from sidecar.net.health import HEALTH_INTERVAL


class Identity:
    """What the session asks of sidecar/net/identity.py here: is the certificate unusable?"""

    def __init__(self) -> None:
        self.expired = False

    def not_ready(self) -> bool:
        return self.expired


class Health:
    ready = True  # the app answers its probe all along


async def test_an_expired_certificate_is_reported_without_a_probe_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    identity = Identity()
    client = ControlPlaneClient(
        [("127.0.0.1", 1)],
        InstanceInfo("item", "item-1", "127.0.0.1:2", "127.0.0.1:3"),
        lambda snapshot: None,
        identity=identity,  # type: ignore[arg-type]
    )
    client.health = Health()  # type: ignore[assignment]
    client.has_config = client.connected = True
    sent: list[wire.Message] = []

    async def send(stream: Any, data: bytes) -> None:
        sent.extend(wire.FrameDecoder(wire.UPSTREAM_KINDS).feed(data))

    client._stream = object()  # type: ignore[assignment]
    client._send = send  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._report_expiry)
        await client._report_readiness()
        await trio.sleep(3 * HEALTH_INTERVAL)
        assert sent == [wire.Health(True)]  # said once: nothing changed since
        identity.expired = True
        await trio.sleep(HEALTH_INTERVAL + 0.1)
        assert sent == [wire.Health(True), wire.Health(False)]
        nursery.cancel_scope.cancel()
