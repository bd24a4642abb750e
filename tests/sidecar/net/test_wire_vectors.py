"""Wire vectors for the HTTP/1.1 data path (issue 15): for each, the bytes a client
sends to a real sidecar, the response it must get, and exactly what the upstream saw.

The upstream is scripted here, on raw sockets, so that it can misbehave the way real
apps do: write a second response after the first, ignore a body, close an idle
connection. It records every request it parsed, per connection.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from ...helpers import SidecarProcess, raw_exchange, run_sidecar, write_static

Reply = Callable[[trio.SocketStream, int, bytes], Awaitable[bool]]  # → keep the connection


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)


@dataclass
class Seen:
    connection: int
    head: bytes  # request line and fields, as received
    body: bytes  # de-chunked

    @property
    def request_line(self) -> bytes:
        return self.head.partition(b"\r\n")[0]

    def fields(self, name: bytes) -> list[bytes]:
        lines = self.head.split(b"\r\n")[1:]
        return [v.strip() for n, _, v in (line.partition(b":") for line in lines) if n.lower() == name]


@dataclass
class Upstream:
    """Answers every request with ``<connection>:<target>`` unless ``script`` has the
    target; ``reads_body=False`` plays an app that never reads a request body (its
    bytes are then parsed as the next request, as ``BaseHTTPRequestHandler`` does)."""

    port: int = 0
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)
    script: dict[bytes, Reply] = field(default_factory=dict)
    reads_body: bool = True

    def requests(self) -> list[Seen]:
        """What callers sent (not the sidecar's health probes)."""
        return [s for s in self.seen if not s.request_line.startswith(b"GET /health ")]

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        buffer = bytearray()

        async def more() -> bool:
            data = await stream.receive_some(65536)
            buffer.extend(data)
            return bool(data)

        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    if not await more():
                        return
                end = buffer.index(b"\r\n\r\n")
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                seen = Seen(number, head, b"")
                self.seen.append(seen)
                if self.reads_body:
                    if seen.fields(b"transfer-encoding") == [b"chunked"]:
                        while True:
                            while b"\r\n" not in buffer:
                                if not await more():
                                    return
                            line_end = buffer.index(b"\r\n")
                            size = int(bytes(buffer[:line_end]), 16)
                            while len(buffer) < line_end + 2 + size + 2:
                                if not await more():
                                    return
                            seen.body += bytes(buffer[line_end + 2 : line_end + 2 + size])
                            del buffer[: line_end + 2 + size + 2]
                            if size == 0:
                                break
                    else:
                        length = int((seen.fields(b"content-length") or [b"0"])[0])
                        while len(buffer) < length:
                            if not await more():
                                return
                        seen.body = bytes(buffer[:length])
                        del buffer[:length]
                target = seen.request_line.split(b" ")[1]
                reply = self.script.get(target)
                if reply is None:
                    await stream.send_all(ok(b"%d:%b" % (number, target)))
                elif not await reply(stream, number, target):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            return
        finally:
            stream.socket.close()


@dataclass
class Setup:
    sidecar: SidecarProcess  # service "item": inbound → the upstream; outbound "item" → the upstream too
    upstream: Upstream

    @property
    def inbound(self) -> int:
        return self.sidecar.ports["inbound"]

    @property
    def outbound(self) -> int:
        return self.sidecar.ports["outbound"]


@pytest.fixture
async def setup(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Setup]:
    upstream = Upstream()
    port = await nursery.start(upstream.serve)
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [f"127.0.0.1:{port}"], "timeout": "1s"}})
    async with run_sidecar(tmp_path, service="item", app=f"127.0.0.1:{port}", static=static) as sidecar:
        yield Setup(sidecar, upstream)


