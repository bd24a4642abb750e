"""Opaque TCP through the mesh (sidecar/net/tcp_proxy.py): a real Redis (Debian's
redis-server) behind two sidecars whose app protocol is tcp, reached over mTLS through a
caller's --upstream listener: balanced over both instances, a dead one skipped, the metrics;
half-close carried end to end; a server-first app never waits on detection; the breaker on
connect failures; AccessPolicy per connection."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from meshlet import processes

from ..conftest import need
from ..helpers import sample, write_static
from ..mesh import Mesh

READ_TIMEOUT = 10.0  # an answer that takes longer is a failure (the bound of every wait here)
# A sidecar that waited for a client's first byte would close the connection after this: far
# past READ_TIMEOUT, so such a wait fails the test instead of passing after the close.
NO_EARLY_CLOSE = ["--header-timeout", "60s"]


def free_port() -> int:
    # redis-server cannot listen on port 0 and tell us the port; one the kernel just gave out
    # (and we closed) is the next best thing.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Redis:
    """A redis-server process on 127.0.0.1:port."""

    def __init__(self, port: int, child: processes.AsyncChild) -> None:
        self.port = port
        self.child = child


@asynccontextmanager
async def run_redis(tmp_path: Path, name: str) -> AsyncIterator[Redis]:
    binary = need("redis-server")
    directory = tmp_path / name
    directory.mkdir()
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(directory), "--protected-mode", "no"]
    async with processes.open_child(name, argv, tmp_path / f"{name}.log", check_traceback=False) as child:
        with trio.fail_after(READ_TIMEOUT):
            while True:
                try:
                    if await command(port, "PING") == b"+PONG\r\n":
                        break
                except OSError:
                    pass
                assert child.process.poll() is None, child.log_text()
                await trio.sleep(0.05)
        yield Redis(port, child)


def resp(*words: str) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def command(port: int, *words: str) -> bytes:
    """One command on a new connection; the first reply's bytes (a line, or a bulk string)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(resp(*words))
        return await read_reply(stream)


