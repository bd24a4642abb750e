"""sidecar.net.http2 on real sockets: a listener (serve_http, the sidecar's own) with an
in-process handler, and clients writing frames with hyperframe and hpack, so that a client
can break every rule: the attacks, each closing its connection (or resetting its stream),
counted, while a second client is still served; and the server's duties (flow control both
ways, trailers, mesh errors, resets, draining, detection of the preface cut in pieces)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshlet.io import Deadlines
from sidecar.core import errors, http2
from sidecar.layers.base import WOULD_BLOCK, BodyPiece, Request, Response
from sidecar.net import http2 as net_http2
from sidecar.net.downstream import Timeouts
from sidecar.net.listeners import serve_http

AUTHORITY = b"item"


class Bytes:
    """A response body of ``total`` bytes, in pieces of ``piece``."""

    def __init__(self, total: int, piece: int = 64 * 1024) -> None:
        self.left = total
        self.piece = piece

    def read_nowait(self) -> BodyPiece:
        return WOULD_BLOCK if self.left else None

    async def read(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        if not self.left:
            return None
        n = min(self.left, self.piece)
        self.left -= n
        return b"x" * n


class App:
    """The handler behind the listener; what it saw."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.finished: list[tuple[bool, int]] = []  # (complete, body_bytes) per response
        self.cancelled = 0
        self.release = trio.Event()
        self.bodies: list[bytes] = []

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        path = request.head.target
        if path == b"/hold":  # waits until released; counts a cancellation
            try:
                await self.release.wait()
            except trio.Cancelled:
                self.cancelled += 1
                raise
            return self._track(Response(200, b"OK", []))
        if path == b"/echo":
            assert request.body is not None
            body = b""
            while (piece := await request.body.read()) is not None:
                body += piece
            self.bodies.append(body)
            response = Response(200, b"OK", [(b"content-type", b"application/octet-stream")])
            response.body = Bytes(len(body))
            response.framing = "chunked"
            return self._track(response)
        if path.startswith(b"/big/"):
            response = Response(200, b"OK", [(b"Connection", b"keep-alive")])
            response.body = Bytes(int(path[5:]))
            response.framing = "chunked"
            return self._track(response)
        if path == b"/trailers":
            response = Response(200, b"OK", [(b"content-type", b"application/grpc")])
            response.body = Bytes(5)
            response.framing = "chunked"
            response.trailers = [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
            return self._track(response)
        if path == b"/error":
            return self._track(Response.mesh(errors.NO_ROUTE, "no service named 'x'"))
        return self._track(Response(200, b"OK", [(b"content-type", b"text/plain")]))

    def _track(self, response: Response) -> Response:
        response.on_finish = lambda complete: self.finished.append((complete, response.body_bytes))
        return response


OPEN: list[trio.SocketStream] = []  # the clients' connections, closed after each test


@asynccontextmanager
async def listening(
    app: Callable[[Request], Awaitable[Response]], *, idle: float = 300.0
) -> AsyncIterator[tuple[int, Timeouts]]:
    deadlines = Deadlines(tick=0.02)
    timeouts = Timeouts(deadlines, idle=idle, header=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(deadlines.serve)
        port = await nursery.start(partial(serve_http, "127.0.0.1", 0, app, timeouts))
        try:
            with trio.fail_after(30):  # a bound on every test's wait
                yield port, timeouts
        finally:
            while OPEN:
                OPEN.pop().socket.close()
            nursery.cancel_scope.cancel()


class Client:
    """A raw HTTP/2 client: frames out as written, frames in parsed."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.buffer = b""
        self.next_id = 1

    @classmethod
    async def open(cls, port: int, *, settings: dict[int, int] | None = None, preface: bool = True) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        OPEN.append(client.stream)
        if preface:
            await client.send(http2.PREFACE + SettingsFrame(0, settings=settings or {}).serialize())
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def headers(
        self,
        path: bytes,
        *,
        method: bytes = b"GET",
        end: bool = True,
        extra: list[tuple[bytes, bytes]] | None = None,
        fields: list[tuple[bytes, bytes]] | None = None,
    ) -> tuple[int, bytes]:
        stream_id = self.next_id
        self.next_id += 2
        frame = HeadersFrame(stream_id)
        if fields is None:
            fields = [(b":method", method), (b":scheme", b"http"), (b":path", path), (b":authority", AUTHORITY)]
        frame.data = self.encoder.encode([*fields, *(extra or [])])
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return stream_id, frame.serialize()

    async def frame(self) -> Frame | None:
        """The next frame; None at the end of the connection."""
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                    self.buffer = self.buffer[9 + length :]
                    return frame
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.buffer += data

    async def response(self, stream_id: int) -> tuple[dict[bytes, bytes], bytes, dict[bytes, bytes]]:
        """Headers, body and trailers of a stream (acknowledging the data it reads)."""
        headers: dict[bytes, bytes] = {}
        trailers: dict[bytes, bytes] = {}
        body = b""
        while True:
            frame = await self.frame()
            assert frame is not None, "the connection ended before the response"
            if frame.stream_id != stream_id:
                continue
            if isinstance(frame, HeadersFrame):
                fields = dict(self.decoder.decode(frame.data, raw=True))
                (trailers if headers else headers).update(fields)
            elif isinstance(frame, DataFrame):
                body += frame.data
                if frame.data:
                    await self.send(window_update(0, len(frame.data)) + window_update(stream_id, len(frame.data)))
            elif isinstance(frame, RstStreamFrame):
                raise AssertionError(f"stream reset: {frame.error_code}")
            if "END_STREAM" in frame.flags:
                return headers, body, trailers

    async def until_closed(self) -> list[Frame]:
        """Frames until the server closes the connection (bounded by the test's timeout)."""
        frames = []
        while (frame := await self.frame()) is not None:
            frames.append(frame)
        return frames

    async def get(self, path: bytes) -> tuple[dict[bytes, bytes], bytes, dict[bytes, bytes]]:
        stream_id, data = self.headers(path)
        await self.send(data)
        return await self.response(stream_id)


async def until(condition: Callable[[], object]) -> None:
    """Wait for ``condition`` (state the server task changes); bounded by the test's timeout."""
    while not condition():  # noqa: ASYNC110 - polled: the server has no event for the test to wait on
        await trio.sleep(0.01)


def window_update(stream_id: int, increment: int) -> bytes:
    return WindowUpdateFrame(stream_id, window_increment=increment).serialize()


def rst(stream_id: int) -> bytes:
    frame = RstStreamFrame(stream_id)
    frame.error_code = ErrorCodes.CANCEL
    return frame.serialize()


async def still_served(port: int) -> None:
    client = await Client.open(port)
    headers, _, _ = await client.get(b"/hello")
    assert headers[b":status"] == b"200"
    await client.stream.aclose()


def goaway_code(frames: list[Frame]) -> int:
    codes = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    assert codes, "no GOAWAY"
    return codes[-1]


# the server's duties ----------------------------------------------------------------------


async def test_requests_reach_the_handler_as_version_2_and_responses_come_back() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        headers, body, _ = await client.get(b"/big/100000")
        assert headers[b":status"] == b"200" and len(body) == 100000
        assert b"connection" not in headers  # connection-specific: never in HTTP/2
        head = app.requests[0].head
        assert (head.http_version, head.host, head.target, head.chunked) == ("2", AUTHORITY, b"/big/100000", False)
        assert app.finished == [(True, 100000)]
        assert timeouts.http2.served == 1 and timeouts.http2.connections == 1


async def test_a_request_body_is_streamed_to_the_handler() -> None:
    app = App()
    async with listening(app) as (port, _):
        client = await Client.open(port)
        stream_id, data = client.headers(b"/echo", method=b"POST", end=False)
        body = DataFrame(stream_id)
        body.data = b"a" * 1000
        last = DataFrame(stream_id)
        last.data = b"b" * 10
        last.flags.add("END_STREAM")
        await client.send(data + body.serialize() + last.serialize())
        headers, answer, _ = await client.response(stream_id)
        assert headers[b":status"] == b"200" and len(answer) == 1010
        assert app.bodies == [b"a" * 1000 + b"b" * 10]
        assert app.requests[0].head.chunked and app.requests[0].body.received == 1010  # type: ignore[union-attr]


async def test_trailers_end_the_stream_after_the_body() -> None:
    app = App()
    async with listening(app) as (port, _):
        client = await Client.open(port)
        headers, body, trailers = await client.get(b"/trailers")
        assert body == b"xxxxx" and trailers == {b"grpc-status": b"0", b"grpc-message": b"ok"}


async def test_a_mesh_error_reaches_an_http2_client_with_its_reason() -> None:
    app = App()
    async with listening(app) as (port, _):
        client = await Client.open(port)
        headers, body, _ = await client.get(b"/error")
        assert headers[b":status"] == b"404" and headers[b"x-meshlet-error"] == b"no-route"
        assert body == b"no-route: no service named 'x'\n"
        assert app.finished == [(True, len(body))]


async def test_a_request_the_path_cannot_take_is_answered_400_and_the_connection_goes_on() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        stream_id, data = client.headers(b"", fields=[(b":method", b"CONNECT"), (b":authority", b"db:5432")])
        await client.send(data)
        headers, body, _ = await client.response(stream_id)
        assert headers[b":status"] == b"400" and b"CONNECT" in body
        stream_id, data = client.headers(
            b"/", fields=[(b":method", b"GET"), (b":scheme", b"ftp"), (b":path", b"/"), (b":authority", AUTHORITY)]
        )
        await client.send(data)
        headers, body, _ = await client.response(stream_id)
        assert headers[b":status"] == b"400" and b":scheme" in body
        assert timeouts.rejected["400"] == 2 and app.requests == []
        headers, _, _ = await client.get(b"/hello")
        assert headers[b":status"] == b"200"


async def test_a_host_that_disagrees_with_authority_is_refused_by_h2_as_malformed() -> None:
    """h2 (validate_inbound_headers) makes it a connection error: closed, nothing forwarded."""
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        _, data = client.headers(b"/", extra=[(b"host", b"other")])
        await client.send(data)
        with trio.fail_after(10):
            frames = await client.until_closed()
        assert goaway_code(frames) == ErrorCodes.PROTOCOL_ERROR
        assert timeouts.http2.closed["protocol-error"] == 1 and app.requests == []
        await still_served(port)


async def test_the_preface_cut_in_pieces_is_still_http2_and_other_bytes_are_http1() -> None:
    app = App()
    async with listening(app) as (port, _):
        client = await Client.open(port, preface=False)
        for piece in (http2.PREFACE[:3], http2.PREFACE[3:17], http2.PREFACE[17:]):
            await client.send(piece)
            await trio.sleep(0.05)  # each piece its own read
        await client.send(SettingsFrame(0).serialize())
        headers, _, _ = await client.get(b"/hello")
        assert headers[b":status"] == b"200"
        with socket.create_connection(("127.0.0.1", port)) as plain:
            plain.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")  # not the preface: HTTP/1.1 (llhttp's 400)
            assert (await trio.to_thread.run_sync(plain.recv, 100)).startswith(b"HTTP/1.1 400 ")


async def test_a_client_reset_cancels_the_handler() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        stream_id, data = client.headers(b"/hold")
        await client.send(data)
        await until(lambda: app.requests)
        await client.send(rst(stream_id))
        await until(lambda: app.cancelled and not timeouts.http2.streams)
        assert timeouts.http2.resets["client"] == 1
        await still_served(port)


async def test_request_body_flow_control_grants_only_what_the_upstream_took() -> None:
    """A handler that never reads: the client can send one stream window, no more."""
    app = App()
    async with listening(app) as (port, _):
        client = await Client.open(port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535})
        stream_id, data = client.headers(b"/hold", method=b"POST", end=False)
        await client.send(data)
        sent = 0
        frame = DataFrame(stream_id)
        frame.data = b"z" * 16384
        for _ in range(http2.STREAM_WINDOW // 16384):
            await client.send(frame.serialize())
            sent += 16384
        await until(lambda: app.requests)
        body = app.requests[0].body
        assert body is not None
        await until(lambda: sum(len(c) for c, _ in body.chunks) == sent)  # type: ignore[attr-defined]
        await client.send(frame.serialize())  # past the window: a flow-control error closes it
        frames = await client.until_closed()
        assert goaway_code(frames) == ErrorCodes.FLOW_CONTROL_ERROR
        app.release.set()


async def test_draining_sends_goaway_and_lets_the_open_stream_finish() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        stream_id, data = client.headers(b"/hold")
        await client.send(data)
        await until(lambda: app.requests)
        timeouts.drain()
        frame = await client.frame()
        while not isinstance(frame, GoAwayFrame):
            frame = await client.frame()
        assert frame.error_code == 0 and frame.last_stream_id == stream_id
        app.release.set()
        headers, _, _ = await client.response(stream_id)
        assert headers[b":status"] == b"200"
        with trio.fail_after(5):
            await client.until_closed()


# the attacks ---------------------------------------------------------------------------


async def test_streams_past_the_limit_are_refused() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        ids = []
        for _ in range(http2.MAX_CONCURRENT_STREAMS + 1):
            stream_id, data = client.headers(b"/hold")
            ids.append(stream_id)
            await client.send(data)
        frame = await client.frame()
        while not isinstance(frame, RstStreamFrame):
            frame = await client.frame()
        assert (frame.stream_id, frame.error_code) == (ids[-1], ErrorCodes.REFUSED_STREAM)
        assert timeouts.http2.resets["refused"] == 1
        await still_served(port)  # another connection has its own streams
        app.release.set()
        ended = set()
        while len(ended) < len(ids) - 1:
            frame = await client.frame()
            assert frame is not None
            if isinstance(frame, HeadersFrame):
                assert client.decoder.decode(frame.data, raw=True)[0] == (b":status", b"200")
            if "END_STREAM" in frame.flags:
                ended.add(frame.stream_id)
        assert ended == set(ids[:-1])


async def test_rapid_reset_closes_the_connection_with_enhance_your_calm() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        burst = b""
        for _ in range(http2.RESET_BUDGET + 50):
            stream_id, data = client.headers(b"/hold")
            burst += data + rst(stream_id)
        await client.send(burst)
        with trio.fail_after(10):
            frames = await client.until_closed()
        assert goaway_code(frames) == ErrorCodes.ENHANCE_YOUR_CALM
        assert timeouts.http2.closed["rapid-reset"] == 1
        await still_served(port)


@pytest.mark.parametrize(
    "flood",
    [
        PingFrame(0, opaque_data=b"12345678").serialize(),
        SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}).serialize(),
    ],
    ids=["ping", "settings"],
)
async def test_control_frame_floods_close_the_connection(flood: bytes) -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        await client.send(flood * (http2.CONTROL_BUDGET + 10))
        with trio.fail_after(10):
            frames = await client.until_closed()
        assert goaway_code(frames) == ErrorCodes.ENHANCE_YOUR_CALM
        assert timeouts.http2.closed["control-flood"] == 1
        await still_served(port)


async def test_a_continuation_flood_closes_the_connection() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        start = HeadersFrame(1)
        start.data = client.encoder.encode([(b":method", b"GET"), (b":path", b"/")])
        more = ContinuationFrame(1)
        more.data = b"\x00" * 16000
        await client.send(start.serialize())
        with trio.fail_after(10):
            try:
                for _ in range(100):  # 1.6 MB of a block that never ends
                    await client.send(more.serialize())
            except trio.BrokenResourceError:
                pass  # closed while we were still sending: what we want
            await client.until_closed()
        assert timeouts.http2.closed["header-too-large"] == 1
        await still_served(port)


async def test_a_header_list_past_64_kib_closes_the_connection() -> None:
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port)
        _, data = client.headers(b"/", extra=[(b"x-big", b"v" * 70_000)])
        frame, _ = Frame.parse_frame_header(memoryview(data[:9]))
        block = data[9:]
        pieces = [block[i : i + 16384] for i in range(0, len(block), 16384)]
        out = b""
        for i, piece in enumerate(pieces):
            part: Frame = HeadersFrame(1) if i == 0 else ContinuationFrame(1)
            part.data = piece  # type: ignore[attr-defined]
            if i == 0:
                part.flags.add("END_STREAM")
            if i == len(pieces) - 1:
                part.flags.add("END_HEADERS")
            out += part.serialize()
        await client.send(out)
        with trio.fail_after(10):
            frames = await client.until_closed()
        assert goaway_code(frames) in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.PROTOCOL_ERROR)
        assert timeouts.http2.closed["header-too-large"] == 1
        assert app.requests == []
        await still_served(port)


