"""gRPC through the mesh with the real grpcio stack: a grpcio server (generic handlers, bytes
in and out, in threads of this process) behind `item`'s sidecar (app protocol grpc), and a
grpcio client dialing `user`'s sidecar's outbound listener as an h2c target with the
authority `item`. Unary and the three streaming kinds, streams of 10,000 messages and of
100 MB, deadlines (the server sees the reduced one), a retried UNAVAILABLE, an open breaker
answering at once, metadata and trailers byte-exact, and a client's cancellation reaching
the server (docs/policy.md, "gRPC")."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

from ..helpers import sample
from ..mesh import Mesh

try:
    import grpc
except ImportError:  # pragma: no cover - grpcio is a test extra
    if os.environ.get("MESHLET_REQUIRE_ALL"):
        raise
    pytest.skip("grpcio is missing: pip install meshlet[test]", allow_module_level=True)

SERVICE = "test.Echo"
MB = 1024 * 1024
WAIT = 20.0  # seconds: the bound of any wait for what the server saw
ENDLESS = 60.0  # seconds: how long the server's own loops last at most


@dataclass
class Server:
    """The gRPC app: what it saw, and how it answers."""

    calls: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, list[tuple[str, str | bytes]]] = field(default_factory=dict)
    time_remaining: list[float] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline_passed: threading.Event = field(default_factory=threading.Event)
    received_bytes: int = 0
    port: int = 0

    def seen(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.metadata[name] = list(context.invocation_metadata())

    # --- the methods --------------------------------------------------------------------
    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen("Unary", context)
        mine = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-test")]
        context.send_initial_metadata([("x-test-initial", "first"), *mine])
        context.set_trailing_metadata(
            [("x-test-trailer", "last"), ("x-test-trailer-bin", b"\x00\xff\x10trailer"), *mine]
        )
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.seen("ServerStream", context)
        count, size = (int(x) for x in request.split(b"x"))
        piece = b"s" * size
        for _ in range(count):
            yield piece

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self.seen("ClientStream", context)
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        self.received_bytes = total
        return b"%d %d" % (count, total)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self.seen("Bidi", context)
        for message in requests:
            yield b"re:" + message

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen("Slow", context)
        self.time_remaining.append(context.time_remaining() or 0.0)
        context.add_callback(self.deadline_passed.set)  # the call ended without an answer from us
        end = time.monotonic() + ENDLESS
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.01)
        return b"too late"

    def flaky_once(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen("FlakyOnce", context)
        if self.calls["FlakyOnce"] == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")  # before any message: Trailers-Only
        return b"ok"

    def unavailable(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen("Unavailable", context)
        context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        raise AssertionError("abort raises")

    def endless(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.seen("Endless", context)
        context.add_callback(self.cancelled.set)  # the call ended: it ends early only if cancelled
        end = time.monotonic() + ENDLESS
        while context.is_active() and time.monotonic() < end:
            yield b"tick"
            time.sleep(0.005)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
                "FlakyOnce": grpc.unary_unary_rpc_method_handler(self.flaky_once),
                "Unavailable": grpc.unary_unary_rpc_method_handler(self.unavailable),
                "Endless": grpc.unary_stream_rpc_method_handler(self.endless),
            },
        )


@dataclass
class Client:
    """A grpcio channel to `user`'s outbound listener, `item` as its authority."""

    channel: grpc.Channel
    admin: str

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(f"/{SERVICE}/{method}")

    def server_stream(self, method: str) -> Any:
        return self.channel.unary_stream(f"/{SERVICE}/{method}")

    def client_stream(self, method: str) -> Any:
        return self.channel.stream_unary(f"/{SERVICE}/{method}")

    def bidi(self, method: str) -> Any:
        return self.channel.stream_stream(f"/{SERVICE}/{method}")


async def run(fn: Callable[[], Any]) -> Any:
    """A blocking grpcio call, off trio's thread."""
    return await trio.to_thread.run_sync(fn)


