"""Span export (sidecar/net/exporter.py): batches reach the collector, off the request
path; a full queue or a collector that is down or refusing costs spans, counted, and
never blocks the caller. On trio's fake clock, with the collector as an ASGI app."""

from __future__ import annotations

import json

import httpx
import trio
import trio.testing
from starlette.applications import Starlette

from control_plane.span_tokens import SpanTokens
from control_plane.traces import TraceStore
from control_plane.zipkin import zipkin_routes
from sidecar.core.spans import SERVER, Endpoint, Span
from sidecar.net.exporter import Collector, SpanExporter

SPAN_TOKEN = "mst_" + "t" * 43


def span(n: int) -> Span:
    made = Span("a" * 32, f"{n + 1:016x}", None, SERVER, "get /", Endpoint("item"), None, 1_000_000 + n)
    made.finish(5, 200)
    return made


class Down(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        raise httpx.ConnectError("connection refused")


async def test_batches_reach_the_collector(autojump_clock: trio.abc.Clock) -> None:
    store, tokens = TraceStore(), SpanTokens()
    tokens.grant(object(), SPAN_TOKEN, "item")  # what the control plane's welcome gave this sidecar
    transport = httpx.ASGITransport(app=Starlette(routes=zipkin_routes(store, tokens, "api-token")))
    sent: list[int] = []
    collector = Collector("http://cp/api/v2/spans", SPAN_TOKEN)
    exporter = SpanExporter(lambda: collector, batch=10, transport=transport, on_sent=sent.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run)
        for n in range(25):
            exporter.submit(span(n))
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert exporter.stats() == {"queued": 0, "sent": 25, "dropped": 0}
    assert sent == [10, 10, 5]  # what meshlet_spans_exported_total counts, batch by batch
    assert store.span_count == 25 and store.services() == ["item"]


async def test_a_collector_that_is_down_costs_counted_spans_and_backs_off(autojump_clock: trio.abc.Clock) -> None:
    down = Down()
    dropped: list[tuple[int, str]] = []
    exporter = SpanExporter(
        "http://cp/api/v2/spans", transport=down, interval=1.0, on_dropped=lambda n, why: dropped.append((n, why))
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run)
        for second in range(60):
            exporter.submit(span(second))
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert exporter.sent == 0 and exporter.dropped + len(exporter.queue) == 60  # each span delivered or counted
    assert {why for _, why in dropped} == {"collector-unreachable"}
    assert down.calls < 15  # backing off (1, 2, 4 ... 30 s), not one try a second


def test_a_full_queue_drops_instead_of_waiting() -> None:
    exporter = SpanExporter("http://cp/api/v2/spans", max_queue=3)
    for n in range(5):  # submit is synchronous: it cannot wait, even with no sender running
        exporter.submit(span(n))
    assert (len(exporter.queue), exporter.dropped) == (3, 2)


async def test_a_refused_batch_is_counted(autojump_clock: trio.abc.Clock) -> None:
    async def refuse(scope: dict[str, object], receive: object, send: object) -> None:
        body = json.dumps({"problems": ["no"]}).encode()
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-length", b"%d" % len(body))]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    exporter = SpanExporter("http://cp/api/v2/spans", transport=httpx.ASGITransport(app=refuse))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run)
        exporter.submit(span(1))
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert (exporter.sent, exporter.dropped) == (0, 1)


class Sink(httpx.AsyncBaseTransport):
    """A collector that takes 2 ms to answer each POST, and counts the spans it got."""

    def __init__(self) -> None:
        self.posts: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        await trio.sleep(0.002)
        self.posts.append(len(json.loads(body)))
        return httpx.Response(202)


async def test_under_steady_load_spans_go_in_full_batches(autojump_clock: trio.abc.Clock) -> None:
    # 10 spans a millisecond for 3 s: what arrives during a POST must not get a POST of
    # its own (that was one POST per couple of spans, ~0.5 ms of CPU each in httpx).
    sink = Sink()
    exporter = SpanExporter("http://cp/api/v2/spans", transport=sink, batch=500, interval=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run)
        for n in range(30_000):
            exporter.submit(span(n))
            if n % 10 == 9:
                await trio.sleep(0.001)
        await trio.sleep(2)  # the rest goes at the next interval
        nursery.cancel_scope.cancel()
    assert sum(sink.posts) == 30_000 and exporter.dropped == 0
    assert len(sink.posts) <= 30_000 // 500 + 3, sink.posts
    assert min(sink.posts[:-1]) == 500


class Recorder(httpx.AsyncBaseTransport):
    """A collector that takes every batch and keeps each request's headers."""

    def __init__(self) -> None:
        self.headers: list[httpx.Headers] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        return httpx.Response(202)


async def test_the_span_token_goes_to_the_control_planes_store_only(autojump_clock: trio.abc.Clock) -> None:
    # MeshConfig may name an external collector at any time: it gets the spans, never the token.
    recorder = Recorder()
    where: list[str | Collector] = [Collector("http://cp/api/v2/spans", SPAN_TOKEN)]
    exporter = SpanExporter(lambda: where[-1], batch=1, transport=recorder)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exporter.run)
        exporter.submit(span(1))
        await trio.sleep(2)
        where.append("http://zipkin.example:9411/api/v2/spans")
        exporter.submit(span(2))
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert [h.get("authorization") for h in recorder.headers] == [f"Bearer {SPAN_TOKEN}", None]
    assert SPAN_TOKEN not in repr(where[0])