class Client:
    """One client connection that reads one response at a time (Content-Length framed)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def exchange(self, data: bytes) -> bytes:
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> bytes:
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    return bytes(self.buffer)
                self.buffer += data
            end = self.buffer.index(b"\r\n\r\n") + 4
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.partition(b":")[2])
            while len(self.buffer) < end + length:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                self.buffer += data
            response = bytes(self.buffer[: end + length])
            del self.buffer[: end + length]
            return response

    async def aclose(self) -> None:
        await self.stream.aclose()


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


# --- 1. a response never reaches the wrong caller -------------------------------------


@pytest.mark.parametrize("delay", [0.0, 0.3])
async def test_bytes_an_idle_pooled_connection_received_never_reach_the_next_caller(setup: Setup, delay: float) -> None:
    """The upstream writes a second response after the first (at once, or while the
    connection sits idle in the pool): the next caller gets its own answer from a fresh
    connection, never the stray one."""

    async def answer_twice(stream: trio.SocketStream, number: int, target: bytes) -> bool:
        await stream.send_all(ok(b"first"))
        await trio.sleep(delay)
        await stream.send_all(ok(b"STRAY"))
        return True

    setup.upstream.script[b"/twice"] = answer_twice
    first = await raw_exchange(setup.inbound, b"GET /twice HTTP/1.1\r\nHost: item\r\n\r\n", read_until_close=False)
    assert body_of(first) == b"first"
    await trio.sleep(delay + 0.3)  # the stray response is in the sidecar's socket buffer by now
    client = await Client.open(setup.inbound)
    second = await client.exchange(b"GET /next HTTP/1.1\r\nHost: item\r\n\r\n")
    await client.aclose()
    assert second.startswith(b"HTTP/1.1 200 ") and body_of(second).endswith(b":/next"), second
    (twice, after) = setup.upstream.requests()
    assert twice.request_line == b"GET /twice HTTP/1.1"
    assert after.request_line == b"GET /next HTTP/1.1" and after.connection != twice.connection


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"TRACE"])
@pytest.mark.parametrize("framing", [b"content-length: 5\r\n\r\nhello", b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"])
async def test_a_body_on_a_method_without_body_semantics_is_refused(
    setup: Setup, method: bytes, framing: bytes
) -> None:
    """Apps ignore such a body and read it as their next request (a request the sidecar
    never saw, and a response for the next caller): 400, the upstream sees nothing."""
    smuggled = b"GET /admin HTTP/1.1\r\nHost: item\r\n\r\n"
    body = framing.replace(b"hello", smuggled).replace(b"content-length: 5", b"content-length: %d" % len(smuggled))
    for port in (setup.inbound, setup.outbound):
        response = await raw_exchange(port, method + b" /x HTTP/1.1\r\nHost: item\r\n" + body)
        assert response.startswith(b"HTTP/1.1 400 "), response
        assert b"x-meshlet-error: bad-request" in response and b"connection: close" in response
    assert setup.upstream.requests() == []


async def test_a_body_on_delete_that_the_app_ignores_is_never_a_second_request(setup: Setup) -> None:
    """``BaseHTTPRequestHandler`` (examples/services.py) never reads a DELETE's body."""
    setup.upstream.reads_body = False
    smuggled = b"GET /admin HTTP/1.1\r\nHost: item\r\n\r\n"
    request = b"DELETE /x HTTP/1.1\r\nHost: item\r\nContent-Length: %d\r\n\r\n%b" % (len(smuggled), smuggled)
    response = await raw_exchange(setup.inbound, request)
    assert response.startswith(b"HTTP/1.1 400 ")
    assert setup.upstream.requests() == []
    # Without a body, the same request goes through.
    response = await raw_exchange(setup.inbound, b"DELETE /x HTTP/1.1\r\nHost: item\r\n\r\n", read_until_close=False)
    assert response.startswith(b"HTTP/1.1 200 ")
    assert [s.request_line for s in setup.upstream.requests()] == [b"DELETE /x HTTP/1.1"]


# --- 12. a pooled connection the app closed while idle ----------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "body"),
    [
        (b"POST /upload HTTP/1.1\r\nHost: item\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"POST /upload HTTP/1.1\r\nHost: item\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (b"GET /upload HTTP/1.1\r\nHost: item\r\n\r\n", b""),
    ],
    ids=["chunked", "content-length", "no-body"],
)
async def test_a_request_after_the_app_closed_the_idle_pooled_connection_goes_on_a_fresh_one(
    setup: Setup, request_bytes: bytes, body: bytes
) -> None:
    """HTTPWookiee 2001/2002/2030: the app closes a keep-alive connection it answered on;
    the next request, whatever its body, reaches the app once, whole, on a new connection."""

    async def answer_then_close(stream: trio.SocketStream, number: int, target: bytes) -> bool:
        await stream.send_all(ok(b"bye"))
        return False

    setup.upstream.script[b"/close-after"] = answer_then_close
    for port in (setup.inbound, setup.outbound):
        client = await Client.open(port)
        assert body_of(await client.exchange(b"GET /close-after HTTP/1.1\r\nHost: item\r\n\r\n")) == b"bye"
        await trio.sleep(0.3)  # the app's close reaches the sidecar's pooled connection
        response = await client.exchange(request_bytes)
        await client.aclose()
        assert response.startswith(b"HTTP/1.1 200 ") and body_of(response).endswith(b":/upload"), response
    seen = setup.upstream.requests()
    assert [s.request_line.split(b" ")[1] for s in seen] == [b"/close-after", b"/upload"] * 2
    closed_on, upload = seen[0], seen[1]
    assert upload.connection != closed_on.connection and upload.body == body
    assert seen[3].connection != seen[2].connection and seen[3].body == body


