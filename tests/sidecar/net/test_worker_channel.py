"""The private channel between a --workers supervisor and a worker it feeds
(sidecar/net/worker_channel.py), over a real socket pair: a configuration applied (with its
credentials and collector) and answered, one refused with why, lookups answered in order,
the supervisor's end closing, and frames a worker must not accept."""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack
import pytest
import trio

from meshlet import wire
from sidecar.core import errors
from sidecar.core.config import MeshSnapshot
from sidecar.core.credentials import CredentialHolder
from sidecar.core.discovered import PushedConfig
from sidecar.core.errors import MeshError
from sidecar.net.worker_channel import (
    MAX_FRAME,
    Channel,
    ChannelError,
    SupervisorLink,
    credentials_message,
    encode,
)

from ...certs import TestCA

ITEM = [wire.endpoint("item-1", "127.0.0.1:9001")]
STATIC = "services:\n  cart: [127.0.0.1:9002]\n"
CREDENTIALS = credentials_message(TestCA().credentials("user"))


def _pushed() -> dict[str, Any]:
    config = PushedConfig()
    config.apply(wire.Push(wire.ENDPOINTS, "v1", "n1", (wire.Resource("item", wire.content_version(ITEM), ITEM),)))
    return config.to_json()


def _config(seq: int, **changes: Any) -> dict[str, Any]:
    message = {
        "t": "config",
        "seq": seq,
        "source": "control-plane",
        "pushed": _pushed(),
        "static": STATIC,
        "static_name": "mesh.yaml",
        "collector": ["http://127.0.0.1:9/api/v2/spans", "span-token"],
        "credentials": CREDENTIALS,
    }
    return {**message, **changes}


def _link() -> tuple[Channel, SupervisorLink, list[MeshSnapshot], CredentialHolder]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    applied: list[MeshSnapshot] = []
    holder = CredentialHolder()
    return Channel.of(ours), SupervisorLink(theirs.detach(), holder, applied.append), applied, holder


async def test_a_configuration_is_applied_with_its_credentials_and_collector_and_answered() -> None:
    supervisor, link, applied, holder = _link()
    await supervisor.send(encode(_config(1)))
    await link.receive_first()
    assert [sorted(s.services) for s in applied] == [["cart", "item"]]  # pushed and static
    assert holder.current is not None and holder.current.service == "user" and holder.generation == 1
    assert link.collector is not None and link.collector.token == "span-token"
    assert await supervisor.receive() == {"t": "applied", "seq": 1}

    async with trio.open_nursery() as nursery:
        drained = trio.Event()

        async def drain() -> None:
            drained.set()

        nursery.start_soon(link.serve, drain)
        await supervisor.send(encode(_config(2)))  # the same credentials: the TLS contexts stay
        assert await supervisor.receive() == {"t": "applied", "seq": 2}
        assert holder.generation == 1 and len(applied) == 2
        await supervisor.send(encode(_config(3, pushed={"store": "not a store id"})))
        refused = await supervisor.receive()
        assert refused is not None and (refused["t"], refused["seq"]) == ("refused", 3)
        assert "store" in refused["reason"] and len(applied) == 2  # the last good one serves on
        await supervisor.send(encode({"t": "drain"}))
        await drained.wait()
    await _close(supervisor, link)


async def test_lookups_go_to_the_supervisor_and_end_with_it() -> None:
    supervisor, link, _, _ = _link()
    await supervisor.send(encode(_config(1)))
    await link.receive_first()
    await supervisor.receive()
    outcomes: dict[str, str] = {}

    async def look_up(service: str) -> None:
        try:
            await link.discover(service)
            outcomes[service] = "found"
        except MeshError as exc:
            outcomes[service] = exc.reason.name

    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.serve, trio.lowlevel.checkpoint)
        for service in ("shop", "gone", "later"):
            nursery.start_soon(look_up, service)
        asked = {(await supervisor.receive() or {}).get("service") for _ in range(3)}
        assert asked == {"shop", "gone", "later"}
        await supervisor.send(encode({"t": "discovered", "service": "shop", "reason": "", "detail": ""}))
        gone = {"t": "discovered", "service": "gone", "reason": "no-route", "detail": "no service named 'gone'"}
        await supervisor.send(encode(gone))
        with trio.fail_after(5):
            while len(outcomes) < 2:  # noqa: ASYNC110 - the link's task answers them
                await trio.sleep(0.01)
        await supervisor.aclose()  # the supervisor is gone: the lookup left fails, the worker drains
    assert outcomes == {"shop": "found", "gone": "no-route", "later": errors.NO_HEALTHY_ENDPOINTS.name}
    await _close(supervisor, link)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (struct.pack(">I", MAX_FRAME + 1), "frame of"),
        (encode({"t": 1}), "not a message"),
        (struct.pack(">I", 3) + msgpack.packb([1, 2]), "not a message"),
        (struct.pack(">I", 1) + b"\xc1", "not msgpack"),
    ],
)
async def test_a_frame_that_breaks_the_rules_ends_the_channel(frame: bytes, why: str) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = Channel.of(ours), Channel.of(theirs)
    await sender.send(frame)
    with pytest.raises(ChannelError, match=why):
        await receiver.receive()
    await sender.aclose()
    await receiver.aclose()


@pytest.mark.parametrize(
    ("first", "why"),
    [({"t": "drain"}, "no configuration"), (_config(1, pushed={"store": "not a store id"}), "refused")],
)
async def test_a_worker_without_a_configuration_does_not_start(first: dict[str, Any], why: str) -> None:
    supervisor, link, applied, _ = _link()
    await supervisor.send(encode(first))
    with pytest.raises(ChannelError, match=why):
        await link.receive_first()
    assert applied == []
    await _close(supervisor, link)


async def _close(supervisor: Channel, link: SupervisorLink) -> None:
    await supervisor.aclose()
    if link.channel is not None:
        await link.channel.aclose()
