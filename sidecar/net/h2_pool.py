"""HTTP/2 connections to upstreams: a pool per endpoint, each connection's reader and
writer tasks, and its streams as the exchanges (net/h2_upstream.py) use them. Imported on
the first request that goes upstream in HTTP/2 (sidecar/core/h2_upstream.py says which
do), so h2 costs nothing to a sidecar that never needs it.

Pool rules: per endpoint, streams go on the oldest connection with room (up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS, at most ``MAX_STREAMS``); when every one is full another is
dialled, at most ``max_connections`` (as the HTTP/1.1 pool's, counted apart). One dial at a
time: requests that arrive meanwhile wait for it, and share its failure. A new connection
is used once the peer's first SETTINGS arrived (within the connect timeout): before them we
would guess its stream limit, and an HTTP/1.1 server answers our preface with an error
instead. A connection with no stream for ``idle_timeout`` is closed (GOAWAY, then FIN). A
GOAWAY from the peer takes the connection out of use: the streams above its last stream id
fail as not processed (the exchange sends them again), the others finish.

Each connection has a reader task and a writer task (in the nursery the sidecar gives the
pools): the reader only reads and feeds h2, so a slow socket never stops it from taking
WINDOW_UPDATEs and the peer's SETTINGS; every frame h2 makes is queued for the writer,
which sends what is queued in one ``send_all``. A request body waits for the stream's and
the connection's windows, and for the queue to drain below ``HIGH_WATER``: no more than a
window is ever buffered. A response body is acknowledged to the peer (WINDOW_UPDATE) only
when the downstream takes the piece: a slow client slows the upstream, and at most
``STREAM_WINDOW`` of one stream and ``CONNECTION_WINDOW`` of one connection wait here.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import trio
from h2.errors import ErrorCodes

from meshlet.io import Closed, Connection, TLSConnection, TLSError, connect

from ..core import errors
from ..core.errors import MeshError
from ..core.services import Endpoint
from .tls import MeshTLS, PeerIdentityError, check_peer_is
from .upstream import IDLE_TIMEOUT, LOOP_HINT, MAX_CONNECTIONS, OwnConnections, UpstreamPools

log = logging.getLogger("meshlet.upstream")

MAX_STREAMS = 256  # per connection, whatever the peer allows
STREAM_WINDOW = 1024 * 1024  # our receive window per stream
CONNECTION_WINDOW = 8 * 1024 * 1024  # and per connection
HIGH_WATER = 256 * 1024  # queued for the socket: a request body waits below this
MAX_FRAME_SIZE = 64 * 1024  # the largest frame the peer may send us (fewer, larger DATA frames)
READS_PER_CHECKPOINT = 16  # a busy connection's reader lets the others run this often
# Queued for a peer that does not read them (PING and SETTINGS ACKs, WINDOW_UPDATEs...):
# past this the reader stops reading it too, until the queue drains below HIGH_WATER.
OUTGOING_LIMIT = 4 * 1024 * 1024
CLOSE_GRACE = 5.0  # a closing connection's last frames (its GOAWAY) get this long to leave

# What we send is ours: request_fields puts the pseudo-fields first, lower-cases the names and
# drops the connection-specific ones (te but ``te: trailers``); h2's checks of it cost ~2 % of
# a sidecar's CPU per HTTP/2 request (measured side by side). Its normalising stays (it marks
# authorization and short cookies never-indexed in HPACK); what the upstream sends is still checked.
_CONFIG = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
_SETTINGS = {
    h2.settings.SettingCodes.ENABLE_PUSH: 0,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
}
_NETWORK_ERRORS = (Closed, OSError)


def _data_frame_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"{len(frame.data)} bytes"


# h2 builds the repr of every frame it receives, for a trace log (``logger.trace("Received
# frame: %s", repr(frame))``) that is off; hyperframe's repr of a DATA frame serializes its
# body again and hex-encodes all of it, to show 20 characters: 13 µs a 16 KiB frame, a
# sixth of a core at 200 MB/s. This one does not read the payload.
hyperframe.frame.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign,assignment]


def _code_name(code: int) -> str:
    """An error code as a metric label: its RFC 9113 name, lower-case, or ``other``."""
    try:
        return ErrorCodes(code).name.lower().replace("_", "-")
    except ValueError:
        return "other"


class H2Stream:
    """One request's stream, as the reader task fills it and the exchange drains it."""

    __slots__ = (
        "id",
        "conn",
        "lot",
        "head",
        "pieces",
        "trailers",
        "ended",
        "failure",
        "protocol_error",
        "unprocessed",
        "released",
    )

    def __init__(self, conn: H2Upstream, stream_id: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.lot = trio.lowlevel.ParkingLot()  # the exchange's tasks wait here for any change
        self.head: list[tuple[bytes, bytes]] | None = None
        self.pieces: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length), not taken yet
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.ended = False  # END_STREAM from the upstream
        self.failure: str | None = None  # why it cannot go on (reset, connection lost, timeout)
        self.protocol_error = False  # the failure is the peer's protocol error
        self.unprocessed = False  # refused, or above a GOAWAY's last stream id: may go again
        self.released = False

    def fail(self, why: str, *, unprocessed: bool = False) -> None:
        if self.failure is None:
            self.failure = why
            self.unprocessed = unprocessed and self.head is None
        self.lot.unpark_all()


