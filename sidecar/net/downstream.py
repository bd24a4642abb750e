"""Downstream side: the HTTP/1.1 server loop of one client connection.

A connection whose first bytes are the HTTP/2 client preface (h2c with prior knowledge) is
handed to sidecar/net/http2.py instead: the preface is checked on the first read (and the
next, while it is cut short), never on a later request; HTTP/1.1 connections pay nothing
more. ``h2`` is imported with the first HTTP/2 connection.

One request at a time, in order (pipelined requests wait parsed in the reader's queue).
For each request the loop calls the handler, then writes the response it returns,
pulling the body piece by piece; a small response goes out in one ``send_all``.
The loop decides the framing towards the client, answers ``Expect: 100-continue``
itself when the body is first read, and closes the connection whenever the exchange
did not end cleanly (bad bytes, a body left unread, a response cut short).
"""

from __future__ import annotations

import logging

import trio

from meshlet.io import Closed, Connection, Deadlines

from ..core import errors
from ..core.errors import error_response
from ..core.http1 import (
    CHUNKED_END,
    Data,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    RequestReader,
    chunk,
    serialize_response_head,
)
from ..core.http2 import PREFACE, Http2Counters
from ..layers.base import WOULD_BLOCK, BodyPiece, Handler, Request, Response, Tunnel
from .upstream import UpstreamBodyError

log = logging.getLogger("meshlet.downstream")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Envoy's stream idle timeout (5 min); longer than the upstream pool's idle timeout.
# Also bounds a request or response that stops moving.
IDLE_TIMEOUT = 300.0
# Slowloris guard: a started request head must be complete within this (HAProxy's
# `timeout http-request` idea); the client gets 408. A new connection's first head must be
# complete within this of the accept: one that sends nothing is closed (no 408: nothing
# was asked), so idle connections cannot hold a listener's descriptors for minutes.
HEADER_TIMEOUT = 10.0
# Handle every Nth pipelined request after a checkpoint, so that one busy connection
# cannot keep the others from running (our sockets skip trio's per-call checkpoint).
FAIRNESS_EVERY = 16

REQUEST_TIMEOUT_RESPONSE = error_response(errors.REQUEST_TIMEOUT, "request head not complete in time", close=True)


class ClientGone(Exception):
    """The client closed or reset its connection."""


class _Connection:
    """A client connection: its socket, its parser, and its one deadline.

    The deadline (checked by :class:`Deadlines`) is: header timeout from the accept until
    the first request head is complete, idle timeout while waiting for a next request,
    header timeout once a head has started, idle timeout again while a request is handled
    (pushed forward whenever body bytes move). ``expire`` closes the socket, after a
    best-effort 408 when a head was cut short.
    """

    __slots__ = (
        "io",
        "reader",
        "peer_ip",
        "source",
        "deadline",
        "in_head",
        "idle",
        "fresh",
        "sniff",
        "timeouts",
        "__weakref__",
    )

    def __init__(self, io: Connection, timeouts: Timeouts, source: str = "unknown", sniff: bool = True) -> None:
        self.io = io
        self.reader = RequestReader()
        self.peer_ip = io.peer.encode()
        self.source = source  # the caller as its connection proved it (inbound), for every request on it
        self.timeouts = timeouts
        self.deadline = timeouts.deadlines.now + timeouts.header  # the first head's, from the accept
        self.in_head = False
        self.idle = False  # waiting for the next request, nothing of it read yet
        self.fresh = True  # its first request head is not complete yet
        self.sniff = sniff  # look for the HTTP/2 preface in the first bytes

    def expire(self) -> None:
        phase = "request-head" if self.in_head else "first-byte" if self.fresh else "idle"
        self.timeouts.expired[phase] += 1
        if self.in_head:
            self.timeouts.rejected["408"] += 1
            self.io.send_nowait(REQUEST_TIMEOUT_RESPONSE)
        self.io.close()

    def touch(self) -> None:
        timeouts = self.timeouts
        self.deadline = timeouts.deadlines.now + timeouts.idle

    async def receive(self, *, wait_first: bool = False) -> None:
        try:
            data = await self.io.recv(wait_first=wait_first)
        except Closed as exc:
            raise ClientGone(str(exc)) from None
        if not data:
            raise ClientGone("closed by the client")
        self.reader.feed(data)


