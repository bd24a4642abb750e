"""A span collector that is down, hangs or refuses costs spans, counted, never a request:
a real sidecar tracing every request, a real origin, a real (broken) collector socket."""

from __future__ import annotations

import json
import socket
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from ..helpers import run_sidecar, sample, write_static
from ..origin import Origin

REQUESTS = 200


async def hang(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)  # reads the POST, never answers
    await trio.sleep_forever()


async def refuse(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connections are refused
    return port


@pytest.mark.parametrize(
    ("collector", "reason"),
    [("down", "collector-unreachable"), ("hangs", "collector-unreachable"), ("refuses", "collector-refused")],
)
async def test_a_broken_collector_costs_spans_never_requests(
    tmp_path: Path, origin: Origin, nursery: trio.Nursery, collector: str, reason: str
) -> None:
    if collector == "down":
        port = closed_port()
    else:
        handler = hang if collector == "hangs" else refuse
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
    static = write_static(tmp_path / "s.yaml", {"item": [f"127.0.0.1:{origin.port}"]})
    extra = ["--trace-collector", f"http://127.0.0.1:{port}/api/v2/spans"]
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static, extra=extra) as sidecar:
        async with httpx.AsyncClient(base_url=f"http://{sidecar.outbound}", headers={"host": "item"}) as client:
            codes = [(await client.get("/hello")).status_code for _ in range(REQUESTS)]
            traced = (await client.get("/info")).json()  # the origin sees the trace headers
            with trio.fail_after(20):  # the exporter tries every second; a hung POST times out after 2 s
                while True:
                    metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
                    if sample(metrics, "meshlet_spans_dropped_total", reason=reason) >= REQUESTS:
                        break
                    await trio.sleep(0.5)
    assert codes == [200] * REQUESTS
    assert "traceparent" in {name.lower() for name, _ in traced["headers"]}  # tracing was on
    # The sidecar's own latency histogram: no request waited for the collector. A hung POST times
    # out after 2 s (and a stalled exporter would hold requests as long): every request is in the
    # 0.5 s bucket, far below that and far above what a loaded 2-core machine adds to one request.
    answered = sample(metrics, "meshlet_request_duration_seconds_bucket", direction="outbound", code="200", le="0.5")
    assert answered == REQUESTS + 1
    assert not [line for line in metrics.splitlines() if line.startswith("meshlet_spans_exported_total ")]


class Sink:
    """A collector that takes every batch (202) and counts the spans."""

    def __init__(self) -> None:
        self.spans: list[dict[str, object]] = []

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
            self.spans.extend(json.loads(rest[:length]))
            buffer = rest[length:]
            await stream.send_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")


async def test_every_worker_sends_its_spans_and_sampling_zero_records_none(
    tmp_path: Path, origin: Origin, nursery: trio.Nursery
) -> None:
    sink = Sink()
    listeners = await nursery.start(partial(trio.serve_tcp, sink.handle, 0, host="127.0.0.1"))
    collector = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/api/v2/spans"
    static = write_static(tmp_path / "s.yaml", {"item": [f"127.0.0.1:{origin.port}"]})
    extra = ["--trace-collector", collector, "--workers", "2"]
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static, extra=extra) as sidecar:
        for _ in range(40):  # a new connection each: both workers get some
            async with httpx.AsyncClient(base_url=f"http://{sidecar.outbound}", headers={"host": "item"}) as client:
                assert (await client.get("/hello")).status_code == 200
        with trio.fail_after(10):
            while len(sink.spans) < 40:  # noqa: ASYNC110 - the exporters send every second
                await trio.sleep(0.2)
    assert {span["localEndpoint"]["serviceName"] for span in sink.spans} == {"user"}  # type: ignore[index]
    assert len({span["traceId"] for span in sink.spans}) == 40

    unsampled = ["--trace-collector", collector, "--trace-sampling", "0"]
    async with run_sidecar(tmp_path, service="shop", app="127.0.0.1:1", static=static, extra=unsampled) as sidecar:
        async with httpx.AsyncClient(base_url=f"http://{sidecar.outbound}", headers={"host": "item"}) as client:
            infos = [(await client.get("/info")).json() for _ in range(20)]
        await trio.sleep(2)  # two export intervals
    parents = [dict((k.lower(), v) for k, v in info["headers"])["traceparent"] for info in infos]
    assert all(p.endswith("-00") for p in parents)  # the decision (not sampled) goes on
    assert len(set(parents)) == 20  # each request still a trace of its own
    assert all(span["localEndpoint"]["serviceName"] == "user" for span in sink.spans)  # type: ignore[index]


async def test_a_sampling_rate_outside_0_to_1_is_refused(tmp_path: Path) -> None:
    static = write_static(tmp_path / "s.yaml", {})
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", "sidecar", "--service", "a", "--app", "127.0.0.1:1"]
        + ["--static", str(static), "--trace-sampling", "1.5"],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--trace-sampling 1.5: a share between 0 and 1" in result.stderr.decode()
