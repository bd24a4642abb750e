"""Micro-benchmark: the sidecar's whole per-request Python path, with no sockets.

A fake client connection feeds N keep-alive requests into the real downstream loop;
the real outbound stack routes them and the real forwarder sends them over a fake
upstream connection that answers each with a canned nginx-like response. What is left
is exactly the Python work per request (parsing, layers, header rules, metrics,
serialization, pool bookkeeping): the part of the sidecar's CPU time we control.

    .venv/bin/python benchmarks/micro_path.py [N] [--traced]

``--traced``: also the same path with tracing on (a CLIENT span per request, sampling 1.0,
the trace started here, as a sidecar with a collector does), and finished spans encoded as
the exporter sends them (Zipkin v2 JSON, joined in batches of 500): tracing's whole per-request CPU
cost on this side but the HTTP POST. The two are run in turn, five times each, and the
best of each is shown: on a noisy VM one run against another can differ by a third.
"""

from __future__ import annotations

import socket
import sys
import time

import trio

from meshlet import io
from sidecar.app import build_outbound
from sidecar.core.config import load_static
from sidecar.core.destination import Destinations
from sidecar.core.spans import Endpoint, Span, encode_span, join
from sidecar.layers.routing import router
from sidecar.layers.tracing import Tracer
from sidecar.net import upstream
from sidecar.net.downstream import Timeouts, serve_connection
from sidecar.net.upstream import Forwarder, UpstreamPools
from sidecar.telemetry import Telemetry

REQUEST = b"GET /items/1 HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 05:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


# The pool checks an idle connection with poll() before reusing it: a real, quiet socket
# for that check to find nothing on.
_QUIET, _QUIET_PEER = socket.socketpair()


class FakeSocket:
    def fileno(self) -> int:
        return _QUIET.fileno()

    def close(self) -> None:
        pass


class FakeClient:
    """Plays the client: N requests, one at a time, then EOF."""

    tls = False  # as meshlet.io.Connection: plaintext

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


class BatchEncoder:
    """What the exporter does with each span, but the POST: encoded, joined by 500."""

    def __init__(self) -> None:
        self.batch: list[bytes] = []
        self.spans = 0

    def submit(self, span: Span) -> None:
        self.batch.append(encode_span(span))
        self.spans += 1
        if len(self.batch) == 500:
            join(self.batch)
            self.batch.clear()


async def run(count: int, traced: bool = False) -> float:
    async def fake_connect(host: str, port: int, *, bound: object = None) -> FakeUpstream:
        return FakeUpstream()

    upstream.connect = fake_connect  # type: ignore[assignment]
    deadlines = io.Deadlines()
    deadlines.now = trio.current_time()
    snapshot = load_static("services:\n  bench: [127.0.0.1:8080]\n", "bench.yaml")
    telemetry = Telemetry()
    destinations = Destinations()
    destinations.configure(snapshot.services, {}, {}, deadlines.now)
    forwarder = Forwarder(UpstreamPools(), deadlines)
    spans = BatchEncoder()
    tracer = Tracer("client", Endpoint("client"), spans.submit) if traced else None
    handler = build_outbound(
        router(snapshot), forwarder, telemetry, "client", destinations, clock=deadlines.clock, tracer=tracer
    )
    client = FakeClient(count)
    start = time.perf_counter()
    await serve_connection(client, handler, Timeouts(deadlines))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    assert client.sent == count, client.sent
    assert telemetry.requests[("outbound", "client", "bench", "", "200", "", "")] == count
    assert spans.spans == (count if traced else 0), spans.spans
    return elapsed


def main() -> None:
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    count = int(args[0]) if args else 50_000
    if "--traced" not in sys.argv[1:]:
        best = min(trio.run(run, count) for _ in range(3))
        print(f"{1e6 * best / count:.2f} µs per request (Python path, no sockets; best of 3, {count} requests)")
        return
    plain, traced = [], []
    for _ in range(5):
        plain.append(trio.run(run, count, False))
        traced.append(trio.run(run, count, True))
    untraced_us, traced_us = 1e6 * min(plain) / count, 1e6 * min(traced) / count
    print(
        f"{untraced_us:.2f} µs per request untraced, {traced_us:.2f} traced: tracing adds {traced_us - untraced_us:.2f} µs"
    )
    print(f"(Python path, no sockets; best of 5 runs each, taken in turn, {count} requests a run)")


if __name__ == "__main__":
    main()
