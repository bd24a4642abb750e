"""Downstream side, HTTP/2: one client connection's streams, each a request on the path.

A connection runs a reader (this task: bytes in, events out of sidecar/core/http2_server.py),
a writer (the one task that writes to the socket: what ``h2`` queued, in order) and a task
per stream calling the Handler and writing its response. Nothing waits on the socket but
those two: a stream that must wait waits for the peer's window (WINDOW_UPDATE), for the
output queue to drain, or for its request body.

Flow control both ways, so nothing buffers without bound:

* request body: a stream's DATA waits in its body source until the upstream pump reads it;
  only then is the window reopened (``acknowledge``), so a slow upstream slows the client;
* response body: DATA is sent as the peer's window allows, in frames of DATA_FRAME bytes at
  most (what the upstream body already holds is joined up to that), and only while the
  output queue holds less than OUTPUT_LOW.

Timeouts: the connection's first stream must open within the header timeout of the
accept, and a connection with no stream is closed after the idle timeout; a stream whose
body (either way) does not move for the idle timeout is reset (CANCEL), which bounds a
request that never ends and a client that never opens its window.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError as H2ProtocolError

from meshlet.io import Closed, Connection

from ..core import errors
from ..core.errors import error_response
from ..core.http1 import ProtocolError
from ..core.http2 import DATA_FRAME, MAX_OUTPUT, OUTPUT_LOW, raw_parts, response_fields, trailer_fields
from ..core.http2_server import (
    BodyEnded,
    BodyReceived,
    ConnectionFault,
    ServerConnection,
    StreamCancelled,
    StreamOpened,
    WindowOpened,
)
from ..layers.base import WOULD_BLOCK, BodyPiece, Handler, Request, Response
from .downstream import Timeouts, client_fault
from .upstream import UpstreamBodyError

log = logging.getLogger("meshlet.http2")

FAULT_LOG_INTERVAL = 60.0  # a connection fault of a kind already logged within this is counted only


class _StreamGone(Exception):
    """The client reset the stream (or the connection went) while we were sending on it."""


class _Stream:
    """A stream being handled; its deadline is the idle timeout from its body's last move."""

    __slots__ = ("conn", "stream_id", "body", "scope", "deadline", "window", "ended", "__weakref__")

    def __init__(self, conn: _Http2Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.body: _StreamBody | None = None
        self.scope = trio.CancelScope()
        self.deadline = conn.timeouts.deadlines.now + conn.timeouts.idle
        self.window: trio.Event | None = None  # set when the peer opens its window
        self.ended = False  # the client's END_STREAM came

    def touch(self) -> None:
        timeouts = self.conn.timeouts
        self.deadline = timeouts.deadlines.now + timeouts.idle

    def expire(self) -> None:
        conn = self.conn
        conn.counters.resets["timeout"] += 1
        conn.protocol.reset(self.stream_id, ErrorCodes.CANCEL)
        conn.flush()
        self.scope.cancel()

    def window_opened(self) -> None:
        if self.window is not None:
            self.window.set()
            self.window = None


class _StreamBody:
    """A stream's request body as the upstream pump pulls it; the client's window for it is
    reopened by what is taken."""

    __slots__ = ("stream", "chunks", "ended", "done", "received", "wake")

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.done = False
        self.received = 0  # body bytes read so far (meshlet_request_bytes)
        self.wake: trio.Event | None = None

    def feed(self, data: bytes, flow_length: int) -> None:
        self.chunks.append((data, flow_length))
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake.set()
            self.wake = None

    def read_nowait(self) -> BodyPiece:
        if self.done:
            return None
        if self.chunks:
            data, flow_length = self.chunks.popleft()
            self.received += len(data)
            stream = self.stream
            stream.touch()
            conn = stream.conn
            conn.protocol.acknowledge(stream.stream_id, flow_length)
            conn.flush()
            return data
        if self.ended:
            self.done = True
            return None
        return WOULD_BLOCK

    async def read(self) -> bytes | None:
        while True:
            piece = self.read_nowait()
            if piece is not WOULD_BLOCK:
                return piece
            self.wake = wake = trio.Event()
            await wake.wait()


class _Http2Connection:
    __slots__ = (
        "io",
        "handler",
        "timeouts",
        "source",
        "peer_ip",
        "counters",
        "protocol",
        "streams",
        "outbox",
        "writer_wake",
        "drained",
        "writing",
        "closing",
        "deadline",
        "opened",
        "nursery",
        "__weakref__",
    )

    def __init__(self, io: Connection, handler: Handler, timeouts: Timeouts, source: str) -> None:
        self.io = io
        self.handler = handler
        self.timeouts = timeouts
        self.source = source
        self.peer_ip = io.peer.encode()
        self.counters = timeouts.http2
        self.protocol = ServerConnection(self.counters)
        self.streams: dict[int, _Stream] = {}
        self.outbox = bytearray()  # for the writer, in order
        self.writer_wake = trio.Event()
        self.drained: trio.Event | None = None  # set when the outbox went below OUTPUT_LOW
        self.writing = False
        self.closing = False  # close once the outbox is written (after a GOAWAY)
        self.deadline = timeouts.deadlines.now + timeouts.header  # the first stream's, from the accept
        self.opened = False  # a stream was opened
        self.nursery: trio.Nursery | None = None

    # the connection ------------------------------------------------------------------
    async def serve(self, received: bytes) -> None:
        timeouts, counters = self.timeouts, self.counters
        deadlines = timeouts.deadlines
        deadlines.watch(self)
        counters.connections += 1
        counters.open.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._write)
                self.flush()  # our SETTINGS
                try:
                    if received:
                        self._receive(received)
                    io = self.io
                    while data := await io.recv():
                        self._receive(data)
                except ConnectionFault as fault:
                    self._fault(fault)
                except Closed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            counters.connections -= 1
            counters.open.discard(self)
            deadlines.forget(self)
            self.io.close()

    def expire(self) -> None:
        """No stream for the idle timeout (none within the header timeout of the accept):
        GOAWAY and close. Streams open: each has its own deadline; look again later."""
        timeouts = self.timeouts
        if self.streams:
            self.deadline = timeouts.deadlines.now + timeouts.idle
            timeouts.deadlines.watch(self)
            return
        timeouts.expired["idle" if self.opened else "first-byte"] += 1
        if not self.writing:
            self.io.send_nowait(bytes(self.outbox) + self.protocol.goaway())
        self.io.close()

    def drain(self) -> None:
        """The listener drains: GOAWAY now; close when the open streams are done."""
        if not self.protocol.going_away:
            self.outbox += self.protocol.goaway()
            self.writer_wake.set()
        if not self.streams:
            self.closing = True
            self.writer_wake.set()

    def _fault(self, fault: ConnectionFault) -> None:
        """Close for what the client did (h2's or our GOAWAY is in the output)."""
        self.counters.closed[fault.reason] += 1
        _log_fault(fault.reason, self.io.peer, str(fault))
        if not self.writing:
            self.io.send_nowait(bytes(self.outbox) + self.protocol.output())
        self.io.close()

    def flush(self) -> None:
        """Hand what h2 queued to the writer. A client that makes us answer (PING, SETTINGS)
        without reading is closed once MAX_OUTPUT waits."""
        data = self.protocol.output()
        if data:
            outbox = self.outbox
            outbox += data
            if len(outbox) > MAX_OUTPUT and not self.io.closed:
                self.counters.closed["output-unread"] += 1
                _log_fault("output-unread", self.io.peer, f"{len(outbox)} bytes of output not read")
                self.io.close()
                return
            self.writer_wake.set()

    async def _write(self) -> None:
        io, outbox = self.io, self.outbox
        try:
            while True:
                if not outbox:
                    if self.closing:
                        io.close()
                        return
                    self.writer_wake = wake = trio.Event()
                    await wake.wait()
                    continue
                data = bytes(outbox)
                outbox.clear()
                self.writing = True
                await io.send_all(data)
                self.writing = False
                if self.drained is not None and len(outbox) < OUTPUT_LOW:
                    self.drained.set()
                    self.drained = None
        except Closed:
            io.close()  # the reader wakes and ends the connection

    def _receive(self, data: bytes) -> None:
        streams = self.streams
        for event in self.protocol.receive(data, self.timeouts.deadlines.now):
            kind = type(event)
            if kind is BodyReceived:
                assert isinstance(event, BodyReceived)
                stream = streams.get(event.stream_id)
                if stream is not None and stream.body is not None and event.data:
                    stream.touch()
                    stream.body.feed(event.data, event.flow_length)
                else:
                    self.protocol.acknowledge(event.stream_id, event.flow_length)  # nobody reads it
            elif kind is StreamOpened:
                assert isinstance(event, StreamOpened)
                self._open(event)
            elif kind is BodyEnded:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream.ended = True
                    if stream.body is not None:
                        stream.body.end()
            elif kind is WindowOpened:
                stream_id = event.stream_id  # type: ignore[attr-defined]
                if stream_id == 0:
                    for stream in streams.values():
                        stream.window_opened()
                elif (stream := streams.get(stream_id)) is not None:
                    stream.window_opened()
            elif kind is StreamCancelled:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream.scope.cancel()
        self.flush()

    # streams -------------------------------------------------------------------------
    def _open(self, event: StreamOpened) -> None:
        stream = _Stream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        self.opened = True
        counters = self.counters
        counters.streams += 1
        counters.served += 1
        self.timeouts.deadlines.watch(stream)
        assert self.nursery is not None
        head = event.head
        if isinstance(head, ProtocolError):
            stream.ended = event.end_stream
            self.nursery.start_soon(self._run, stream, None, head)
            return
        if not event.end_stream:
            stream.body = _StreamBody(stream)
        request = Request(head, stream.body, self.peer_ip)
        request.source = self.source
        self.nursery.start_soon(self._run, stream, request, None)

    async def _run(self, stream: _Stream, request: Request | None, error: ProtocolError | None) -> None:
        try:
            with stream.scope:
                if request is None:
                    assert error is not None
                    await self._reject(stream, error)
                    if not stream.ended:  # its body is not wanted
                        self.protocol.reset(stream.stream_id, ErrorCodes.NO_ERROR)
                elif request.body is None:
                    await self._respond(stream, request, await self.handler(request))
                else:
                    async with trio.open_nursery() as nursery:
                        request.nursery = nursery
                        await self._respond(stream, request, await self.handler(request))
                        nursery.cancel_scope.cancel()  # a pump still waiting on an unread body
                    if stream.body is not None and not stream.body.done:
                        # Answered before the request ended: the rest is not wanted (RFC 9113 §8.1).
                        self.protocol.reset(stream.stream_id, ErrorCodes.NO_ERROR)
        except _StreamGone:
            pass
        except Exception as exc:  # noqa: BLE001 - one stream's failure must never stop the others
            if not client_fault(exc):
                log.exception("stream %d from %s failed", stream.stream_id, self.io.peer)
            self.protocol.reset(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
        finally:
            self._finished(stream)

    def _finished(self, stream: _Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.protocol.finished(stream.stream_id)
        self.counters.streams -= 1
        timeouts = self.timeouts
        timeouts.deadlines.forget(stream)
        if not self.streams:
            self.deadline = timeouts.deadlines.now + timeouts.idle
            if self.protocol.going_away:
                self.closing = True
                self.writer_wake.set()
        self.flush()

    async def _reject(self, stream: _Stream, error: ProtocolError) -> None:
        """A request the path cannot take: answered as HTTP/1.1's are (400, 431)."""
        reason = errors.REJECTIONS.get(error.status, errors.BAD_REQUEST)
        self.timeouts.rejected[str(reason.status)] += 1
        status, headers, body = raw_parts(error_response(reason, error.detail))
        await self._send_whole(stream, status, headers, body, b"GET")

    async def _respond(self, stream: _Stream, request: Request, response: Response) -> None:
        method = request.head.method
        if response.raw is not None:  # a mesh error, a policy's answer: our own HTTP/1.1 bytes
            status, headers, raw_body = raw_parts(response.raw)
            try:
                await self._send_whole(stream, status, headers, raw_body, method)
            finally:
                response.body_bytes = len(raw_body)
                response.finish(True)
            return
        h2conn = self.protocol.h2
        stream_id = stream.stream_id
        sent = 0
        complete = False
        try:
            if response.upgrade is not None:  # pragma: no cover - an HTTP/2 request never asks for one
                response.upgrade.close()
                raise _StreamGone("no upgrade over HTTP/2")
            fields = response_fields(response.status, response.headers)
            if response.framing == "length" and response.content_length is not None:
                fields.append((b"content-length", b"%d" % response.content_length))
            body = response.body
            if body is None or method == b"HEAD":
                trailers = response.trailers
                self._send_headers(stream_id, fields, end=not trailers)
                if trailers:
                    self._send_headers(stream_id, trailer_fields(trailers), end=True)
                complete = True
                return
            self._send_headers(stream_id, fields, end=False)
            read_nowait = body.read_nowait
            while True:
                piece = read_nowait()
                if piece is WOULD_BLOCK:
                    self.flush()
                    piece = await body.read()
                if piece is None:
                    break
                ended = False
                if 0 < len(piece) < DATA_FRAME:
                    piece, ended = _gather(piece, read_nowait)
                if piece:
                    await self._send_data(stream, piece)
                    sent += len(piece)
                if ended:
                    break
            trailers = response.trailers  # set by the upstream side once its body ended
            if trailers:
                self._send_headers(stream_id, trailer_fields(trailers), end=True)
            else:
                h2conn.end_stream(stream_id)
            self.flush()
            complete = True
        except UpstreamBodyError:
            # The headers are out: a reset is the honest end, not a complete-looking stream.
            self.counters.resets["response-cut"] += 1
            self.protocol.reset(stream_id, ErrorCodes.INTERNAL_ERROR)
        except H2ProtocolError as exc:  # the stream was reset or closed under us
            raise _StreamGone(str(exc)) from None
        finally:
            response.body_bytes = sent
            response.finish(complete)

    async def _send_whole(
        self, stream: _Stream, status: int, headers: list[tuple[bytes, bytes]], body: bytes, method: bytes
    ) -> None:
        try:
            fields = response_fields(status, headers)
            if not body or method == b"HEAD":
                self._send_headers(stream.stream_id, fields, end=True)
                return
            self._send_headers(stream.stream_id, fields, end=False)
            await self._send_data(stream, body, end=True)
        except H2ProtocolError as exc:
            raise _StreamGone(str(exc)) from None

    def _send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], *, end: bool) -> None:
        self.protocol.h2.send_headers(stream_id, fields, end_stream=end)
        self.flush()

    async def _send_data(self, stream: _Stream, data: bytes, *, end: bool = False) -> None:
        """``data`` on the stream as the peer's windows allow, while the output queue is short."""
        protocol, stream_id = self.protocol, stream.stream_id
        view = memoryview(data)
        while True:
            while len(self.outbox) >= OUTPUT_LOW:
                self.drained = drained = self.drained or trio.Event()
                await drained.wait()
            size = protocol.window(stream_id)
            if size <= 0:
                stream.window = window = trio.Event()
                await window.wait()
                continue
            last = len(view) <= size
            protocol.h2.send_data(stream_id, bytes(view[:size]), end_stream=end and last)
            stream.touch()
            self.flush()
            if last:
                return
            view = view[size:]


