"""The control plane trusts only what a session proves: instance ids, nodes, ``bye``, the
admin address it scrapes and the spans it stores are bound to the session that registered
them. Each test is an attack a process on the same host can make with the project's own wire
module, against real sidecars and a real control plane on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio

from meshlet import wire

from ..helpers import join_token, sample
from ..mesh import Mesh
from ..origin import Origin
from .test_control_plane import eventually, learns

CALLS = 20
TRACE = "5bf92f3577b34da6a3ce929d0e0e4737"


class Peer:
    """A push-channel session of our own: what an attacker on the host can open."""

    def __init__(self, stream: trio.SocketStream, first: wire.Message) -> None:
        self.stream = stream
        self.first = first  # welcome, or the error that refused the hello

    @classmethod
    async def hello(
        cls,
        opened: list[trio.SocketStream],
        mesh: Mesh,
        service: str,
        instance_id: str,
        *,
        node: str = "",
        address: str = "127.0.0.1:9",
        admin: str = "127.0.0.1:9",
        ready: bool = True,
        then: wire.Message | None = None,
    ) -> Peer:
        host, port = mesh.push.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        opened.append(stream)  # closed at the test's end (the opened fixture), pass or fail
        instance = {"instance_id": instance_id, "address": address, "admin": admin, "ready": ready}
        # It holds the control plane's bootstrap token (unscoped: any service), as anyone on
        # the host who can read it does: what a session can do once admitted is what is tested.
        token = join_token(mesh.tmp_path)
        data = wire.encode(wire.Hello((2, 3), node or instance_id, service, instance, token=token))
        if then is not None:  # in the same write: read by the control plane with the hello
            data += wire.encode(then)
        await stream.send_all(data)
        decoder = wire.FrameDecoder()
        with trio.fail_after(5):
            while not (messages := decoder.feed(await stream.receive_some(65536))):
                pass
        return cls(stream, messages[0])

    @property
    def refusal(self) -> str:
        return self.first.reason if isinstance(self.first, wire.Error) else ""

    async def send(self, message: wire.Message) -> None:
        await self.stream.send_all(wire.encode(message))


@pytest.fixture
async def opened() -> AsyncIterator[list[trio.SocketStream]]:
    streams: list[trio.SocketStream] = []
    yield streams
    for stream in streams:
        await stream.aclose()


async def get_json(url: str, **kwargs: object) -> object:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(url, **kwargs)).json()  # type: ignore[arg-type]


async def cp_metrics(mesh: Mesh) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://{mesh.api}/metrics")).text


async def twenty_calls(user_outbound: str) -> list[int]:
    async with httpx.AsyncClient(timeout=10) as client:
        return [
            (await client.get(f"http://{user_outbound}/hello", headers={"host": "item"})).status_code
            for _ in range(CALLS)
        ]


async def item_sidecars(mesh: Mesh) -> list[dict[str, object]]:
    status = await get_json(f"http://{mesh.api}/v1/status")
    assert isinstance(status, dict)
    return [s for s in status["sidecars"] if s["service"] == "item"]


async def test_a_live_instance_id_or_node_cannot_be_taken_and_bye_cannot_name_it(
    mesh: Mesh, origin: Origin, opened: list[trio.SocketStream]
) -> None:
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin, extra=["--instance-id", "item-1"])
    user = await mesh.sidecar("user")
    await learns(user, "item", [item.inbound])
    fake = await mesh.origin()  # the attacker's app: where it wants item's callers
    attacks = [
        # its instance id, from another node: would take its place (20 of 20 calls)
        await Peer.hello(opened, mesh, "item", "item-1", node="evil", address=f"127.0.0.1:{fake.port}"),
        # its node, under another instance id: would close the real sidecar's channel as a ghost
        await Peer.hello(opened, mesh, "item", "item-2", node="item-1", address=f"127.0.0.1:{fake.port}"),
        # its instance id, then bye in the same write: would deregister it (404 for a minute)
        await Peer.hello(opened, mesh, "item", "item-1", node="evil-2", then=wire.Bye("draining")),
        # another service's session claiming it
        await Peer.hello(opened, mesh, "evil", "item-1", node="evil-3", address=f"127.0.0.1:{fake.port}"),
    ]
    assert [peer.refusal for peer in attacks] == ["instance-in-use"] * 4
    # A session of its own can say bye: it deregisters its own instance, nothing else.
    own = await Peer.hello(opened, mesh, "item", "item-3", node="evil-4", address=f"127.0.0.1:{fake.port}", ready=False)
    assert isinstance(own.first, wire.Welcome)
    await own.send(wire.Bye("draining"))
    served = origin.stats.served
    assert await twenty_calls(user.outbound) == [200] * CALLS
    assert (origin.stats.served - served, fake.stats.served) == (CALLS, 0)
    (real,) = await item_sidecars(mesh)
    assert (real["node"], real["connected"], real["ready"]) == ("item-1", True, True)
    # The real sidecar never lost its channel, nor its endpoint.
    assert item.log().count("connected to control plane") == 1
    assert sample(await cp_metrics(mesh), "meshlet_cp_claims_refused_total") == 4
    cp_log = mesh.cp.log() if mesh.cp else ""
    assert cp_log.count("counted in meshlet_cp_claims_refused_total") == 1  # one line for the burst


async def test_a_restarted_sidecar_takes_its_instance_back_and_nobody_else_can(
    mesh: Mesh, origin: Origin, opened: list[trio.SocketStream]
) -> None:
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin, extra=["--instance-id", "item-1"])
    user = await mesh.sidecar("user")
    await learns(user, "item", [item.inbound])
    os.killpg(item.process.pid, signal.SIGKILL)  # no bye: its lease holds for the TTL (10 s)

    async def departed() -> bool:
        return [s["connected"] for s in await item_sidecars(mesh)] == [False]

    await eventually(departed, "the control plane saw item's channel close")
    fake = await mesh.origin()
    other = await Peer.hello(opened, mesh, "evil", "item-1", node="evil", address=f"127.0.0.1:{fake.port}")
    assert other.refusal == "instance-in-use" and "another identity" in other.first.message  # type: ignore[union-attr]
    again = await mesh.sidecar("item", app=origin, extra=["--instance-id", "item-1"])  # the same identity
    await learns(user, "item", [again.inbound])
    assert await twenty_calls(user.outbound) == [200] * CALLS
    assert fake.stats.served == 0
    (real,) = await item_sidecars(mesh)
    assert (real["node"], real["connected"]) == ("item-1", True)


async def test_an_admin_address_off_the_sessions_host_is_never_fetched(
    mesh: Mesh, origin: Origin, nursery: trio.Nursery, opened: list[trio.SocketStream]
) -> None:
    fetched = 0

    async def count(stream: trio.SocketStream) -> None:
        nonlocal fetched
        fetched += 1
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, count, 0, host="127.0.0.2"))
    target = f"127.0.0.2:{listeners[0].socket.getsockname()[1]}"
    await mesh.control_plane()
    await mesh.sidecar("item", app=origin)
    peer = await Peer.hello(opened, mesh, "fake", "fake-1", admin=target)  # from 127.0.0.1
    assert isinstance(peer.first, wire.Welcome)  # accepted: only its admin is not scraped

    async def scraped_twice() -> bool:
        stat = await get_json(f"http://{mesh.api}/v1/stat")
        assert isinstance(stat, dict)
        return stat["sidecars"] >= 1  # item's admin was scraped twice: two rounds went by

    await eventually(scraped_twice, "two scrape rounds")
    assert fetched == 0
    status = await get_json(f"http://{mesh.api}/v1/status")
    assert isinstance(status, dict)
    refused = {s["node"]: s["admin_refused"] for s in status["sidecars"]}
    assert refused == {"fake-1": "not the session's address", next(n for n in refused if n != "fake-1"): None}
    targets = await get_json(f"http://{mesh.api}/v1/prometheus/targets")
    assert target not in json.dumps(targets)
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", "status", "--api", mesh.api], capture_stdout=True, check=False
    )
    assert "fake-1: admin: refused (not the session's address)" in result.stdout.decode()
    assert sample(await cp_metrics(mesh), "meshlet_cp_admin_refused_total") == 1


def forged_span(service: str, i: int, trace: str = TRACE) -> dict[str, object]:
    return {
        "traceId": trace,
        "id": f"{i:016x}",
        "kind": "SERVER",
        "name": "get /forged",
        "timestamp": 1_700_000_000_000_000,
        "duration": 1000,
        "localEndpoint": {"serviceName": service},
    }


async def test_spans_are_bound_to_the_session_that_posts_them(
    mesh: Mesh, origin: Origin, opened: list[trio.SocketStream]
) -> None:
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    await learns(user, "item", [item.inbound])
    peer = await Peer.hello(opened, mesh, "evil", "evil-1")
    assert isinstance(peer.first, wire.Welcome)
    token = peer.first.span_token
    assert token and token not in repr(peer.first)
    spans = f"http://{mesh.api}/api/v2/spans"
    batch = [forged_span("evil", 1), forged_span("item", 2), forged_span("user", 3)]
    async with httpx.AsyncClient() as client:
        anonymous = await client.post(spans, json=batch)
        guessed = await client.post(spans, json=batch, headers={"authorization": "Bearer mst_" + "A" * 43})
        own = await client.post(spans, json=batch, headers={"authorization": f"Bearer {token}"})
        # the real sidecars post theirs with their own tokens
        traced = await client.get(
            f"http://{user.outbound}/hello", headers={"host": "item", "traceparent": f"00-{'c' * 32}-{'d' * 16}-01"}
        )
    assert (anonymous.status_code, guessed.status_code, own.status_code, traced.status_code) == (401, 401, 202, 200)

    async def delivered() -> bool:
        found = await get_json(f"http://{mesh.api}/api/v2/trace/{'c' * 32}")
        return isinstance(found, list) and {s["localEndpoint"]["serviceName"] for s in found} == {"user", "item"}

    await eventually(delivered, "both sidecars' spans of the real call in the store")
    forged = await get_json(f"http://{mesh.api}/api/v2/trace/{TRACE}")
    assert isinstance(forged, list)
    assert [s["localEndpoint"]["serviceName"] for s in forged] == ["evil"]  # item's and user's dropped
    metrics = await cp_metrics(mesh)
    assert sample(metrics, "meshlet_cp_spans_refused_total", reason="other-service") == 2
    assert sample(metrics, "meshlet_cp_span_posts_refused_total", reason="no-token") == 1
    assert sample(metrics, "meshlet_cp_span_posts_refused_total", reason="unknown-token") == 1
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", "trace", TRACE, "--api", mesh.api], capture_stdout=True, check=False
    )
    out = result.stdout.decode()
    assert "evil" in out and not re.search(r"^\s*(item|user)\b", out, re.MULTILINE)
    # No span token anywhere a reader looks: logs, metrics, status, config dumps, stored spans.
    async with httpx.AsyncClient() as client:
        seen = [
            (await client.get(f"http://{mesh.api}/metrics")).text,
            (await client.get(f"http://{mesh.api}/v1/status")).text,
            (await client.get(f"http://{mesh.api}/api/v2/traces", params={"limit": "100"})).text,
            *[(await client.get(f"http://{s.admin}/config_dump")).text for s in (item, user)],
            *[(await client.get(f"http://{s.admin}/metrics")).text for s in (item, user)],
        ]
    assert mesh.cp is not None
    logs = [mesh.cp.log(), item.log(), user.log()]
    assert not [text for text in [*seen, *logs] if token in text or "mst_" in text]


class Sink:
    """An external collector: takes every batch (202) and keeps each request's head."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            head, found, rest = buffer.partition(b"\r\n\r\n")
            if not found:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                continue
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            self.heads.append(head)
            buffer = rest[length:]
            await stream.send_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")


async def test_an_external_collector_never_gets_the_span_token(
    mesh: Mesh, origin: Origin, nursery: trio.Nursery
) -> None:
    sink = Sink()
    listeners = await nursery.start(partial(trio.serve_tcp, sink.handle, 0, host="127.0.0.1"))
    collector = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/api/v2/spans"
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    await learns(user, "item", [item.inbound])
    await mesh.apply(f"kind: MeshConfig\nname: mesh\ntracing:\n  collector: {collector}\n")
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})).status_code == 200

    async def received() -> bool:
        return len(sink.heads) >= 2  # both sidecars sent a batch

    await eventually(received, "the external collector got spans")
    assert not [head for head in sink.heads if b"authorization" in head.lower() or b"mst_" in head]