async def read_reply(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(READ_TIMEOUT):
        while not _complete(received):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    return received


def _complete(reply: bytes) -> bool:
    if not reply.endswith(b"\r\n"):
        return False
    if reply.startswith(b"$"):
        size = int(reply[1 : reply.index(b"\r\n")])
        return size < 0 or len(reply) >= reply.index(b"\r\n") + 2 + size + 2
    return True


async def refused(port: int) -> bool:
    """The connection is closed (reset, as a refused connect) before any answer to a PING."""
    with trio.fail_after(READ_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return True  # reset before the connect completed here: refused at once
        try:
            await stream.send_all(resp("PING"))
            return await stream.receive_some(1024) == b""
        except trio.BrokenResourceError:
            return True
        finally:
            await stream.aclose()


async def metrics(admin: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://{admin}/metrics")).text


async def wait_for_endpoints(admin: str, service: str, count: int, protocol: str, *, policy: str | None = None) -> None:
    """Until the sidecar at ``admin`` holds ``count`` endpoints of ``service`` of that
    protocol (and applies the DestinationPolicy ``policy`` to it)."""
    async with httpx.AsyncClient() as client:
        with trio.fail_after(READ_TIMEOUT):
            while True:
                config = (await client.get(f"http://{admin}/config_dump")).json()["config"]
                found = config["services"].get(service, {})
                if (
                    found.get("protocol") == protocol
                    and len(found.get("endpoints", [])) == count
                    and (policy is None or config["destination_policies"].get(service) == policy)
                ):
                    return
                await trio.sleep(0.05)


ROUND_ROBIN = """\
kind: DestinationPolicy
name: redis-balance
service: redis
load_balancer: round_robin
"""


async def test_redis_through_the_mesh_balanced_over_mtls_a_dead_instance_skipped(tmp_path: Path, mesh: Mesh) -> None:
    await mesh.control_plane()
    await mesh.apply(ROUND_ROBIN)  # turns, so that the count per instance is known
    async with run_redis(tmp_path, "redis-a") as a, run_redis(tmp_path, "redis-b") as b:
        server_a = await mesh.sidecar("redis", app=f"127.0.0.1:{a.port}", extra=["--app-protocol", "tcp"])
        await mesh.sidecar("redis", app=f"127.0.0.1:{b.port}", extra=["--app-protocol", "tcp"])
        user = await mesh.sidecar("user", extra=["--upstream", "redis=127.0.0.1:0"])
        port = user.ports["upstream:redis"]
        await wait_for_endpoints(
            user.admin, "redis", 2, "tcp", policy="redis-balance"
        )  # registered with their protocol
        listed = await trio.run_process(
            [sys.executable, "-m", "meshlet", "get", "endpoints", "redis", "--api", mesh.api], capture_stdout=True
        )
        rows = [line.split() for line in listed.stdout.decode().splitlines()]
        assert rows[0][5] == "PROTOCOL" and [row[4] for row in rows[1:]] == ["tcp", "tcp"]  # "APP PORT": 2 words

        # SET and GET through the mesh, over mTLS, each on a connection of its own; the key is
        # on one instance of the two, so the answers show the balance: one connection in two.
        assert await command(port, "SET", "greeting", "hello") == b"+OK\r\n"
        answers = [await command(port, "GET", "greeting") for _ in range(20)]
        assert answers.count(b"$5\r\nhello\r\n") == 10 and answers.count(b"$-1\r\n") == 10, answers
        assert sorted([await command(r.port, "EXISTS", "greeting") for r in (a, b)]) == [b":0\r\n", b":1\r\n"]

        # One instance gone: every new connection is spliced to the other (the dead one is
        # tried at most once, then ejected), no client connection fails.
        await mesh.stop(server_a)
        for _ in range(10):
            assert await command(port, "PING") == b"+PONG\r\n"

        text = await metrics(user.admin)
        labels = {"direction": "outbound", "source": "user", "destination": "redis"}
        assert sample(text, "meshlet_tcp_connections_total", **labels, outcome="ok") == 31
        assert sample(text, "meshlet_tcp_connections_total", **labels, outcome="connect-failed") == 0
        assert sample(text, "meshlet_tcp_bytes_total", **labels, way="received") == len(
            resp("SET", "greeting", "hello")
        ) + 20 * len(resp("GET", "greeting")) + 10 * len(resp("PING"))
        assert sample(text, "meshlet_tcp_bytes_total", **labels, way="sent") > 0
        assert sample(text, "meshlet_tcp_connection_duration_seconds_count", **labels) == 31
        assert sample(text, "meshlet_tcp_connections_open", direction="outbound") == 0
        assert sample(text, "meshlet_tls_handshakes_total", side="client") >= 1  # mTLS to the sidecars


async def test_a_half_close_reaches_the_server_and_its_answer_comes_back(tmp_path: Path, mesh: Mesh) -> None:
    """The client shuts down its write side; the server reads to its end of file, then
    answers: the answer arrives, then the end of file."""
    received: list[bytes] = []

    async def reads_to_eof_then_answers(stream: trio.SocketStream) -> None:
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        received.append(data)
        await stream.send_all(b"got %d bytes" % len(data))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, reads_to_eof_then_answers, 0, host="127.0.0.1"))
        app_port = listener.socket.getsockname()[1]
        await mesh.control_plane()
        await mesh.sidecar("sink", app=f"127.0.0.1:{app_port}", extra=["--app-protocol", "tcp"])
        user = await mesh.sidecar("user", extra=["--upstream", "sink=127.0.0.1:0"])
        await wait_for_endpoints(user.admin, "sink", 1, "tcp")
        payload = b"x" * 300_000  # several reads each way
        with trio.fail_after(READ_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", user.ports["upstream:sink"])
            await stream.send_all(payload)
            await stream.send_eof()
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            await stream.aclose()
        assert [data for data in received if data] == [payload]  # the others: health probes (a connect)
        assert answer == b"got 300000 bytes"
        nursery.cancel_scope.cancel()


async def test_a_server_first_app_greets_without_a_byte_from_the_client(tmp_path: Path, mesh: Mesh) -> None:
    """Declared tcp: no detection waits for the client's first byte, at either sidecar."""

    async def greets(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(b"220 hello from a server-first app\r\n")
            await stream.receive_some(1)  # until the client goes
        except trio.BrokenResourceError:
            pass  # the sidecar's health probe: a connect, then gone

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, greets, 0, host="127.0.0.1"))
        await mesh.control_plane()
        await mesh.sidecar("smtp", app=f"127.0.0.1:{listener.socket.getsockname()[1]}", extra=["--app-protocol", "tcp"])
        user = await mesh.sidecar("user", extra=["--upstream", "smtp=127.0.0.1:0"])
        await wait_for_endpoints(user.admin, "smtp", 1, "tcp")
        with trio.fail_after(READ_TIMEOUT):  # a detection would wait for the 60 s header timeout
            stream = await trio.open_tcp_stream("127.0.0.1", user.ports["upstream:smtp"])
            greeting = b""
            while not greeting.endswith(b"\r\n"):
                greeting += await stream.receive_some(1024)
            await stream.aclose()
        assert greeting == b"220 hello from a server-first app\r\n"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("mode", "greeted"), [("off", True), ("strict", False)])