@asynccontextmanager
async def grpc_mesh(mesh: Mesh, policy: str = "") -> AsyncIterator[tuple[Server, Client]]:
    """A control plane (with ``policy``), the gRPC server behind `item`'s sidecar, `user`'s
    sidecar, and a client of it that has reached item once (so every policy is in place)."""
    server = Server()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
    grpc_server.add_generic_rpc_handlers((server.handler(),))
    server.port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        await mesh.control_plane()
        if policy:
            await mesh.apply(policy)
        await mesh.sidecar("item", app=f"127.0.0.1:{server.port}", extra=["--app-protocol", "grpc"])
        user = await mesh.sidecar("user")
        channel = grpc.insecure_channel(
            user.outbound,
            options=[
                ("grpc.default_authority", "item"),
                ("grpc.enable_retries", 0),  # the retries seen are the mesh's
                ("grpc.enable_http_proxy", 0),
                ("grpc.max_receive_message_length", 8 * MB),
                ("grpc.max_send_message_length", 8 * MB),
            ],
        )
        client = Client(channel, user.admin)
        await synced(client, "item" if policy else None)
        try:
            yield server, client
        finally:
            channel.close()
    finally:
        grpc_server.stop(grace=None)


async def synced(client: Client, policy: str | None) -> None:
    """Until a call reaches item (the first one makes `user`'s sidecar look item up) and the
    sidecar holds item's DestinationPolicy, if one is expected."""
    ping = client.unary("Unary")
    async with httpx.AsyncClient(timeout=5) as http:
        with trio.fail_after(20):
            while True:
                try:
                    await run(lambda: ping(b"ping", timeout=5))
                except grpc.RpcError:
                    await trio.sleep(0.1)
                    continue
                config = (await http.get(f"http://{client.admin}/config_dump")).json()["config"]
                if config["destination_policies"].get("item") == policy:
                    return
                await trio.sleep(0.1)


async def metrics(client: Client) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(f"http://{client.admin}/metrics")).text


async def test_unary_and_streaming_calls_with_metadata_and_trailers_byte_exact(mesh: Mesh) -> None:
    async with grpc_mesh(mesh) as (server, client):
        sent = [("x-test-ascii", "a value, with spaces"), ("x-test-bin", b"\x00\x01\xfe\xff binary")]
        response, call = await run(lambda: client.unary("Unary").with_call(b"hello", metadata=sent, timeout=10))
        assert response == b"echo:hello"
        assert call.code() == grpc.StatusCode.OK
        seen = server.metadata["Unary"]
        assert all(pair in seen for pair in sent), seen  # -bin values arrive as the bytes sent
        initial, trailing = list(call.initial_metadata()), list(call.trailing_metadata())
        assert ("x-test-initial", "first") in initial and all(pair in initial for pair in sent)
        assert ("x-test-trailer", "last") in trailing
        assert ("x-test-trailer-bin", b"\x00\xff\x10trailer") in trailing
        assert all(pair in trailing for pair in sent)

        # 10,000 messages each way, streamed
        stream = await run(lambda: list(client.server_stream("ServerStream")(b"10000x16", timeout=60)))
        assert len(stream) == 10_000 and set(stream) == {b"s" * 16}
        counted = await run(lambda: client.client_stream("ClientStream")(iter([b"c" * 16] * 10_000), timeout=60))
        assert counted == b"10000 160000"
        echoed = await run(lambda: list(client.bidi("Bidi")(iter([b"%d" % i for i in range(10_000)]), timeout=60)))
        assert echoed == [b"re:%d" % i for i in range(10_000)]

        # bidirectional without buffering: each message is sent only once the previous one's
        # echo came back (a sidecar that held the stream until it ended would stall here)
        def ping_pong() -> list[bytes]:
            outbox: queue.Queue[bytes | None] = queue.Queue()
            outbox.put(b"0")

            def messages() -> Iterator[bytes]:
                while (message := outbox.get(timeout=WAIT)) is not None:
                    yield message

            answers = []
            for answer in client.bidi("Bidi")(messages(), timeout=60):
                answers.append(answer)
                outbox.put(b"%d" % len(answers) if len(answers) < 20 else None)
            return answers

        assert await run(ping_pong) == [b"re:%d" % i for i in range(20)]

        text = await metrics(client)
        ok = sample(text, "meshlet_requests_total", direction="outbound", destination="item", grpc_status="0")
        assert ok >= 6


async def test_a_stream_of_100_mb_each_way(mesh: Mesh) -> None:
    async with grpc_mesh(mesh) as (server, client):

        def download() -> int:
            return sum(len(m) for m in client.server_stream("ServerStream")(b"100x%d" % MB, timeout=120))

        assert await run(download) == 100 * MB

        def upload() -> bytes:
            pieces = (b"u" * MB for _ in range(100))
            return client.client_stream("ClientStream")(pieces, timeout=120)

        assert await run(upload) == b"100 %d" % (100 * MB)
        assert server.received_bytes == 100 * MB