async def test_a_client_that_never_opens_its_window_is_timed_out() -> None:
    app = App()
    async with listening(app, idle=0.5) as (port, timeouts):
        client = await Client.open(port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
        stream_id, data = client.headers(b"/big/1000")
        await client.send(data)
        with trio.fail_after(10):
            frame = await client.frame()
            while not isinstance(frame, RstStreamFrame):
                assert not isinstance(frame, DataFrame) or not frame.data, "DATA past a zero window"
                frame = await client.frame()
        assert (frame.stream_id, frame.error_code) == (stream_id, ErrorCodes.CANCEL)
        assert timeouts.http2.resets["timeout"] == 1
        assert app.finished == [(False, 0)]
        with trio.fail_after(10):
            await client.until_closed()  # then no stream: the connection's idle timeout
        assert timeouts.expired["idle"] == 1


async def test_a_stream_that_never_ends_is_timed_out() -> None:
    app = App()
    async with listening(app, idle=0.5) as (port, timeouts):
        client = await Client.open(port)
        stream_id, data = client.headers(b"/echo", method=b"POST", end=False)
        await client.send(data)
        with trio.fail_after(10):
            frame = await client.frame()
            while not isinstance(frame, RstStreamFrame):
                frame = await client.frame()
        assert (frame.stream_id, frame.error_code) == (stream_id, ErrorCodes.CANCEL)
        assert timeouts.http2.resets["timeout"] == 1 and app.bodies == []
        await still_served(port)


async def test_a_client_that_does_not_read_its_answers_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client with a large window that reads nothing, then makes us answer PINGs: DATA stops
    at the output queue's low mark, the PING answers pile up past the bound: closed."""
    monkeypatch.setattr(net_http2, "MAX_OUTPUT", http2.OUTPUT_LOW + 64 * 1024)
    monkeypatch.setattr(http2, "CONTROL_BUDGET", 1_000_000)  # this is not the control-flood test
    app = App()
    async with listening(app) as (port, timeouts):
        client = await Client.open(port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1})
        client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await client.send(window_update(0, 2**31 - 1 - 65535))
        stream_id, data = client.headers(b"/big/100000000")
        await client.send(data)
        (conn,) = timeouts.http2.open
        await until(lambda: len(conn.outbox) >= http2.OUTPUT_LOW)  # the kernel's buffers are full
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        with trio.fail_after(10):
            try:
                while not timeouts.http2.closed["output-unread"]:
                    await client.send(ping * 100)
                    await trio.sleep(0.01)
            except trio.BrokenResourceError:
                pass  # closed (with a reset: our answers were left unread)
        assert timeouts.http2.closed["output-unread"] == 1
        assert timeouts.http2.closed["control-flood"] == 0
        await still_served(port)