async def test_a_plaintext_client_of_a_tcp_app_by_mtls_mode(
    tmp_path: Path, mesh: Mesh, mode: str, greeted: bool
) -> None:
    """Off: nothing to tell apart, so no wait for a first byte: a server-first app greets a
    plaintext client at once. Strict: a plaintext client is refused (its first byte says so)."""

    async def greets(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(b"220 hello\r\n")
            await stream.receive_some(1)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, greets, 0, host="127.0.0.1"))
        static = write_static(tmp_path / "mesh.yaml", {"smtp": {"endpoints": [], "mtls": {"mode": mode}}})
        smtp = await mesh.sidecar(
            "smtp",
            app=f"127.0.0.1:{listener.socket.getsockname()[1]}",
            static=static,
            extra=["--app-protocol", "tcp", *NO_EARLY_CLOSE],
        )
        with trio.fail_after(READ_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", smtp.ports["inbound"])
            received = b""
            try:
                if not greeted:
                    await stream.send_all(b"EHLO me\r\n")
                while not received.endswith(b"\r\n") and (chunk := await stream.receive_some(1024)):
                    received += chunk
            except trio.BrokenResourceError:
                pass  # reset
            await stream.aclose()
        assert received == (b"220 hello\r\n" if greeted else b"")
        text = await metrics(smtp.admin)
        assert sample(text, "meshlet_plaintext_refused_total") == (0 if greeted else 1)
        nursery.cancel_scope.cancel()


BREAKER = """\
kind: DestinationPolicy
name: db-breaker
service: db
circuit_breaker: {min_requests: 3, failure_ratio: 0.5, window: 60s, open_for: 60s}
outlier_detection: {consecutive_failures: 100}
"""


async def test_refusing_endpoints_open_the_breaker_and_then_connections_are_refused_at_once(
    tmp_path: Path, mesh: Mesh
) -> None:
    """Nothing listens at either endpoint: each connection tries both, fails, and counts; once
    the breaker opens, connections are closed at once without a connect."""
    dead = [free_port(), free_port()]
    static = write_static(
        tmp_path / "mesh.yaml",
        {"db": {"endpoints": [f"127.0.0.1:{p}" for p in dead], "protocol": "tcp"}},
    )
    await mesh.control_plane()
    await mesh.apply(BREAKER)
    user = await mesh.sidecar("user", static=static, extra=["--upstream", "db=127.0.0.1:0"])
    port = user.ports["upstream:db"]
    await wait_for_endpoints(user.admin, "db", 2, "tcp", policy="db-breaker")
    for _ in range(6):
        assert await refused(port)
    text = await metrics(user.admin)
    labels = {"direction": "outbound", "source": "user", "destination": "db"}
    failed = sample(text, "meshlet_tcp_connections_total", **labels, outcome="connect-failed")
    circuit_open = sample(text, "meshlet_tcp_connections_total", **labels, outcome="circuit-open")
    assert failed >= 1 and circuit_open >= 1 and failed + circuit_open == 6
    assert sample(text, "meshlet_circuit_state", destination="db") == 1  # open


ACCESS = """\
kind: AccessPolicy
name: cache-callers
service: cache
default: deny
rules:
  - sources: [user]
    paths: [/admin]   # needs HTTP: never allows a TCP connection
  - sources: [billing]
"""


async def test_an_access_policy_is_applied_per_tcp_connection(tmp_path: Path, mesh: Mesh) -> None:
    async with run_redis(tmp_path, "redis-c") as redis:
        await mesh.control_plane()
        cache = await mesh.sidecar("cache", app=f"127.0.0.1:{redis.port}", extra=["--app-protocol", "tcp"])
        user = await mesh.sidecar("user", extra=["--upstream", "cache=127.0.0.1:0"])
        billing = await mesh.sidecar("billing", extra=["--upstream", "cache=127.0.0.1:0"])
        await mesh.apply(ACCESS)
        for caller in (user, billing):
            await wait_for_endpoints(caller.admin, "cache", 1, "tcp")
        assert await command(billing.ports["upstream:cache"], "PING") == b"+PONG\r\n"
        assert await refused(user.ports["upstream:cache"])
        text = await metrics(cache.admin)
        inbound = {"direction": "inbound", "destination": "cache"}
        assert sample(text, "meshlet_tcp_connections_total", **inbound, source="user", outcome="denied") == 1
        assert sample(text, "meshlet_tcp_connections_total", **inbound, source="billing", outcome="ok") == 1