async def test_deadlines(mesh: Mesh) -> None:
    policy = "kind: DestinationPolicy\nname: item\nservice: item\ntimeout: 3s\nretries: {attempts: 0}\n"
    async with grpc_mesh(mesh, policy) as (server, client):
        slow = client.unary("Slow")
        with pytest.raises(grpc.RpcError) as failed:
            await run(lambda: slow(b"x", timeout=1.0))
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with trio.fail_after(WAIT):
            await run(lambda: server.deadline_passed.wait(WAIT))  # the server's call ended too
        (remaining,) = server.time_remaining
        assert 0 < remaining < 1.1  # the caller's second (which grpcio's client rounds up a little)

        # The policy's 3 s is shorter than the caller's 30 s: the server hears of the 3 s less
        # the time spent in the sidecars (grpc-timeout rewritten as the call left each), and
        # the caller gets DEADLINE_EXCEEDED when they are over.
        server.deadline_passed.clear()
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            await run(lambda: slow(b"x", timeout=30.0))
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 10
        assert 0 < server.time_remaining[1] < 3.0


async def test_a_trailers_only_unavailable_is_retried(mesh: Mesh) -> None:
    policy = (
        "kind: DestinationPolicy\nname: item\nservice: item\n"
        "retries: {attempts: 2, retry_on: [unavailable], non_idempotent: true}\n"
    )
    async with grpc_mesh(mesh, policy) as (server, client):
        response = await run(lambda: client.unary("FlakyOnce")(b"x", timeout=10))
        assert response == b"ok"
        assert server.calls["FlakyOnce"] == 2  # the UNAVAILABLE, then the retry
        text = await metrics(client)
        assert sample(text, "meshlet_retries_total", destination="item", outcome="retried") == 1


async def test_an_open_breaker_answers_unavailable_at_once(mesh: Mesh) -> None:
    policy = (
        "kind: DestinationPolicy\nname: item\nservice: item\nretries: {attempts: 0}\n"
        "circuit_breaker: {min_requests: 5, failure_ratio: 0.5, open_for: 30s}\n"
    )
    async with grpc_mesh(mesh, policy) as (server, client):
        failing = client.unary("Unavailable")
        reasons = []
        for _ in range(12):  # HTTP 200 every time: the breaker reads the gRPC status
            with pytest.raises(grpc.RpcError) as failed:
                await run(lambda: failing(b"x", timeout=10))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            reasons.append(dict(failed.value.trailing_metadata() or ()).get("x-meshlet-error"))
        # The app's own UNAVAILABLE (no x-meshlet-error) until at least half of the calls in
        # the window failed (the synced OK calls count too), then the open circuit's, at once.
        answered = reasons.index("circuit-open")
        assert 3 <= answered <= 5 and reasons[:answered] == [None] * answered
        assert reasons[answered:] == ["circuit-open"] * (12 - answered)
        assert server.calls["Unavailable"] == answered  # nothing reached the app once it opened
        text = await metrics(client)
        out = {"direction": "outbound", "destination": "item"}
        assert sample(text, "meshlet_requests_total", **out, grpc_status="14") == 12
        assert sample(text, "meshlet_requests_total", **out, reason="circuit-open") == 12 - answered
        assert sample(text, "meshlet_circuit_state", destination="item") == 1


async def test_a_cancellation_reaches_the_server(mesh: Mesh) -> None:
    async with grpc_mesh(mesh) as (server, client):

        def cancel_after_a_few() -> int:
            call = client.server_stream("Endless")(b"", timeout=60)
            got = 0
            for _ in call:
                got += 1
                if got == 5:
                    call.cancel()
                    break
            return got

        assert await run(cancel_after_a_few) == 5
        assert await run(lambda: server.cancelled.wait(WAIT))  # the server's call ended long before its 60 s
        labels = {"direction": "outbound", "grpc_status": "1", "reason": "incomplete"}
        with trio.fail_after(WAIT):  # counted when the caller's stream is over on the sidecar too
            while sample(await metrics(client), "meshlet_requests_total", **labels) != 1:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
