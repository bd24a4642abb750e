"""The exporter's HTTP/1.1 POST client (sidecar/net/poster.py) against a real socket
server written with h11: keep-alive, stale connections, close, chunked answers, hangs,
refusals and garbage."""

from __future__ import annotations

import socket
from functools import partial

import h11
import pytest
import trio

from sidecar.net.poster import Http1Poster, PostError, http_target


class Collector:
    """Answers each POST with ``status``; ``mode``: "keep" (keep-alive), "close" (says
    Connection: close), "stale" (keeps alive but hangs up once idle), "chunked",
    "hang" (reads, never answers), "garbage"."""

    def __init__(self, mode: str = "keep", status: int = 202) -> None:
        self.mode = mode
        self.status = status
        self.bodies: list[bytes] = []
        self.authorizations: list[bytes | None] = []  # each POST's Authorization header
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                event_headers = list(event.headers)
                body = b""
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Data):
                        body += event.data
                self.bodies.append(body)
                self.authorizations.append(next((v for k, v in event_headers if k == b"authorization"), None))
                if self.mode == "hang":
                    await trio.sleep_forever()
                if self.mode == "garbage":
                    await stream.send_all(b"SPDY/3 what\r\n\r\n")
                    return
                headers = [("connection", "close")] if self.mode == "close" else []
                if self.mode == "chunked":
                    headers.append(("transfer-encoding", "chunked"))
                    out = conn.send(h11.Response(status_code=self.status, headers=headers))
                    out += conn.send(h11.Data(data=b'{"ok": true}')) + conn.send(h11.EndOfMessage())
                else:
                    headers.append(("content-length", "0"))
                    out = conn.send(h11.Response(status_code=self.status, headers=headers))
                    out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if self.mode in ("close", "stale"):
                    await stream.aclose()
                    return
                conn.start_next_cycle()


async def serve(nursery: trio.Nursery, collector: Collector) -> str:
    listeners = await nursery.start(partial(trio.serve_tcp, collector.handle, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/api/v2/spans"


@pytest.mark.parametrize(("mode", "connections"), [("keep", 1), ("chunked", 1), ("close", 5), ("stale", 5)])
async def test_five_posts_arrive_whole_on_as_few_connections_as_the_collector_allows(
    nursery: trio.Nursery, mode: str, connections: int
) -> None:
    collector = Collector(mode)
    url = await serve(nursery, collector)
    poster = Http1Poster(timeout=5)
    bodies = [b"[" + b"x" * (n * 70_000) + b"]" for n in range(5)]  # up to 280 kB: several reads
    statuses = []
    for body in bodies:
        statuses.append(await poster.post(url, body))
        await trio.sleep(0.05)  # a "stale" collector has hung up by now; the poster finds out on its next POST
    assert statuses == [202] * 5
    assert collector.bodies == bodies
    assert collector.connections == connections
    poster.close()


async def test_an_authorization_is_sent_only_when_given(nursery: trio.Nursery) -> None:
    collector = Collector()
    url = await serve(nursery, collector)
    poster = Http1Poster(timeout=5)
    assert await poster.post(url, b"[]", authorization=b"Bearer mst_x") == 202
    assert await poster.post(url, b"[]") == 202
    assert collector.authorizations == [b"Bearer mst_x", None]
    poster.close()


async def test_the_status_is_returned_whatever_it_is(nursery: trio.Nursery) -> None:
    url = await serve(nursery, Collector(status=503))
    poster = Http1Poster(timeout=5)
    assert await poster.post(url, b"[]") == 503
    poster.close()


async def test_a_collector_that_never_answers_times_out(nursery: trio.Nursery) -> None:
    url = await serve(nursery, Collector("hang"))
    with pytest.raises(PostError, match="timed out"):
        await Http1Poster(timeout=0.3).post(url, b"[]")


async def test_garbage_instead_of_http_is_an_error(nursery: trio.Nursery) -> None:
    url = await serve(nursery, Collector("garbage"))
    with pytest.raises(PostError, match="not valid HTTP/1.1"):
        await Http1Poster(timeout=5).post(url, b"[]")


async def test_nothing_listening_is_an_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(PostError):
        await Http1Poster(timeout=5).post(f"http://127.0.0.1:{port}/api/v2/spans", b"[]")


def test_only_http_urls() -> None:
    assert http_target("http://zipkin:9411/api/v2/spans") == ("zipkin", 9411, b"zipkin:9411", b"/api/v2/spans")
    assert http_target("http://cp/x?y=1") == ("cp", 80, b"cp", b"/x?y=1")
    for bad in ("https://zipkin/api/v2/spans", "zipkin:9411/api", "http:///nohost"):
        with pytest.raises(ValueError, match="not an http:// URL"):
            http_target(bad)