class Http2Preface(Exception):
    """The connection's first bytes are the HTTP/2 client preface: ``args[0]``, all read so far."""


class Timeouts:
    """The connections' timeouts, and whether the listener is draining (shared by all of
    its connections: see :meth:`drain`); with what they counted, for /metrics."""

    __slots__ = ("idle", "header", "deadlines", "draining", "expired", "rejected", "http2")

    def __init__(self, deadlines: Deadlines, idle: float = IDLE_TIMEOUT, header: float = HEADER_TIMEOUT) -> None:
        self.deadlines = deadlines
        self.idle = idle
        self.header = header
        self.draining = False
        # Connections closed by a timeout, by what they were doing: first-byte (a new one
        # that sent nothing), request-head (408), idle (no next request, or a stalled exchange).
        self.expired = {"first-byte": 0, "request-head": 0, "idle": 0}
        # Requests answered here, before the request path (which counts every other one),
        # by the status sent: one per answer the loop can make (errors.REJECTIONS).
        self.rejected = {str(status): 0 for status in sorted(errors.REJECTIONS)}
        self.http2 = Http2Counters()  # its HTTP/2 connections (sidecar/net/http2.py)

    def drain(self) -> int:
        """Shutting down: every response from now on closes its connection, and connections
        waiting idle for a next request are closed now; how many were closed. HTTP/2
        connections get GOAWAY and close when their open streams are done."""
        self.draining = True
        idle = [c for c in self.deadlines.watched if type(c) is _Connection and c.idle]
        for conn in idle:
            conn.io.close()
        for http2 in list(self.http2.open):
            http2.drain()  # GOAWAY; each closes when its streams are done
        return len(idle)


class _RequestBody:
    """The request body as the upstream pump pulls it."""

    __slots__ = ("conn", "expect_continue", "done", "received")

    def __init__(self, conn: _Connection, expect_continue: bool) -> None:
        self.conn = conn
        self.expect_continue = expect_continue
        self.done = False
        self.received = 0  # body bytes read so far (meshlet_request_bytes)

    def read_nowait(self) -> BodyPiece:
        if self.done:
            return None
        events = self.conn.reader.events
        if self.expect_continue or not events or type(events[0]) not in (Data, EndOfMessage):
            return WOULD_BLOCK  # read() sends the 100, waits, or raises the error
        event = events.popleft()
        if type(event) is Data:
            data = event.data
            self.received += len(data)
            return data
        self.done = True
        return None

    async def read(self) -> bytes | None:
        if self.done:
            return None
        conn = self.conn
        if self.expect_continue:
            self.expect_continue = False
            await conn.io.send_all(CONTINUE)
        events = conn.reader.events
        while not events:
            await conn.receive()
        conn.touch()
        event = events.popleft()
        if type(event) is Data:
            data = event.data
            self.received += len(data)
            return data
        if type(event) is EndOfMessage:
            self.done = True
            return None
        if isinstance(event, ProtocolError):
            raise event  # the pump records it; the exchange answers 400 and closes
        raise ProtocolError(400, f"unexpected {type(event).__name__} in a request body")


async def serve_connection(
    io: Connection, handler: Handler, timeouts: Timeouts, source: str = "unknown", *, detect: bool = True
) -> None:
    """Serve one client connection until it closes; never raises for client faults.
    ``source``: the calling service its certificate proved, or ``unauthenticated``
    (sidecar/net/inbound.py); each request's ``source``, whatever its headers claim.
    ``detect``: serve it as HTTP/2 if it starts with the client preface (h2c)."""
    conn = _Connection(io, timeouts, source, detect)
    deadlines = timeouts.deadlines
    deadlines.watch(conn)
    try:
        await _serve(conn, handler)
    except Http2Preface as preface:
        deadlines.forget(conn)
        from .http2 import serve_http2  # here: a sidecar that never sees HTTP/2 never loads h2

        await serve_http2(io, handler, timeouts, source, preface.args[0])
    except Exception as exc:  # noqa: BLE001 - one connection's failure must never stop the listener
        if not client_fault(exc):
            log.exception("connection from %s failed", io.peer)
    finally:
        deadlines.forget(conn)
        io.close()