class StreamGone(Exception):
    """The stream can take no more of the request body (reset, lost, released)."""


class H2Upstream:
    """One HTTP/2 connection to an endpoint and its streams."""

    def __init__(self, io: Connection, pool: H2EndpointPool, epoch: int, source_port: int = 0) -> None:
        self.io = io
        self.pool = pool
        self.epoch = epoch
        self.source_port = source_port  # in OwnConnections.open while it lives (transparent mode)
        self.new_session = io.tls  # its TLS session is kept once a stream completed
        conn = self.h2 = h2.connection.H2Connection(config=_CONFIG)
        # Our settings from the start (h2 would apply a later SETTINGS only once the peer
        # acknowledged it): what h2 read from its defaults when it was made, set again.
        conn.local_settings = h2.settings.Settings(client=True, initial_values=_SETTINGS)
        conn.max_inbound_frame_size = MAX_FRAME_SIZE
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.streams: dict[int, H2Stream] = {}
        self.max_streams = 0  # from the peer's SETTINGS
        self.settled = trio.Event()  # its first SETTINGS arrived (or the connection ended)
        self.goaway = False  # no new stream on it: the peer's GOAWAY, or retired by us
        self.closing = False  # the writer closes it once the queue is sent
        self.closed = False
        self.failure = ""  # why it ended, when it ended badly
        self.broke_protocol = False  # it ended for the peer's protocol error
        self.close_reason = ""
        self.idle_since = pool.clock()
        self.outgoing: list[bytes] = []
        self.outgoing_bytes = 0
        self._write_lot = trio.lowlevel.ParkingLot()
        self._drained_lot = trio.lowlevel.ParkingLot()
        self._writer_scope = trio.CancelScope()
        self._queue()

    def __repr__(self) -> str:
        return f"<H2Upstream {self.io.peer} [{len(self.streams)} streams]>"

    @property
    def room(self) -> int:
        """Streams it may take now."""
        if self.goaway or self.closed or not self.settled.is_set():
            return 0
        return self.max_streams - len(self.streams)

    # the writer ----------------------------------------------------------------------
    def _queue(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.outgoing.append(data)
            self.outgoing_bytes += len(data)
            self._write_lot.unpark_all()

    async def run_writer(self) -> None:
        outgoing, io = self.outgoing, self.io
        try:
            with self._writer_scope:  # close() gives it CLOSE_GRACE from then on
                while True:
                    while not outgoing:
                        if self.closing or self.closed:
                            return
                        await self._write_lot.park()
                    data = b"".join(outgoing) if len(outgoing) > 1 else outgoing[0]
                    outgoing.clear()
                    await io.send_all(data)
                    self.outgoing_bytes -= len(data)
                    self._drained_lot.unpark_all()
        except _NETWORK_ERRORS as exc:
            self.lost(f"the connection failed: {exc}", "lost")
        finally:
            self._end()  # the writer ends the connection whenever it stops (cancelled too)

    async def _drained(self) -> None:
        while self.outgoing_bytes > HIGH_WATER and not self.closed:
            await self._drained_lot.park()

    # the reader ----------------------------------------------------------------------
    async def run_reader(self) -> None:
        io, conn = self.io, self.h2
        reads = 0
        try:
            while not self.closed:
                data = await io.recv()
                if not data:
                    self.lost("the upstream closed the connection", "peer-closed")
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._broken(f"HTTP/2 protocol error from the upstream: {exc or type(exc).__name__}")
                    return
                for event in events:
                    self._on(event)
                self._queue()
                if self.outgoing_bytes > OUTGOING_LIMIT:
                    await self._drained()  # the peer does not read what we send: stop reading it
                reads += 1
                if reads % READS_PER_CHECKPOINT == 0:
                    await trio.lowlevel.checkpoint()
        except TLSError as exc:
            self.lost(f"TLS failed: {exc}", "lost")
        except _NETWORK_ERRORS as exc:
            self.lost(f"the connection failed: {exc}", "lost")
        finally:
            if not self.closing:  # cancelled (the sidecar stops); else the writer ends it
                self._end()

    def _on(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            assert isinstance(event, h2.events.DataReceived)
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.released:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif event.data:
                stream.pieces.append((event.data, event.flow_controlled_length))
                stream.lot.unpark_all()
            elif event.flow_controlled_length:  # padding only
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif kind is h2.events.ResponseReceived:
            assert isinstance(event, h2.events.ResponseReceived)
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.head = list(event.headers or ())
                stream.lot.unpark_all()
        elif kind is h2.events.StreamEnded:
            assert isinstance(event, h2.events.StreamEnded)
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.ended = True
                stream.lot.unpark_all()
        elif kind is h2.events.TrailersReceived:
            assert isinstance(event, h2.events.TrailersReceived)
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = list(event.headers or ())
        elif kind is h2.events.StreamReset:
            assert isinstance(event, h2.events.StreamReset)
            self._reset(event.stream_id, int(event.error_code), remote=event.remote_reset)
        elif kind is h2.events.WindowUpdated:
            assert isinstance(event, h2.events.WindowUpdated)
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.lot.unpark_all()
            else:
                self._wake_all()
        elif kind is h2.events.RemoteSettingsChanged:
            self._settings()
        elif kind is h2.events.ConnectionTerminated:
            assert isinstance(event, h2.events.ConnectionTerminated)
            self._goaway(event.last_stream_id or 0, int(event.error_code or 0))
        # InformationalResponseReceived (1xx: skipped), PingReceived (h2 answers it),
        # SettingsAcknowledged, PriorityUpdated, UnknownFrameReceived: nothing to do.

    def _wake_all(self) -> None:
        for stream in self.streams.values():
            stream.lot.unpark_all()

    def _settings(self) -> None:
        self.max_streams = min(MAX_STREAMS, self.h2.remote_settings.max_concurrent_streams)
        self._wake_all()  # the initial window may have changed too
        if not self.settled.is_set():
            self.settled.set()
        self.pool.wake()

    def _reset(self, stream_id: int, code: int, *, remote: bool) -> None:
        stream = self.streams.get(stream_id)
        if remote:
            self.pool.count_reset(code)
        if stream is None:
            return
        name = _code_name(code).upper().replace("-", "_")
        if remote:
            stream.fail(f"reset the stream ({name})", unprocessed=code == ErrorCodes.REFUSED_STREAM)
        else:  # h2 reset it: the peer broke the protocol on this stream
            stream.protocol_error = True
            stream.fail(f"broke the HTTP/2 protocol on the stream ({name})")

    def _goaway(self, last_stream_id: int, code: int) -> None:
        # h2 takes a GOAWAY for the end of the connection and refuses every frame after it,
        # but the streams up to its last stream id are to be finished (RFC 9113 §6.8): its
        # state goes back to open, and we open no stream on it any more. (It also drops the
        # frames it made earlier in the same read, such as a SETTINGS ACK: rare, harmless.)
        self.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        if not self.goaway:
            self.goaway = True
            self.close_reason = "goaway"
            if code:
                log.info("%s sent GOAWAY (%s)", self.pool.endpoint.address, _code_name(code))
        for stream in list(self.streams.values()):
            if stream.id > last_stream_id:
                stream.fail("sent GOAWAY before processing the stream", unprocessed=True)
        self.pool.wake()
        if not self.streams:
            self.close("goaway")

    # the end -------------------------------------------------------------------------
    def retire(self) -> None:
        """No new stream on it; closed once its streams are done."""
        self.goaway = True
        if not self.close_reason:
            self.close_reason = "retired"
        if not self.streams:
            self.close(self.close_reason)

    def _broken(self, why: str) -> None:
        """The peer broke the protocol: h2 queued a GOAWAY; send it, then close."""
        self.failure = why
        self.broke_protocol = True
        for stream in self.streams.values():
            stream.protocol_error = True
            stream.fail(why)
        self.pool.note_failure(why)
        self.close("protocol-error")

    def close(self, reason: str) -> None:
        """Close once what is queued is sent (a GOAWAY first if we have not sent one)."""
        if self.closing or self.closed:
            return
        self.closing = True
        if not self.failure:
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:  # pragma: no cover - h2 refuses a GOAWAY in its state
                pass
        self._queue()
        self._write_lot.unpark_all()
        self._writer_scope.deadline = trio.current_time() + CLOSE_GRACE  # a peer that reads nothing
        self.pool.removed(self, reason)

    def lost(self, why: str, reason: str) -> None:
        if self.closed:
            return
        if not self.failure:
            self.failure = why
        self.pool.removed(self, reason)
        self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.io.close()
        if self.source_port and self.pool.own is not None:
            self.pool.own.open.discard(self.source_port)
        why = self.failure or "the connection was closed"
        for stream in self.streams.values():
            stream.fail(why)
        self.settled.set()
        self._write_lot.unpark_all()
        self._drained_lot.unpark_all()
        self.pool.removed(self, self.close_reason or "lost")

    # streams -------------------------------------------------------------------------
    def open_stream(self, fields: list[tuple[bytes, bytes]], end_stream: bool) -> H2Stream:
        conn = self.h2
        stream_id = conn.get_next_available_stream_id()
        try:
            conn.send_headers(stream_id, fields, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:  # a field HTTP/2 cannot carry
            # h2 checks the fields as it encodes them: its HPACK table may now differ from
            # the peer's, so no further HEADERS may go on this connection.
            self.retire()
            raise MeshError(errors.BAD_REQUEST, f"the request cannot go over HTTP/2: {exc}") from None
        stream = self.streams[stream_id] = H2Stream(self, stream_id)
        self._queue()
        return stream

    async def send_body(self, stream: H2Stream, data: bytes) -> None:
        """``data`` on ``stream`` as the windows allow; waits for them, and for the queue."""
        conn = self.h2
        view = memoryview(data)
        while view:
            if stream.failure is not None or stream.released or self.closed:
                raise StreamGone
            try:
                window = conn.local_flow_control_window(stream.id)
                if window <= 0:
                    await stream.lot.park()
                    continue
                size = min(window, len(view), conn.max_outbound_frame_size)
                conn.send_data(stream.id, view[:size])
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                raise StreamGone from None
            view = view[size:]
            self._queue()
        if self.outgoing_bytes > HIGH_WATER:
            await self._drained()

    def end_stream(self, stream: H2Stream) -> None:
        if stream.failure is not None or stream.released or self.closed:
            raise StreamGone
        try:
            self.h2.end_stream(stream.id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            raise StreamGone from None
        self._queue()

    def taken(self, stream: H2Stream, flow_controlled_length: int) -> None:
        """The downstream took a piece: the peer may send that much more."""
        if not self.closed:
            self.h2.acknowledge_received_data(flow_controlled_length, stream.id)
            self._queue()

    def cancel(self, stream: H2Stream, why: str) -> None:
        """Give up on ``stream`` (a timeout, the client's body failed): RST_STREAM CANCEL."""
        stream.fail(why)
        self._reset_stream(stream)

    def _reset_stream(self, stream: H2Stream) -> None:
        state = self.h2.streams.get(stream.id)
        if state is not None and not state.closed and not self.closed:
            try:
                self.h2.reset_stream(stream.id, ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:  # pragma: no cover - the state said it was open
                pass
            self._queue()

    def release(self, stream: H2Stream) -> None:
        """The exchange is over: reset the stream unless it ended both ways, give the
        connection window back for what was not taken, and free its place."""
        if stream.released:
            return
        stream.released = True
        stream.lot.unpark_all()  # a pump waiting for a window stops
        self.streams.pop(stream.id, None)
        if not self.closed:
            self._reset_stream(stream)
            unread = sum(length for _, length in stream.pieces)
            stream.pieces.clear()
            if unread:
                self.h2.acknowledge_received_data(unread, stream.id)
                self._queue()
        if not self.streams:
            self.idle_since = self.pool.clock()
            if self.goaway:
                self.close(self.close_reason or "goaway")
        self.pool.wake()


class _Dial:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: MeshError | None = None


class H2EndpointPool:
    """The HTTP/2 connections to one endpoint."""

    def __init__(
        self,
        endpoint: Endpoint,
        nursery: trio.Nursery,
        *,
        service: str = "",
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = trio.current_time,
        tls: MeshTLS | None = None,
        own: OwnConnections | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.nursery = nursery
        self.service = service
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.tls = tls
        self.own = own
        self.conns: list[H2Upstream] = []  # open, in the order they were made
        self.dialing: _Dial | None = None
        self._lot = trio.lowlevel.ParkingLot()  # requests waiting for room on a connection
        self.requests = 0
        self.errors = 0
        self.connects = 0
        self.overflows = 0
        self.retries = 0  # streams sent again: refused, or not processed before a GOAWAY
        self.closes: dict[str, int] = {}  # connections ended, by reason
        self.resets: dict[str, int] = {}  # RST_STREAM received, by error code
        self.failing = False  # the last dial failed (logged once until one succeeds)
        self.failure_logged = False  # a protocol failure (logged once until a dial succeeds)

    def __repr__(self) -> str:
        return f"<H2EndpointPool {self.endpoint.address} [{len(self.conns)} connections]>"

    def wake(self) -> None:
        self._lot.unpark_all()

    async def acquire(self, connect_timeout: float) -> H2Upstream:
        """A connection with room for a stream: one of those open, else a new one, else
        (all ``max_connections`` full) wait for room up to ``connect_timeout``: then
        MeshError ``overloaded``."""
        self.requests += 1
        give_up = trio.current_time() + connect_timeout
        epoch = 0 if self.tls is None else self.tls.epoch()
        while True:
            for conn in list(self.conns):
                if conn.epoch != epoch:  # made before the credentials or modes changed: retire it
                    conn.retire()
                elif conn.room > 0:
                    return conn
            dial = self.dialing
            if dial is None and len(self.conns) < self.max_connections:
                await self._dial(max(give_up - trio.current_time(), 0.0))  # bounded by the same time
                continue
            with trio.move_on_at(give_up):
                if dial is None:
                    await self._lot.park()
                    continue
                await dial.done.wait()
                if dial.error is not None:  # its failure is ours too: the same answer, at once
                    raise MeshError(dial.error.reason, dial.error.detail, cause=dial.error.cause)
                continue
            if dial is not None:
                raise MeshError(errors.CONNECT_FAILED, f"could not connect to the upstream within {connect_timeout:g}s")
            self.overflows += 1
            raise MeshError(
                errors.OVERLOADED,
                f"all {self.max_connections} HTTP/2 connections to the upstream stayed full for {connect_timeout:g}s",
            )

    async def _dial(self, connect_timeout: float) -> None:
        dial = self.dialing = _Dial()
        try:
            conn = await self._connect(connect_timeout)
        except MeshError as exc:
            dial.error = exc
            raise
        finally:
            self.dialing = None
            dial.done.set()
        self.conns.append(conn)

    async def _connect(self, connect_timeout: float) -> H2Upstream:
        """A new connection whose peer sent its SETTINGS; with mTLS and ALPN h2 when the
        endpoint is a sidecar and the destination's mode is not off (the connect timeout
        covers the handshake and the SETTINGS too)."""
        endpoint, tls = self.endpoint, self.tls
        context = tls.h2_client_context(self.service) if endpoint.mtls and tls is not None else None
        epoch = 0 if tls is None else tls.epoch()
        own = self.own if context is not None else None
        source_ports: list[int] = []

        def bound(port: int) -> None:
            source_ports.append(port)
            own.open.add(port)  # type: ignore[union-attr]

        conn: H2Upstream | None = None
        phase = "connect"
        try:
            with trio.fail_after(max(connect_timeout, 0.0)):
                io = await connect(endpoint.host, endpoint.port, bound=None if own is None else bound)
                if context is not None:
                    assert tls is not None
                    phase = "handshake"
                    io = await tls.handshake_client(io, (endpoint.host, endpoint.port), context)
                    self._check_peer(io)
                phase = "settings"
                conn = H2Upstream(io, self, epoch, source_ports[0] if source_ports else 0)
                self.nursery.start_soon(conn.run_reader)
                self.nursery.start_soon(conn.run_writer)
                await conn.settled.wait()
            if conn.closed:
                raise self._no_settings(conn)
        except trio.TooSlowError:
            if conn is not None:
                conn.lost("no SETTINGS in time", "no-settings")
                raise self._failed(
                    errors.UPSTREAM_PROTOCOL_ERROR,
                    f"no HTTP/2 SETTINGS from the upstream within {connect_timeout:g}s (does it speak HTTP/2?)",
                ) from None
            if phase == "handshake":
                raise self._handshake_failed(f"no TLS handshake within {connect_timeout:g}s") from None
            raise self._failed(
                errors.CONNECT_FAILED, f"could not connect to the upstream within {connect_timeout:g}s", "timed out"
            ) from None
        except Closed as exc:  # the handshake failed
            if own is not None and source_ports and source_ports[0] in own.looped:
                own.looped.discard(source_ports[0])
                raise MeshError(errors.LOOP_DETECTED, LOOP_HINT.format(service=self.service)) from None
            raise self._handshake_failed(str(exc)) from None
        except PeerIdentityError as exc:
            assert tls is not None
            tls.on_failure("client", errors.PEER_IDENTITY_MISMATCH.name)
            raise self._failed(
                errors.PEER_IDENTITY_MISMATCH, f"the upstream is not {self.service!r}: {exc}", f"peer identity: {exc}"
            ) from None
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            cause = "refused" if exc.errno == errno.ECONNREFUSED else ""
            error = self._failed(errors.CONNECT_FAILED, f"could not connect to the upstream: {why}", why)
            error.cause = cause
            raise error from None
        except BaseException:
            if conn is not None:
                conn.lost("cancelled while connecting", "cancelled")
            raise
        finally:
            if own is not None and source_ports and conn is None:
                own.open.discard(source_ports[0])
        self.failing = self.failure_logged = False
        self.connects += 1
        return conn

    def _check_peer(self, io: Connection) -> None:
        """The endpoint proved the destination's identity and chose HTTP/2, or it is closed
        and PeerIdentityError (or MeshError upstream-protocol-error) says why."""
        assert isinstance(io, TLSConnection) and self.tls is not None
        check_peer_is(io, self.service, self.tls.trust_domain)
        chosen = io.tls_object.selected_alpn_protocol()
        if chosen != "h2":
            io.close()
            why = f"the sidecar at {self.endpoint.address} did not choose HTTP/2 in ALPN ({chosen or 'nothing'})"
            self.note_failure(why + ": an older meshlet? HTTP/2 requests to it fail")
            self.count_close("no-h2")
            raise MeshError(errors.UPSTREAM_PROTOCOL_ERROR, "the upstream sidecar does not speak HTTP/2 (ALPN)")

    def _no_settings(self, conn: H2Upstream) -> MeshError:
        if conn.io.tls and not conn.broke_protocol:
            # It chose h2 in ALPN, then ended before its SETTINGS: TLS 1.3 lets a server judge
            # our certificate after our side of the handshake is done, and a refusal (an
            # alert, or just a close) arrives here.
            assert self.tls is not None
            self.tls.on_failure("client", errors.TLS_HANDSHAKE_FAILED.name)
            return MeshError(errors.TLS_HANDSHAKE_FAILED, f"the upstream refused the TLS handshake: {conn.failure}")
        hint = ""
        if not self.endpoint.protocol:
            # Undeclared, an HTTP/2 request goes on in HTTP/2: an HTTP/1.1-only app refuses it.
            hint = (
                "; if the app speaks HTTP/1.1 only, declare it: its sidecar's --app-protocol http1, "
                "or its Service document's protocol: http1"
            )
        self.note_failure(
            f"{self.endpoint.address} ended the connection before its HTTP/2 SETTINGS: {conn.failure}{hint}"
        )
        return MeshError(
            errors.UPSTREAM_PROTOCOL_ERROR,
            f"the upstream did not start HTTP/2 (does it speak it?): {conn.failure}{hint}",
        )

    def _handshake_failed(self, why: str) -> MeshError:
        assert self.tls is not None
        self.tls.on_failure("client", errors.TLS_HANDSHAKE_FAILED.name)
        return self._failed(
            errors.TLS_HANDSHAKE_FAILED, f"TLS handshake with the upstream failed: {why}", f"TLS handshake: {why}"
        )

    def _failed(self, reason: errors.Reason, detail: str, why: str = "") -> MeshError:
        """Count a failed dial; log the address once per failing streak."""
        self.errors += 1
        if not self.failing:
            self.failing = True
            log.warning(
                "HTTP/2 connect to %s failed: %s (logged again after a connection succeeds)",
                self.endpoint.address,
                why or detail,
            )
        return MeshError(reason, detail)

    def note_failure(self, why: str) -> None:
        if not self.failure_logged:
            self.failure_logged = True
            log.warning("%s (logged again after a connection succeeds)", why)

    def removed(self, conn: H2Upstream, reason: str) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
            self.count_close(reason)
        self.wake()

    def count_close(self, reason: str) -> None:
        self.closes[reason] = self.closes.get(reason, 0) + 1

    def count_reset(self, code: int) -> None:
        name = _code_name(code)
        self.resets[name] = self.resets.get(name, 0) + 1

    def expire_idle(self, now: float) -> int:
        expired = 0
        for conn in list(self.conns):
            if not conn.streams and now - conn.idle_since >= self.idle_timeout:
                conn.close("idle")
                expired += 1
        return expired

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.close("closed")

    def stats(self) -> Iterator[tuple[str, int]]:
        active = sum(1 for conn in self.conns if conn.streams)
        yield "active", active
        yield "idle", len(self.conns) - active


def pool_of(pools: UpstreamPools, endpoint: Endpoint, service: str) -> H2EndpointPool:
    """``endpoint``'s HTTP/2 pool, made on first use (``pools.nursery`` runs its tasks)."""
    key = (endpoint.host, endpoint.port)
    pool: H2EndpointPool | None = pools.h2_pools.get(key)
    if pool is None:
        nursery = pools.nursery
        if nursery is None:
            raise RuntimeError("UpstreamPools.nursery is not set: HTTP/2 connections need one for their tasks")
        pool = pools.h2_pools[key] = H2EndpointPool(
            endpoint,
            nursery,
            service=service,
            max_connections=pools.max_connections,
            idle_timeout=pools.idle_timeout,
            clock=pools.clock,
            tls=pools.tls,
            own=pools.own,
        )
        pools.services.setdefault(key, service)
    elif pool.endpoint.mtls is not endpoint.mtls or pool.endpoint.protocol != endpoint.protocol:
        pool.endpoint = endpoint  # registered by a sidecar now (or no longer), or its protocol declared since
    return pool
