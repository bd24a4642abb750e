"""Micro-benchmark: the sidecar's whole per-request Python path, with no sockets.

A fake client connection feeds N keep-alive requests into the real downstream loop;
the real outbound stack routes them and the real forwarder sends them over a fake
upstream connection that answers each with a canned nginx-like response. What is left
is exactly the Python work per request (parsing, layers, header rules, metrics,
serialization, pool bookkeeping): the part of the sidecar's CPU time we control.

    .venv/bin/python benchmarks/micro_path.py [N]
"""

from __future__ import annotations

import sys
import time

import trio

from sidecar.app import build_outbound
from sidecar.core.config import load_static
from sidecar.core.destination import Destinations
from sidecar.layers.routing import router
from sidecar.net import io, upstream
from sidecar.net.downstream import Timeouts, serve_connection
from sidecar.net.upstream import Forwarder, UpstreamPools
from sidecar.telemetry import Telemetry

REQUEST = b"GET /items/1 HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 05:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


class FakeSocket:
    def close(self) -> None:
        pass


class FakeClient:
    """Plays the client: N requests, one at a time, then EOF."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.peer = "127.0.0.1"
        self.sock = FakeSocket()
        self.closed = False
        self.sent = 0

    async def recv(self, *, wait_first: bool = False) -> bytes:
        if self.left == 0:
            return b""
        self.left -= 1
        return REQUEST

    async def send_all(self, data: bytes) -> None:
        self.sent += 1

    def close(self) -> None:
        self.closed = True


class FakeUpstream(FakeClient):
    """Plays nginx: every request sent gets RESPONSE back."""

    def __init__(self) -> None:
        super().__init__(0)
        self.pending = 0

    async def recv(self, *, wait_first: bool = False) -> bytes:
        assert self.pending
        self.pending -= 1
        return RESPONSE

    async def send_all(self, data: bytes) -> None:
        self.pending += 1


async def run(count: int) -> float:
    async def fake_connect(host: str, port: int) -> FakeUpstream:
        return FakeUpstream()

    upstream.connect = fake_connect  # type: ignore[assignment]
    deadlines = io.Deadlines()
    deadlines.now = trio.current_time()
    snapshot = load_static("services:\n  bench: [127.0.0.1:8080]\n", "bench.yaml")
    telemetry = Telemetry()
    destinations = Destinations()
    destinations.configure(snapshot.services, {}, {}, deadlines.now)
    forwarder = Forwarder(UpstreamPools(), deadlines)
    handler = build_outbound(router(snapshot), forwarder, telemetry, "client", destinations, clock=deadlines.clock)
    client = FakeClient(count)
    start = time.perf_counter()
    await serve_connection(client, handler, Timeouts(deadlines))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    assert client.sent == count, client.sent
    assert telemetry.requests[("outbound", "client", "bench", "200", "")] == count
    return elapsed


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    best = min(trio.run(run, count) for _ in range(3))
    print(f"{1e6 * best / count:.2f} µs per request (Python path, no sockets; best of 3, {count} requests)")


if __name__ == "__main__":
    main()
