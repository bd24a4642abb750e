"""Upstream side over HTTP/2: one request as one stream on a pooled connection
(net/h2_pool.py), and the response body streaming from it. The Forwarder hands over the
requests that go upstream in HTTP/2 (sidecar/core/h2_upstream.py says which).

A stream the upstream refused (REFUSED_STREAM) or did not process (above a GOAWAY's last
stream id) goes once more, on another stream, with its body: the pieces taken are kept for
that up to ``RESEND_LIMIT``, as the HTTP/1.1 pool keeps them for a stale connection. Any
other reset, or a lost connection: 502 ``upstream-reset`` before the response head, a cut
body after it; frames h2 refuses: 502 ``upstream-protocol-error``. Past the request's
deadline the stream is reset with CANCEL: 504 ``timeout``, or a cut body.
"""

from __future__ import annotations

import trio

from meshlet.headers import ERROR_HEADER
from meshlet.io import Deadlines, TLSConnection

from ..core import errors
from ..core.errors import MeshError
from ..core.h2_upstream import H2ResponseHead, ResponseFieldsError, request_fields, trailer_fields
from ..core.headers import forward_request_headers, forward_response_headers
from ..layers.base import WOULD_BLOCK, BodyPiece, Request, Response
from .h2_pool import H2Stream, H2Upstream, StreamGone, pool_of
from .upstream import UpstreamBodyError, UpstreamPools, _origin_form, keep_for_resend, wait_for_piece


class _H2Exchange:
    """One request as one stream, and the response body as the downstream pulls it.
    Watched by :class:`Deadlines`: past its deadline the stream is reset (CANCEL) and the
    task waiting on it answers 504 (or cuts a response already under way)."""

    __slots__ = (
        "conn",
        "stream",
        "response",
        "deadline",
        "timed_out",
        "client_slow",
        "client_error",
        "complete",
        "request_sent",
        "abandoned",
        "waiting",
        "sent",
        "sent_bytes",
        "resend",
        "__weakref__",
    )

    def __init__(self, conn: H2Upstream, stream: H2Stream, deadline: float) -> None:
        self.conn = conn
        self.stream = stream
        self.response: Response | None = None
        self.deadline = deadline
        self.timed_out = False
        self.client_slow = False
        self.client_error: BaseException | None = None
        self.complete = False  # the response body was read to its end
        self.request_sent = False
        self.abandoned = False
        self.waiting: trio.CancelScope | None = None  # while the pump waits for the client's body
        self.sent: list[bytes] | None = []  # the body pieces taken, while they fit RESEND_LIMIT
        self.sent_bytes = 0
        self.resend: list[bytes] | tuple[()] = ()

    def expire(self) -> None:
        self.timed_out = True
        self.client_slow = self.waiting is not None and not self.abandoned
        self.conn.cancel(self.stream, "the request timed out")

    def abandon(self) -> None:
        self.abandoned = True
        if self.waiting is not None:
            self.waiting.cancel()

    # the response body (BodySource) ----------------------------------------------------
    def read_nowait(self) -> BodyPiece:
        stream = self.stream
        if stream.pieces:
            data, length = stream.pieces.popleft()
            self.conn.taken(stream, length)
            return data
        if stream.ended:
            self._end()
            return None
        return WOULD_BLOCK

    async def read(self) -> bytes | None:
        stream = self.stream
        while True:
            piece = self.read_nowait()
            if piece is not WOULD_BLOCK:
                return piece
            if stream.failure is not None:
                if self.timed_out:
                    raise UpstreamBodyError("request timeout while reading the response body")
                raise UpstreamBodyError(f"the upstream {stream.failure} mid-body")
            await stream.lot.park()

    def _end(self) -> None:
        if not self.complete:
            self.complete = True
            trailers = self.stream.trailers
            if trailers is not None and self.response is not None:
                try:
                    self.response.trailers = trailer_fields(trailers)
                except ResponseFieldsError as exc:
                    raise UpstreamBodyError(f"malformed trailers: {exc}") from None


class _Unprocessed(Exception):
    """The upstream did not process the stream: it may go again."""


