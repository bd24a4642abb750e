"""HTTP/2 to an app that declared it: a real HTTP/1.1 client (httpx) → the sidecar's inbound
stack on a real listener (in this process: the app's protocol is set on its Endpoint, as the
sidecar will once ``--app-protocol`` exists) → a real h2c app (hypercorn, its own process,
tests/h2_app.py). The app must really see HTTP/2; bodies stream both ways in bounded memory;
requests share one connection; the deadline cancels the stream."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio
from h2.errors import ErrorCodes

from meshlet.io import Deadlines
from sidecar.app import build_inbound
from sidecar.core.http1 import RequestHead
from sidecar.core.services import Endpoint
from sidecar.layers.base import Request
from sidecar.net.downstream import Timeouts
from sidecar.net.listeners import serve_http
from sidecar.net.upstream import Forwarder, UpstreamPools
from sidecar.telemetry import Telemetry
from tests.h2_server import H2Server, ServerStream

ROOT = Path(__file__).resolve().parents[2]
BIG = 50 * 1024 * 1024


@pytest.fixture
def app_port() -> Iterator[int]:
    """tests/h2_app.py (hypercorn) in a process of its own."""
    argv = [sys.executable, "-m", "tests.h2_app"]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            ready = process.stdout.readline().split()
            assert ready[:1] == ["ready"], ready
            yield int(ready[1])
        finally:
            process.terminate()
            process.wait(timeout=10)


class Sidecar:
    def __init__(self, pools: UpstreamPools, forwarder: Forwarder, port: int) -> None:
        self.pools = pools
        self.forwarder = forwarder
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
async def sidecar(nursery: trio.Nursery, app_port: int) -> AsyncIterator[Sidecar]:
    deadlines = Deadlines(tick=0.05)
    await nursery.start(deadlines.serve)
    pools = UpstreamPools(clock=deadlines.clock)
    pools.nursery = nursery
    forwarder = Forwarder(pools, deadlines)
    app = Endpoint("127.0.0.1", app_port, protocol="http2")
    handler = build_inbound(app, forwarder, Telemetry(), "app")
    port = await nursery.start(serve_http, "127.0.0.1", 0, handler, Timeouts(deadlines))
    yield Sidecar(pools, forwarder, port)
    for pool in pools.h2_pools.values():
        pool.close_all()


def client() -> httpx.Client:
    return httpx.Client(timeout=30, trust_env=False)


async def get(url: str, **kwargs: object) -> httpx.Response:
    def call() -> httpx.Response:
        with client() as c:
            return c.get(url, **kwargs)  # type: ignore[arg-type]

    return await trio.to_thread.run_sync(call)


async def test_an_http1_client_reaches_an_h2c_app_over_http2(sidecar: Sidecar) -> None:
    response = await get(sidecar.url + "/info")
    assert response.status_code == 200 and response.http_version == "HTTP/1.1"
    info = response.json()
    assert info["http_version"] == "2" and info["method"] == "GET"
    headers = dict(info["headers"])
    assert headers["via"] == "1.1 meshlet" and headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["host"] == sidecar.url.removeprefix("http://")  # hypercorn shows :authority as host
    assert "connection" not in headers
    assert response.headers["via"].endswith("1.1 meshlet")


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def test_50_mb_each_way_stream_through_in_bounded_memory(sidecar: Sidecar) -> None:
    piece = b"p" * 65536
    expected = hashlib.sha256(piece * (BIG // len(piece))).hexdigest()

    def upload_and_download() -> tuple[str, int]:
        with client() as c:
            sent = c.post(sidecar.url + "/sha256", content=(piece for _ in range(BIG // len(piece))))
            received = 0
            with c.stream("GET", sidecar.url + f"/bytes/{BIG}") as response:
                for data in response.iter_bytes():
                    received += len(data)
            return sent.text, received

    base = peak = rss()
    async with trio.open_nursery() as watch:

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss())
                await trio.sleep(0.01)

        watch.start_soon(sample)
        answer, received = await trio.to_thread.run_sync(upload_and_download)
        watch.cancel_scope.cancel()
    assert answer == f"{BIG} {expected}"
    assert received == BIG
    # Client, sidecar and pool in this process: a body held whole would add 50 MB.
    assert peak - base < 30 * 1024 * 1024, (peak - base) // 1024


async def test_concurrent_requests_share_one_connection(sidecar: Sidecar) -> None:
    answers: list[str] = []

    async def one() -> None:
        answers.append((await get(sidecar.url + "/gather/20")).text)

    with trio.fail_after(30):
        async with trio.open_nursery() as calls:
            for _ in range(20):
                calls.start_soon(one)  # the app answers once all 20 are under way
    assert answers == ["gathered"] * 20
    stats = (await get(sidecar.url + "/stats")).json()
    assert stats["connections"] == 1
    (pool,) = sidecar.pools.h2_pools.values()
    assert pool.connects == 1


async def test_past_the_deadline_504_and_the_app_sees_the_stream_cancelled(sidecar: Sidecar) -> None:
    response = await get(sidecar.url + "/slow", headers={"x-meshlet-deadline-ms": "300"})
    assert response.status_code == 504 and response.headers["x-meshlet-error"] == "timeout"
    with trio.fail_after(10):
        while (await get(sidecar.url + "/stats")).json()["disconnects"] != 1:  # noqa: ASYNC110 - another process
            await trio.sleep(0.05)


async def test_trailers_from_the_app_reach_the_response(sidecar: Sidecar, nursery: trio.Nursery, app_port: int) -> None:
    """An HTTP/1.1 caller cannot see trailers: the Forwarder is called directly."""
    head = RequestHead(b"GET", b"/trailers", [(b"te", b"trailers")], http_version="2", host=b"app")
    request = Request(head, None, b"127.0.0.1")
    request.endpoint = Endpoint("127.0.0.1", app_port)  # undeclared: the version it came in
    request.service = "app"
    response = await sidecar.forwarder(request)
    assert response.status == 200 and response.body is not None
    body = b""
    while (piece := await response.body.read()) is not None:
        body += piece
    response.finish(True)
    assert body == b"body"
    assert response.trailers == [(b"grpc-status", b"0"), (b"x-end", b"yes")]
    assert json.loads((await get(sidecar.url + "/stats")).text)["connections"] == 1


async def test_through_the_listener_a_reset_is_502_and_a_death_mid_body_cuts_the_client(
    nursery: trio.Nursery,
) -> None:
    """The app is a scripted h2 server (tests/h2_server.py): what the HTTP/1.1 caller sees."""

    async def app(stream: ServerStream) -> None:
        path = stream.field(b":path")
        if path == b"/reset":
            await stream.reset_stream(ErrorCodes.INTERNAL_ERROR)
        elif path == b"/refused-once" and stream.id == 1:
            await stream.reset_stream(ErrorCodes.REFUSED_STREAM)
        elif path == b"/die":
            await stream.respond(200, [(b"content-length", b"100000")])
            await stream.send(b"d" * 1000)
            await stream.conn.drop()
        else:
            await stream.respond(200, [(b"content-length", b"2")])
            await stream.send(b"ok", end=True)

    server = H2Server(app)
    await server.start(nursery)
    deadlines = Deadlines(tick=0.05)
    await nursery.start(deadlines.serve)
    pools = UpstreamPools(clock=deadlines.clock)
    pools.nursery = nursery
    handler = build_inbound(
        Endpoint("127.0.0.1", server.port, protocol="grpc"), Forwarder(pools, deadlines), Telemetry(), "app"
    )
    port = await nursery.start(serve_http, "127.0.0.1", 0, handler, Timeouts(deadlines))
    url = f"http://127.0.0.1:{port}"

    response = await get(url + "/refused-once")
    assert (response.status_code, response.text) == (200, "ok")
    response = await get(url + "/reset")
    assert response.status_code == 502 and response.headers["x-meshlet-error"] == "upstream-reset"

    def die() -> int:
        received = 0
        with client() as c, c.stream("GET", url + "/die") as streamed:
            assert streamed.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):  # a short body, never a complete-looking one
                for data in streamed.iter_bytes():
                    received += len(data)
        return received

    assert await trio.to_thread.run_sync(die) < 100_000