def _gather(piece: bytes, read_nowait: Callable[[], BodyPiece]) -> tuple[bytes, bool]:
    """``piece`` and what the upstream body already holds after it, joined up to a full
    DATA frame (at most DATA_FRAME plus one piece): each frame costs h2 work and, over
    TLS, a record, and an origin's frames may be smaller than ours (nginx: 8 KB). Also
    whether the body's end was read."""
    pieces, size = [piece], len(piece)
    while size < DATA_FRAME:
        more = read_nowait()
        if more is WOULD_BLOCK:
            break
        if more is None:
            return b"".join(pieces), True
        pieces.append(more)
        size += len(more)
    return b"".join(pieces), False


async def serve_http2(io: Connection, handler: Handler, timeouts: Timeouts, source: str, received: bytes) -> None:
    """Serve one client connection as HTTP/2 until it closes; ``received``: what was read
    of it already (the client preface, and maybe more). Never raises for client faults."""
    conn = _Http2Connection(io, handler, timeouts, source)
    try:
        await conn.serve(received)
    except Exception as exc:  # noqa: BLE001 - one connection's failure must never stop the listener
        if not client_fault(exc):
            log.exception("HTTP/2 connection from %s failed", io.peer)


_logged: dict[str, float] = {}  # fault reason → when last logged
_unlogged: dict[str, int] = {}  # fault reason → faults since


def _log_fault(reason: str, peer: str, detail: str) -> None:
    """Log the first fault of a kind, then count them until FAULT_LOG_INTERVAL passed."""
    now = trio.current_time()
    if now - _logged.get(reason, -FAULT_LOG_INTERVAL) < FAULT_LOG_INTERVAL:
        _unlogged[reason] = _unlogged.get(reason, 0) + 1
        return
    _logged[reason] = now
    more = _unlogged.pop(reason, 0)
    since = f" ({more} more since the last report)" if more else ""
    log.warning("HTTP/2 connection from %s closed (%s): %s%s", peer, reason, detail, since)