_CLIENT_FAULTS = (ClientGone, Closed, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


def client_fault(exc: BaseException) -> bool:
    """The client went away or stalled (possibly inside a nursery's exception group)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(client_fault(inner) for inner in exc.exceptions)
    return isinstance(exc, _CLIENT_FAULTS)


async def _next_head(conn: _Connection) -> object:
    """The next request head (or a ProtocolError); ClientGone when the client left or
    went quiet past its deadline."""
    events = conn.reader.events
    if not events:
        if conn.timeouts.draining:
            raise ClientGone("draining")  # no next request on this connection
        conn.idle = True
        try:
            if not conn.fresh:  # a new connection keeps the header deadline set at the accept
                conn.touch()
                # A keep-alive client sends its next request after it has read our answer:
                # it is not here yet (a try would be a wasted recv).
                await conn.receive(wait_first=True)
            elif conn.sniff:
                await _first_receive(conn)
            else:
                await conn.receive()
        finally:
            conn.idle = False
        if not events:  # a head has started but is not complete: the slowloris clock runs
            conn.in_head = True
            conn.deadline = min(conn.deadline, trio.current_time() + conn.timeouts.header)  # rare: exact
            while not events:
                await conn.receive()
            conn.in_head = False
            conn.touch()
        if conn.fresh:  # the first head is complete: the idle timeout from now on
            conn.fresh = False
            conn.touch()
    return events.popleft()


async def _first_receive(conn: _Connection) -> None:
    """A new connection's first bytes: Http2Preface if they are the HTTP/2 client preface
    (read on while they are a piece of it), else fed to the HTTP/1.1 reader."""
    conn.sniff = False
    io = conn.io
    try:
        data = await io.recv()
        while data and len(data) < len(PREFACE) and PREFACE.startswith(data):
            more = await io.recv()
            if not more:
                break
            data += more
    except Closed as exc:
        raise ClientGone(str(exc)) from None
    if not data:
        raise ClientGone("closed by the client")
    if data.startswith(PREFACE):
        raise Http2Preface(data)
    conn.reader.feed(data)


async def _serve(conn: _Connection, handler: Handler) -> None:
    served = 0
    while True:
        event = await _next_head(conn)
        served += 1
        if served % FAIRNESS_EVERY == 0:
            await trio.lowlevel.checkpoint()
        if isinstance(event, ProtocolError):
            await _reject(conn, event)
            return
        if type(event) is not RequestHead:
            return  # pragma: no cover - the reader only starts messages with a head
        head: RequestHead = event
        events = conn.reader.events
        if events and isinstance(events[-1], ProtocolError) and EndOfMessage not in map(type, events):
            # The body already read is bad (e.g. an invalid chunk size): answer now,
            # before anything reaches the upstream. (After this request's end, the error
            # is the next one's: this one is answered first, as pipelining asks.)
            await _reject(conn, events[-1])
            return
        body = None
        if head.has_body:
            body = _RequestBody(conn, head.expect_continue)
        else:
            if events and type(events[0]) is EndOfMessage:
                events.popleft()
        request = Request(head, body, conn.peer_ip)
        request.source = conn.source
        if body is None:
            keep_alive = await _exchange(conn, handler, request)
        else:
            async with trio.open_nursery() as nursery:
                request.nursery = nursery
                keep_alive = await _exchange(conn, handler, request)
                nursery.cancel_scope.cancel()  # a pump still waiting on an unread body
            if not body.done and not _rest_arrived(body):
                keep_alive = False  # the rest of the body is still on its way: never a next request
        if not keep_alive:
            return
        if head.upgrade is not None:
            # llhttp stops at an upgrade request; what followed it is plain HTTP again
            # when the upstream did not switch protocols.
            rest = conn.reader.take_upgrade_rest()
            conn.reader = RequestReader()
            if rest:
                conn.reader.feed(rest)


def _rest_arrived(body: _RequestBody) -> bool:
    """The response ended before the request body was all taken (an app that answers
    early, its pump stopped): if the rest has already arrived, parsed, it is dropped and
    the connection can carry the next request; else it must close."""
    while True:
        piece = body.read_nowait()
        if piece is None:
            return True
        if piece is WOULD_BLOCK:
            return False


async def _reject(conn: _Connection, error: ProtocolError) -> None:
    reason = errors.REJECTIONS.get(error.status, errors.BAD_REQUEST)
    conn.timeouts.rejected[str(reason.status)] += 1
    await conn.io.send_all(error_response(reason, error.detail, close=True))


async def _exchange(conn: _Connection, handler: Handler, request: Request) -> bool:
    """Handle one request and write its response; True if the connection may go on."""
    head = request.head
    response = await handler(request)  # never raises for request faults: the errors layer answers them
    stream = conn.io
    if response.raw is not None:
        raw = response.raw
        try:
            await stream.send_all(raw)
        finally:
            response.body_bytes = len(raw) - raw.find(b"\r\n\r\n") - 4
            response.finish(True)
        return response.keep_alive and head.keep_alive
    keep_alive = response.keep_alive and head.keep_alive and not conn.timeouts.draining
    headers = response.headers
    framing = response.framing
    if response.upgrade is not None:
        await _tunnel(conn, response, response.upgrade)
        return False
    if framing == "length":
        assert response.content_length is not None  # "length" framing: the length is known
        headers.append((b"content-length", b"%d" % response.content_length))
    elif framing == "chunked":
        if head.http_version == "1.1":
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            framing = "close"  # an HTTP/1.0 client reads until we close
            keep_alive = False
    if not keep_alive:
        headers.append((b"connection", b"close"))
    elif head.http_version == "1.0":
        headers.append((b"connection", b"keep-alive"))
    pieces = [serialize_response_head(response.status, response.reason, headers)]
    body = response.body
    complete = False
    sent = 0
    try:
        if body is None or head.method == b"HEAD":
            await stream.send_all(pieces[0])
            complete = True
            return keep_alive
        chunked = framing == "chunked"
        read_nowait = body.read_nowait
        while True:
            piece = read_nowait()
            if piece is WOULD_BLOCK:
                if pieces:
                    await stream.send_all(b"".join(pieces) if len(pieces) > 1 else pieces[0])
                    pieces = []
                piece = await body.read()
                conn.touch()
            if piece is None:
                break
            if piece:
                sent += len(piece)
                pieces.append(chunk(piece) if chunked else piece)
        if chunked:
            pieces.append(CHUNKED_END)
        if pieces:
            await stream.send_all(b"".join(pieces))
        complete = True
        return keep_alive
    except UpstreamBodyError:
        # Headers are out: the only honest signal left is to cut the connection,
        # so the client sees a short body instead of a complete-looking one.
        return False
    finally:
        response.body_bytes = sent
        response.finish(complete)


async def _tunnel(conn: _Connection, response: Response, tunnel: Tunnel) -> None:
    """After a 101: write the head, then copy bytes both ways until either side ends."""
    rest = conn.reader.take_upgrade_rest()
    head = serialize_response_head(101, response.reason, response.headers)
    stream = conn.io
    conn.timeouts.deadlines.forget(conn)  # a tunnel may be quiet for long: no idle timeout
    try:
        await stream.send_all(head + tunnel.first_bytes if tunnel.first_bytes else head)
        if rest:
            await tunnel.send_all(rest)

        async def down_to_up() -> None:
            while data := await stream.recv():
                await tunnel.send_all(data)

        async def up_to_down() -> None:
            while data := await tunnel.receive_some():
                await stream.send_all(data)

        async with trio.open_nursery() as nursery:

            async def run(copy: object) -> None:
                try:
                    await copy()  # type: ignore[operator]
                except (Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(run, down_to_up)
            nursery.start_soon(run, up_to_down)
    finally:
        tunnel.close()
        response.finish(True)