@pytest.mark.parametrize(
    ("request_bytes", "body"),
    [
        (b"PUT /upload HTTP/1.1\r\nHost: item\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"PUT /upload HTTP/1.1\r\nHost: item\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (b"PUT /upload HTTP/1.1\r\nHost: item\r\n\r\n", b""),
    ],
    ids=["chunked", "content-length", "no-body"],
)
async def test_a_pooled_connection_the_app_closes_as_the_request_arrives_is_replaced(
    setup: Setup, request_bytes: bytes, body: bytes
) -> None:
    """The race the peek on reuse cannot see: the app closes the idle connection just as
    the next request goes out on it, reading none of it (an RST). It answered nothing,
    so the request, body and all, goes once more on a fresh connection."""

    async def answer_then_reset_on_the_next(stream: trio.SocketStream, number: int, target: bytes) -> bool:
        await stream.send_all(ok(b"first"))
        await trio.lowlevel.wait_readable(stream.socket)  # the next request has come
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # closed unread: the sidecar gets an RST

    setup.upstream.script[b"/first"] = answer_then_reset_on_the_next
    client = await Client.open(setup.inbound)
    assert body_of(await client.exchange(b"GET /first HTTP/1.1\r\nHost: item\r\n\r\n")) == b"first"
    response = await client.exchange(request_bytes)
    await client.aclose()
    assert response.startswith(b"HTTP/1.1 200 ") and body_of(response).endswith(b":/upload"), response
    first, upload = setup.upstream.requests()
    assert upload.request_line == b"PUT /upload HTTP/1.1" and upload.connection != first.connection
    assert upload.body == body


async def test_a_post_on_a_pooled_connection_the_app_closes_is_never_sent_twice(setup: Setup) -> None:
    """The same race with a POST: a connection closed without an answer cannot tell
    "closed while idle" from "read the request, then died", and a POST must not be
    applied twice (RFC 9112 §9.3.1). The caller gets 502 upstream-reset; only a retry
    policy that allows non-idempotent retries may send it again."""

    async def answer_then_reset_on_the_next(stream: trio.SocketStream, number: int, target: bytes) -> bool:
        await stream.send_all(ok(b"first"))
        await trio.lowlevel.wait_readable(stream.socket)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False

    setup.upstream.script[b"/first"] = answer_then_reset_on_the_next
    client = await Client.open(setup.inbound)
    assert body_of(await client.exchange(b"GET /first HTTP/1.1\r\nHost: item\r\n\r\n")) == b"first"
    response = await client.exchange(b"POST /pay HTTP/1.1\r\nHost: item\r\nContent-Length: 5\r\n\r\nhello")
    await client.aclose()
    assert response.startswith(b"HTTP/1.1 502 ") and b"x-meshlet-error: upstream-reset" in response.lower(), response
    assert [s.request_line for s in setup.upstream.requests()] == [b"GET /first HTTP/1.1"]


# --- 11. an Upgrade request with a body --------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: item\r\n\r\n"


@pytest.mark.parametrize("upgrade", [b"websocket", b"h2c"])
@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED),
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
    ],
    ids=["content-length", "chunked"],
)
async def test_an_upgrade_request_with_a_body_is_a_plain_request_with_that_body(
    setup: Setup, upgrade: bytes, framing: bytes
) -> None:
    """llhttp stops at an upgrade head and leaves the body unparsed: the body must go
    to the app as the body (as HAProxy does), never be parsed as a next request, nor
    left for the app to take from the next one. The upgrade itself is dropped."""
    for port in (setup.inbound, setup.outbound):
        client = await Client.open(port)
        head = b"POST /up HTTP/1.1\r\nHost: item\r\nConnection: Upgrade\r\nUpgrade: %b\r\n" % upgrade
        response = await client.exchange(head + framing)
        assert response.startswith(b"HTTP/1.1 200 ") and body_of(response).endswith(b":/up"), response
        response = await client.exchange(b"GET /next HTTP/1.1\r\nHost: item\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 ") and body_of(response).endswith(b":/next"), response
        await client.aclose()
    seen = setup.upstream.requests()
    assert [s.request_line for s in seen] == [b"POST /up HTTP/1.1", b"GET /next HTTP/1.1"] * 2
    for up in seen[0::2]:
        assert up.body == SMUGGLED
        assert up.fields(b"upgrade") == [] and up.fields(b"connection") == []


# --- 13. Host and target agree; HTTP/1.0; a slow body is the client's fault -----------------


