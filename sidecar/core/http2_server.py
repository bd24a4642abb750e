"""The server side of one HTTP/2 connection, sans-IO: ``h2``'s connection with our settings,
its events turned into the few the trio shell (sidecar/net/http2.py) acts on, and the
bounds that ``h2`` leaves to us (sidecar/core/http2.py has their values):

* streams past MAX_CONCURRENT_STREAMS are refused with RST_STREAM REFUSED_STREAM (``h2``
  would close the whole connection), and count against the reset budget;
* a header block still growing past MAX_HEADER_BLOCK (a CONTINUATION flood) closes the
  connection; ``h2`` bounds the decoded list at MAX_HEADER_LIST_SIZE;
* streams the client resets before their answer (rapid reset) and control frames (SETTINGS,
  PING, PRIORITY, unknown frames, empty DATA) are budgeted per window of time; past a
  budget: GOAWAY ENHANCE_YOUR_CALM.

Anything ``h2`` refuses in the bytes is a connection error: ``h2`` queues its GOAWAY and
:class:`ConnectionFault` says why. This module imports ``h2``: the shell imports it only
when a first HTTP/2 connection arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.events as ev
import h2.exceptions
from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream
from hyperframe.frame import GoAwayFrame

from . import http2
from .http1 import ProtocolError, RequestHead

DEFAULT_WINDOW = 65_535  # RFC 9113 §6.9.2: the initial connection window


@dataclass(slots=True)
class StreamOpened:
    """A new stream's request: its head, or why it cannot be taken (answered 400)."""

    stream_id: int
    head: RequestHead | ProtocolError
    end_stream: bool


@dataclass(slots=True)
class BodyReceived:
    stream_id: int
    data: bytes
    flow_length: int  # to acknowledge once the data is handed on (padding included)


@dataclass(slots=True)
class BodyEnded:
    stream_id: int


@dataclass(slots=True)
class StreamCancelled:
    """The client reset the stream."""

    stream_id: int


@dataclass(slots=True)
class WindowOpened:
    """Send windows grew: ``stream_id`` 0 for every stream."""

    stream_id: int


class ConnectionFault(Exception):
    """The connection must close: ``reason`` is one of http2.CLOSE_REASONS; the GOAWAY that
    says why is queued in the output."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _H2Connection(H2Connection):
    """h2's connection, but a body's length against its Content-Length is checked by
    ServerConnection: h2 makes a mismatch a connection error, RFC 9113 §8.1.1 the stream's."""

    def _begin_new_stream(self, stream_id: int, allowed_ids: AllowedStreamIDs) -> H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream._initialize_content_length = _unchecked  # type: ignore[method-assign]
        return stream


def _unchecked(headers: object) -> None:
    """No expected length for h2 to check (ServerConnection.lengths does)."""


def _settings(max_streams: int) -> Settings:
    return Settings(
        client=False,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: http2.MAX_HEADER_LIST_SIZE,
            SettingCodes.HEADER_TABLE_SIZE: http2.HEADER_TABLE_SIZE,
            SettingCodes.INITIAL_WINDOW_SIZE: http2.STREAM_WINDOW,
            SettingCodes.ENABLE_PUSH: 0,
        },
    )