class H2Forwarder:
    """The terminal handler for requests that go upstream in HTTP/2 (the Forwarder hands
    them over): one stream per request, the response body streaming from it."""

    def __init__(self, pools: UpstreamPools, deadlines: Deadlines) -> None:
        self.pools = pools
        self.deadlines = deadlines

    def _fields(self, request: Request) -> list[tuple[bytes, bytes]]:
        head = request.head
        forwarded = forward_request_headers(head.headers, request.peer_ip, connection=head.connection)
        authority = request.authority
        if authority is None:
            authority = request.service.encode() or request.endpoint.address.encode()  # type: ignore[union-attr]
        length = None if head.chunked else head.content_length
        return request_fields(head.method, authority.strip(), request.target, forwarded, head.headers, length)

    async def __call__(self, request: Request) -> Response:
        endpoint = request.endpoint
        assert endpoint is not None, "the balancer layer sets the endpoint"
        pool = pool_of(self.pools, endpoint, request.service)
        if request.target[:1] != b"/" and request.target != b"*":
            request.target = _origin_form(request)
        fields = self._fields(request)
        deadlines = self.deadlines
        deadline = deadlines.now + request.timeout
        resend: list[bytes] | tuple[()] = ()
        for attempt in (0, 1):
            conn = await pool.acquire(request.connect_timeout)
            stream = conn.open_stream(fields, end_stream=request.body is None)
            exchange = _H2Exchange(conn, stream, deadline)
            exchange.resend = resend
            deadlines.watch(exchange)
            try:
                return await self._exchange(request, exchange)
            except _Unprocessed:
                deadlines.forget(exchange)
                exchange.abandon()  # before the next try's pump reads the body
                conn.release(stream)
                if attempt == 0 and exchange.sent is not None:
                    pool.retries += 1
                    resend = exchange.sent
                    continue
                pool.errors += 1
                raise MeshError(errors.UPSTREAM_RESET, f"the upstream {stream.failure}") from None
            except BaseException:
                deadlines.forget(exchange)
                pool.errors += 1
                exchange.abandon()
                conn.release(stream)
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, request: Request, exchange: _H2Exchange) -> Response:
        stream = exchange.stream
        if request.body is not None:
            assert request.nursery is not None, "the downstream loop opens a nursery for bodies"
            request.nursery.start_soon(self._pump, request, exchange)
        else:
            exchange.request_sent = True
        while stream.head is None:
            if stream.failure is not None:
                raise self._failure(request, exchange)
            await stream.lot.park()
        try:
            head = H2ResponseHead(stream.head)
        except ResponseFieldsError as exc:
            exchange.conn.pool.note_failure(f"{exchange.conn.pool.endpoint.address} sent a malformed response: {exc}")
            raise MeshError(errors.UPSTREAM_PROTOCOL_ERROR, f"malformed response: {exc}") from None
        if request.deadline > exchange.deadline:
            exchange.deadline = request.deadline  # a per-try timeout ends at the head; the body has the rest
        return self._response(request, exchange, head)

    def _failure(self, request: Request, exchange: _H2Exchange) -> Exception:
        stream = exchange.stream
        if exchange.timed_out:
            if exchange.client_slow:
                return MeshError(errors.REQUEST_TIMEOUT, f"the request body did not arrive within {request.timeout:g}s")
            return MeshError(errors.TIMEOUT, f"no response from the upstream within {request.timeout:g}s")
        if exchange.client_error is not None:
            return MeshError(errors.BAD_REQUEST, str(exchange.client_error))
        if stream.unprocessed:
            return _Unprocessed()
        if stream.protocol_error:
            return MeshError(errors.UPSTREAM_PROTOCOL_ERROR, f"the upstream {stream.failure}")
        return MeshError(errors.UPSTREAM_RESET, f"the upstream {stream.failure} before the response")

    def _response(self, request: Request, exchange: _H2Exchange, head: H2ResponseHead) -> Response:
        stream, conn = exchange.stream, exchange.conn
        response = Response(head.status, head.reason, forward_response_headers(head.headers))
        exchange.response = response
        if head.status >= 400:
            for name, value in head.headers:  # an error made by the next sidecar keeps its reason
                if name == ERROR_HEADER:
                    response.mesh_error = value.decode("ascii", "replace")
        if request.head.method == b"HEAD" or head.status in (204, 304):
            response.framing = "none"
            if head.content_length is not None and head.status != 204:
                response.headers.append((b"content-length", b"%d" % head.content_length))
            exchange.complete = stream.ended
        elif stream.ended and not stream.pieces:  # the head ended the stream: no body
            response.framing = "length"
            response.content_length = 0
            exchange._end()
        elif head.content_length is not None:
            response.framing = "length"
            response.content_length = head.content_length
            response.body = exchange
        else:
            response.framing = "chunked"
            response.body = exchange
        deadlines = self.deadlines

        def finish(complete: bool) -> None:
            deadlines.forget(exchange)
            if complete and exchange.complete:
                if conn.new_session and conn.pool.tls is not None and isinstance(conn.io, TLSConnection):
                    conn.new_session = False  # its tickets came with the first response
                    endpoint = conn.pool.endpoint
                    conn.pool.tls.keep_session((endpoint.host, endpoint.port), conn.io)
            else:
                conn.pool.errors += 1
            exchange.abandon()
            conn.release(stream)

        response.on_finish = finish
        return response

    async def _pump(self, request: Request, exchange: _H2Exchange) -> None:
        """Streams the request body upstream as the windows allow, concurrently with the
        response; until the stream is done or the exchange abandoned."""
        if exchange.abandoned:
            return
        body = request.body
        assert body is not None
        stream, conn = exchange.stream, exchange.conn
        try:
            for taken in exchange.resend:  # what an unprocessed try took, first
                await conn.send_body(stream, taken)
            while True:
                try:
                    piece = body.read_nowait()
                    if piece is WOULD_BLOCK:
                        piece = await wait_for_piece(body, exchange)
                        if piece is WOULD_BLOCK:
                            return  # the try was given up
                except Exception as exc:  # the client sent a bad body or went away
                    exchange.client_error = exc
                    conn.cancel(stream, "the client's request body failed")
                    return
                if piece is None:
                    break
                if not piece:
                    continue
                keep_for_resend(exchange, piece)
                await conn.send_body(stream, piece)
            conn.end_stream(stream)
            exchange.request_sent = True
        except StreamGone:
            return