@pytest.mark.parametrize(
    "host_line", [b"Host: other\r\n", b"Host: \r\n", b"Host: item.evil\r\n"], ids=["other", "empty", "suffix"]
)
async def test_inbound_absolute_form_with_a_host_that_disagrees_is_400(setup: Setup, host_line: bytes) -> None:
    response = await raw_exchange(setup.inbound, b"GET http://item/x HTTP/1.1\r\n" + host_line + b"\r\n")
    assert response.startswith(b"HTTP/1.1 400 ") and b"x-meshlet-error: bad-request" in response, response
    assert setup.upstream.requests() == []


async def test_inbound_absolute_form_that_agrees_goes_upstream_in_origin_form(setup: Setup) -> None:
    response = await raw_exchange(
        setup.inbound, b"GET http://ITEM/x?q=1 HTTP/1.1\r\nHost: item\r\n\r\n", read_until_close=False
    )
    assert response.startswith(b"HTTP/1.1 200 ") and body_of(response).endswith(b":/x?q=1"), response
    (seen,) = setup.upstream.requests()
    assert seen.request_line == b"GET /x?q=1 HTTP/1.1" and seen.fields(b"host") == [b"item"]


async def test_outbound_absolute_form_wins_over_a_different_host(setup: Setup) -> None:
    """RFC 9112 §3.2.2: a proxy ignores Host and sends the target's authority instead."""
    response = await raw_exchange(
        setup.outbound, b"GET http://item/x HTTP/1.1\r\nHost: other\r\n\r\n", read_until_close=False
    )
    assert response.startswith(b"HTTP/1.1 200 "), response
    (seen,) = setup.upstream.requests()
    assert seen.request_line == b"GET /x HTTP/1.1" and seen.fields(b"host") == [b"item"]


async def test_http10_without_host_reaches_the_app_as_http11_with_a_host(setup: Setup) -> None:
    response = await raw_exchange(setup.inbound, b"GET /old HTTP/1.0\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ") and body_of(response).endswith(b":/old"), response
    (seen,) = setup.upstream.requests()
    assert seen.request_line == b"GET /old HTTP/1.1" and seen.fields(b"host") == [b"item"]


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
async def test_a_request_body_that_stops_coming_is_408_not_504(setup: Setup, listener: str) -> None:
    """The client stalls mid-body past the request timeout (1 s: the route's outbound,
    the caller's deadline inbound): its fault, 408; the app saw the head, then a close."""
    port = setup.outbound if listener == "outbound" else setup.inbound
    request = b"POST /slow HTTP/1.1\r\nHost: item\r\nx-meshlet-deadline-ms: 1000\r\nContent-Length: 10\r\n\r\nabc"
    with trio.fail_after(10):
        response = await raw_exchange(port, request, timeout=8)
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert b"x-meshlet-error: bad-request" in response and b"connection: close" in response
    (seen,) = setup.upstream.requests()
    assert seen.request_line == b"POST /slow HTTP/1.1" and seen.body == b""  # never whole


# --- 10. mesh errors name no internal address ------------------------------------------------


async def test_connect_failed_shows_the_caller_no_internal_address(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = b"127.0.0.1:%d" % port
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [address.decode()]}})
    async with run_sidecar(tmp_path, service="item", app=address.decode(), static=static) as sidecar:
        for listener in ("inbound", "outbound"):
            response = await raw_exchange(
                sidecar.ports[listener], b"GET /x HTTP/1.1\r\nHost: item\r\n\r\n", read_until_close=False
            )
            assert response.startswith(b"HTTP/1.1 503 ") and b"x-meshlet-error: connect-failed" in response
            assert b"refused" in body_of(response), response
            assert b"127.0.0.1" not in response and b"%d" % port not in response, response
        # The sidecar's own log keeps the detail, once per failing streak.
        assert sidecar.log().count(f"connect to {address.decode()}") == 1, sidecar.log()


# --- pipelining: a good request, then bad bytes in the same read ---------------------------


@pytest.mark.parametrize(
    "first",
    [
        b"GET /good HTTP/1.1\r\nHost: item\r\n\r\n",
        b"POST /good HTTP/1.1\r\nHost: item\r\nContent-Length: 4\r\n\r\nabcd",
    ],
    ids=["no-body", "body"],
)
async def test_a_good_request_before_bad_bytes_is_answered_first(setup: Setup, first: bytes) -> None:
    """llhttp's "Emitting part of body and pausing": the bytes after a complete request
    are garbage. The request is answered (RFC 9112 §9.3.2: in order), then the garbage
    gets 400 and the connection closes; only the good request reaches the app."""
    for port in (setup.inbound, setup.outbound):
        response = await raw_exchange(port, first + b"efgh\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 "), response
        assert b"HTTP/1.1 400 " in response.partition(b"HTTP/1.1 200 ")[2], response  # after the answer
    assert [s.request_line.split(b" ")[1] for s in setup.upstream.requests()] == [b"/good", b"/good"]