class ServerConnection:
    """One client's HTTP/2 connection: bytes in (:meth:`receive`), events out; the shell
    calls the ``send_*`` methods and takes :meth:`output`."""

    def __init__(self, counters: http2.Http2Counters) -> None:
        config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            # What we send is ours: response_fields/trailer_fields lower-case the names and drop
            # what HTTP/2 forbids, and the values come from llhttp (no CR, LF or NUL) or from
            # us; h2's checks of it would cost a quarter of a stream's CPU.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = conn = _H2Connection(config)
        conn.local_settings = _settings(http2.MAX_CONCURRENT_STREAMS)
        conn.initiate_connection()  # our SETTINGS, as advertised
        conn.increment_flow_control_window(http2.CONNECTION_WINDOW - DEFAULT_WINDOW)
        # Enforced from now on by us, not by h2 (which closes the connection past the limit):
        # twice ours, a backstop that only a stream never finished by us could reach.
        conn.local_settings = _settings(2 * http2.MAX_CONCURRENT_STREAMS)
        self.counters = counters
        self.active: set[int] = set()  # streams handed to the request path, not finished
        self.resets = http2.Budget(http2.RESET_BUDGET)
        self.control = http2.Budget(http2.CONTROL_BUDGET)
        self.last_stream = 0  # the highest stream id taken
        # Streams with a Content-Length: [declared, received so far]. Checked here, not by h2,
        # which makes a mismatch a connection error; RFC 9113 §8.1.1 makes it the stream's.
        self.lengths: dict[int, list[int]] = {}
        self.going_away = False  # GOAWAY sent: no new stream is taken

    # receiving -----------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> list[object]:
        """Feed bytes from the client; the events they make. ConnectionFault: close."""
        conn = self.h2
        try:
            events = conn.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            raise ConnectionFault("header-too-large", str(exc)) from None
        except h2.exceptions.ProtocolError as exc:
            reason = "header-too-large" if "continuation" in str(exc).lower() else "protocol-error"
            raise ConnectionFault(reason, str(exc) or type(exc).__name__) from None
        # h2 keeps an unfinished header block whole until END_HEADERS: bound it here.
        pending = conn.incoming_buffer._headers_buffer  # noqa: SLF001 - no public view of it
        if pending and sum(len(frame.data) for frame in pending) > http2.MAX_HEADER_BLOCK:
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM)
            raise ConnectionFault("header-too-large", "a header block past the header list limit")
        out: list[object] = []
        for event in events:
            kind = type(event)
            if kind is ev.DataReceived:
                assert isinstance(event, ev.DataReceived)
                if event.data or event.stream_ended is not None:
                    out.append(BodyReceived(event.stream_id, event.data, event.flow_controlled_length))
                    if event.stream_id in self.lengths:
                        self._count_length(event.stream_id, len(event.data), event.stream_ended is not None, out)
                else:
                    self._control(now)  # an empty DATA frame: no work for us but the frame's
            elif kind is ev.RequestReceived:
                assert isinstance(event, ev.RequestReceived)
                opened = self._open(event, now)
                if opened is not None:
                    out.append(opened)
            elif kind is ev.StreamEnded:
                if event.stream_id in self.active:  # type: ignore[attr-defined]
                    out.append(BodyEnded(event.stream_id))  # type: ignore[attr-defined]
                self.lengths.pop(event.stream_id, None)  # type: ignore[attr-defined]
            elif kind is ev.StreamReset:
                assert isinstance(event, ev.StreamReset)
                if event.stream_id in self.active:
                    self.counters.resets["client"] += 1
                    out.append(StreamCancelled(event.stream_id))
                    if not self.resets.spend(now):
                        self._fail(ErrorCodes.ENHANCE_YOUR_CALM)
                        raise ConnectionFault("rapid-reset", "too many streams reset by the client")
            elif kind is ev.WindowUpdated:
                out.append(WindowOpened(event.stream_id))  # type: ignore[attr-defined]
            elif kind is ev.RemoteSettingsChanged:
                self._control(now)
                out.append(WindowOpened(0))  # the initial window may have grown
            elif kind is ev.ConnectionTerminated:
                self.going_away = True  # the client's GOAWAY: no new stream; it closes when done
            elif kind in (ev.PingReceived, ev.PriorityUpdated, ev.UnknownFrameReceived):
                self._control(now)
            # SettingsAcknowledged, PingAckReceived, TrailersReceived (request trailers:
            # an HTTP/1.1 upstream takes none; gRPC sends none) need nothing.
        return out

    def _open(self, event: ev.RequestReceived, now: float) -> StreamOpened | None:
        stream_id = event.stream_id
        if self.going_away or len(self.active) >= http2.MAX_CONCURRENT_STREAMS:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)  # (unless the client reset it already)
            self.counters.resets["refused"] += 1
            if not self.resets.spend(now):
                self._fail(ErrorCodes.ENHANCE_YOUR_CALM)
                raise ConnectionFault("rapid-reset", "too many streams refused")
            return None
        end_stream = event.stream_ended is not None
        head: RequestHead | ProtocolError
        try:
            head = http2.request_head(list(event.headers or ()), end_stream)
        except ProtocolError as error:
            head = error
        self.active.add(stream_id)
        self.last_stream = stream_id
        if not isinstance(head, ProtocolError) and head.content_length is not None:
            self.lengths[stream_id] = [head.content_length, 0]
        return StreamOpened(stream_id, head, end_stream)

    def _count_length(self, stream_id: int, size: int, ended: bool, out: list[object]) -> None:
        length = self.lengths[stream_id]
        length[1] += size
        if length[1] > length[0] or ended and length[1] != length[0]:
            del self.lengths[stream_id]
            self.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            self.counters.resets["malformed"] += 1
            out.append(StreamCancelled(stream_id))

    def _control(self, now: float) -> None:
        if not self.control.spend(now):
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM)
            raise ConnectionFault("control-flood", "too many control frames")

    def _fail(self, code: ErrorCodes) -> None:
        self.h2.close_connection(code, last_stream_id=self.last_stream)

    # sending ---------------------------------------------------------------------------
    def output(self) -> bytes:
        return self.h2.data_to_send()

    def window(self, stream_id: int) -> int:
        """What may be sent on the stream now (0: wait for WINDOW_UPDATE); StreamClosedError
        once the client reset it."""
        h2conn = self.h2
        return min(h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size, http2.DATA_FRAME)

    def finished(self, stream_id: int) -> None:
        """The stream's exchange is over (its response sent, or given up)."""
        self.active.discard(stream_id)
        self.lengths.pop(stream_id, None)

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """Request body handed on: the client may send that much more."""
        if flow_length:
            try:
                self.h2.acknowledge_received_data(flow_length, stream_id)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closing: nothing to open

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            pass  # closed already (the client reset it, or it ended)

    def goaway(self) -> bytes:
        """Graceful shutdown: a GOAWAY (NO_ERROR) naming the last stream taken, outside h2's
        state machine (its close_connection would refuse to send the open streams' answers)."""
        self.going_away = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream
        frame.error_code = ErrorCodes.NO_ERROR
        return frame.serialize()


__all__ = [
    "BodyEnded",
    "BodyReceived",
    "ConnectionFault",
    "ServerConnection",
    "StreamCancelled",
    "StreamOpened",
    "WindowOpened",
]
