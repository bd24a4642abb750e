"""Sans-IO HTTP/1.1 for the data path: bytes in, events out; heads in, bytes out.

Theory of operation
-------------------
Parsing is llhttp's (through httptools): a strict, fast, well-kept C parser. It already
rejects the classic smuggling shapes (Content-Length together with Transfer-Encoding,
duplicate Content-Length, obs-fold, bare CR, NUL, whitespace before the colon, chunk
sizes that are not hex or overflow). On top of it this module adds the rules llhttp
leaves to the application (RFC 9112's hazards: smuggling, framing, limits):

* head size and field count limits (llhttp has none): 431;
* HTTP/0.9: 400; HTTP/2.0: 505 (llhttp refuses other versions it does not know: 400);
* Transfer-Encoding other than exactly ``chunked``, or any TE in HTTP/1.0: 400
  (we never forward a coding we did not decode);
* Host missing or repeated in HTTP/1.1, or not an authority (a path, userinfo, a list,
  spaces: ``Host: a/b``, ``Host: u@a``, ``Host: a, b``): 400;
* the asterisk form (``*``) on anything but OPTIONS: 400;
* a request target longer than the head limit: 414;
* an Upgrade in HTTP/1.0 is ignored (RFC 9110 §7.8: the request is a plain one);
* a body (any Content-Length but 0, or chunked) on GET, HEAD, DELETE or TRACE: 400.
  RFC 9110 gives such a body no meaning and names it a smuggling risk; apps commonly
  ignore it and read its bytes as their next request (one the proxy never saw);
* chunk sizes: llhttp refuses one that overflows 64 bits (leading zeros are fine); the
  body is re-chunked on the way out, so a chunk's size and extensions never pass through.

llhttp is callback driven. The readers turn callbacks into a queue of events so the
trio shell can pull them one at a time (like h11's ``next_event``). The shell feeds at
most one ``receive_some`` worth of bytes and only when the queue is empty, so the queue
is bounded by the read size: nothing is buffered whole.

Errors found in the bytes are queued as a :class:`ProtocolError` event *after* the
events of every complete request before them, so a good pipelined request is still
answered before the connection is closed for a bad one.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus

import httptools

__all__ = [
    "Data",
    "EndOfMessage",
    "ProtocolError",
    "RequestHead",
    "RequestReader",
    "ResponseHead",
    "ResponseReader",
    "Upgrade",
    "CHUNKED_END",
    "chunk",
    "serialize_request_head",
    "serialize_response_head",
]

# Envoy's defaults are 60 KiB / 100 fields; ours is 64 KiB (docs/limits.md).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_FIELDS = 100

CHUNKED_END = b"0\r\n\r\n"


@dataclass(slots=True)
class RequestHead:
    """A request's head, whatever the version it came in: an HTTP/2 stream's is made with
    ``http_version="2"``, ``target`` from ``:path``, ``host`` from ``:authority``, no
    pseudo-header in ``headers``, and ``chunked`` meaning "a body of unknown length" (it
    ends with the stream), so that every layer reads one shape."""

    method: bytes
    target: bytes
    # (name, value) in arrival order; names keep their case, compare lower-cased.
    headers: list[tuple[bytes, bytes]]
    http_version: str = "1.1"
    # Framing, computed once from the headers by the reader.
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    expect_continue: bool = False
    upgrade: bytes | None = None  # the Upgrade token when the client asked for one
    host: bytes | None = None
    connection: frozenset[bytes] = frozenset()  # Connection options, lower-cased

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: str = "1.1"
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    # No Content-Length and not chunked: the body runs until the upstream closes.
    until_close: bool = False
    no_body: bool = False
    connection: frozenset[bytes] = frozenset()  # Connection options, lower-cased


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    pass


@dataclass(slots=True)
class Upgrade:
    """The head was an upgrade that the parser stopped at; ``rest`` is tunnel bytes."""

    rest: bytes


@dataclass(slots=True)
class ProtocolError(Exception):
    """Bytes that are not acceptable HTTP/1.1. ``status`` is what a server answers."""

    status: int
    detail: str

    def __str__(self) -> str:
        return self.detail


END = EndOfMessage()
_CONNECTION = b"connection"
# A Host value as RFC 9112 §3.2 allows it for an http URI: an IP literal or a non-empty
# reg-name (RFC 9110 §4.2.1: an http URI with an empty host is invalid), and a port. No "/",
# "@", ",", space or control character: each would let the sidecar route by one name and
# the app read another.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]+)(?::[0-9]*)?")
# Methods whose body has no defined meaning (RFC 9110 §9.3.1, §9.3.2, §9.3.5, §9.3.8).
_BODILESS_METHODS = frozenset((b"GET", b"HEAD", b"DELETE", b"TRACE"))


class _StopAtHead(Exception):
    """Raised from a callback to stop llhttp after a bodiless response head."""


_COMMON_TOKENS = {
    b"keep-alive": [b"keep-alive"],
    b"close": [b"close"],
    b"Keep-Alive": [b"keep-alive"],
    b"Close": [b"close"],
    b"Upgrade": [b"upgrade"],
    b"upgrade": [b"upgrade"],
}


def _tokens(value: bytes) -> list[bytes]:
    common = _COMMON_TOKENS.get(value)  # nearly every Connection header is one of these
    if common is not None:
        return common
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class _Reader:
    """What both readers share: the event queue, head accounting and limits."""

    _parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def __init__(self, max_head_bytes: int, max_fields: int) -> None:
        self.events: deque[object] = deque()
        self.max_head_bytes = max_head_bytes
        self.max_fields = max_fields
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = True  # until a head completes; again after each message
        self._pending_head_bytes = 0  # bytes fed while a head is incomplete
        self.failed = False
        self.messages_completed = 0

    # llhttp callbacks (shared) ----------------------------------------------------
    # There is no on_message_begin on purpose: httptools calls only the callbacks an
    # object defines, and each one is a Python call per message on the hot path. The
    # per-message state is reset when a head completes and when a message ends.

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_head_bytes:
            raise ProtocolError(431, "header fields too large")
        if len(self._headers) > self.max_fields:
            raise ProtocolError(431, "too many header fields")

    def on_body(self, body: bytes) -> None:
        self.events.append(Data(body))

    def on_message_complete(self) -> None:
        self.messages_completed += 1
        self.events.append(END)
        self._in_head = True
        self._head_bytes = 0
        self._pending_head_bytes = 0

    # feeding -----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse ``data``; queue events, and a ProtocolError event on bad bytes."""
        if self.failed:
            return
        completed = self.messages_completed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._plain_after_upgrade():
                self.feed(data[exc.args[0] :])  # the body, then the next requests
                return
            self.events.append(Upgrade(data[exc.args[0] :]))
            self.failed = True  # nothing after an upgrade is HTTP any more
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopAtHead):
                self._after_stop(data)
                return
            if isinstance(cause, ProtocolError):
                self._fail(cause)
            else:
                self._fail(ProtocolError(400, str(cause or exc)))
            return
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(400, str(exc) or "malformed message"))
            return
        if self._in_head:
            if self.messages_completed != completed:
                # This head began after a message that ended inside this feed: the bytes
                # before it are not head bytes. Count what the callbacks measured; its
                # unfinished line is counted with the next feeds.
                self._pending_head_bytes = self._head_bytes
            else:
                self._pending_head_bytes += len(data)
            if self._pending_head_bytes > self.max_head_bytes:
                self._fail(self._too_large())

    def take_upgrade_rest(self) -> bytes:
        """Drain the queue after an upgrade; the bytes that followed the head (tunnel
        bytes after a 101, or the next plain request when there was no switch)."""
        rest = b""
        events = self.events
        while events:
            event = events.popleft()
            if type(event) is Upgrade:
                rest = event.rest
        return rest

    def _too_large(self) -> ProtocolError:
        return ProtocolError(431, "header section too large")

    def _after_stop(self, data: bytes) -> None:  # pragma: no cover - response only
        raise NotImplementedError

    def _plain_after_upgrade(self) -> bool:  # pragma: no cover - request only
        return False

    def _fail(self, error: ProtocolError) -> None:
        self.failed = True
        self.events.append(error)


class RequestReader(_Reader):
    """Parses requests from a downstream connection (pipelining allowed)."""

    _parser: httptools.HttpRequestParser

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, max_fields: int = MAX_HEADER_FIELDS) -> None:
        super().__init__(max_head_bytes, max_fields)
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        # An upgrade llhttp stopped at that we do not treat as one (it has a body, or
        # our reading of Connection differs): its framing, so parsing can go on.
        self._not_upgraded: RequestHead | None = None
        self._framing_only = False  # parsing the stand-in head of _plain_after_upgrade

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.max_head_bytes:
            raise ProtocolError(414, "request target too long")

    def _too_large(self) -> ProtocolError:
        if self._url and not self._headers:  # still in the request line: its target
            return ProtocolError(414, "request target too long")
        return super()._too_large()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._framing_only:
            self._framing_only = False
            self._url = b""
            self._headers = []
            return
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _unsupported(version)
        head = RequestHead(parser.get_method(), self._url, self._headers, version)
        self._url = b""
        self._headers = []
        hosts = 0
        connection: list[bytes] = []
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"host":
                hosts += 1
                head.host = value
            elif lname == b"content-length":
                head.content_length = int(value)  # llhttp validated the digits
            elif lname == b"transfer-encoding":
                if version == "1.0":
                    raise ProtocolError(400, "transfer-encoding in an HTTP/1.0 request")
                if value.strip().lower() != b"chunked":
                    raise ProtocolError(400, "transfer-encoding other than chunked")
                head.chunked = True
            elif lname == _CONNECTION:
                connection.extend(_tokens(value))
            elif lname == b"expect":
                if value.strip().lower() == b"100-continue":
                    head.expect_continue = True
            elif lname == b"upgrade":
                head.upgrade = value.strip()
        if hosts > 1:  # which one would route, which one would the app read?
            raise ProtocolError(400, "more than one Host")
        if hosts and _HOST.fullmatch(head.host.strip(b" \t")) is None:  # type: ignore[union-attr]
            raise ProtocolError(400, "the Host header is not a host[:port]")
        if connection:
            head.connection = frozenset(connection)
        if version == "1.1":
            if hosts != 1:
                raise ProtocolError(400, "an HTTP/1.1 request needs exactly one Host")
            head.keep_alive = b"close" not in connection
        else:
            head.keep_alive = b"keep-alive" in connection
            head.expect_continue = False
            head.upgrade = None  # HTTP/1.0 has no Upgrade (RFC 9110 §7.8): a plain request
        if head.upgrade is not None and b"upgrade" not in connection:
            head.upgrade = None
        if head.method == b"CONNECT":
            raise ProtocolError(400, "CONNECT is not supported")
        if head.target == b"*" and head.method != b"OPTIONS":
            raise ProtocolError(400, "the asterisk form is for OPTIONS only")
        if (head.chunked or head.content_length) and head.method in _BODILESS_METHODS:
            raise ProtocolError(
                400,
                f"a {head.method.decode()} request with a body: it has no meaning, and an app that "
                "ignores it would read it as another request",
            )
        if head.upgrade is not None and not parser.should_upgrade():
            head.upgrade = None  # llhttp parses on (an empty Upgrade): so do we
        if head.upgrade is not None and head.has_body:
            # llhttp (through httptools) would stop at this head and leave the body
            # unparsed: the body would be read as the next request, and the app would
            # wait for it in vain. An upgrade with a body is a plain request with that
            # body (HAProxy's reading); h2c's, the common one, is dropped anyway.
            head.upgrade = None
        if head.upgrade is None and parser.should_upgrade():
            self._not_upgraded = head
        self.events.append(head)

    def on_message_complete(self) -> None:
        if self._not_upgraded is not None and self._not_upgraded.has_body:
            return  # llhttp ends the message at an upgrade head; its body comes next
        # _Reader.on_message_complete, inlined: a call fewer per request
        self.messages_completed += 1
        self.events.append(END)
        self._in_head = True
        self._head_bytes = 0
        self._pending_head_bytes = 0

    def _plain_after_upgrade(self) -> bool:
        """llhttp stopped at a head we forward as a plain request: go on with a fresh
        parser, primed with a stand-in head of the same framing (which queues nothing),
        so that what follows is parsed as this request's body, then as requests."""
        head = self._not_upgraded
        if head is None:
            return False
        self._not_upgraded = None
        self._parser = httptools.HttpRequestParser(self)
        if not head.has_body:
            return True
        if head.chunked:
            framing = b"transfer-encoding: chunked"
        else:
            assert head.content_length is not None  # has_body and not chunked
            framing = b"content-length: %d" % head.content_length
        self._framing_only = True
        self._parser.feed_data(b"POST / HTTP/1.1\r\nhost: x\r\n" + framing + b"\r\n\r\n")
        return True


def _unsupported(version: str) -> ProtocolError:
    """A version llhttp parsed other than 1.0 and 1.1: HTTP/2.0 gets 505 (RFC 9110 §15.6.6);
    an HTTP/0.9 request line, which cannot be answered in its own version, gets 400, as
    HAProxy answers it. llhttp itself refuses versions it does not know (1.2, 3.0): 400."""
    if version.startswith("0."):
        return ProtocolError(400, "HTTP/0.9 is not supported: HTTP/1.1 is")
    return ProtocolError(505, f"HTTP/{version} is not supported: HTTP/1.1 is")


class ResponseReader(_Reader):
    """Parses responses from one upstream connection, one request at a time.

    Call :meth:`expect` before each response with the request's method: a response to
    HEAD has no body whatever its Content-Length says, and llhttp cannot be told so,
    so the reader stops llhttp at the head and starts a fresh parser for the next one.
    """

    _parser: httptools.HttpResponseParser

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, max_fields: int = MAX_HEADER_FIELDS) -> None:
        super().__init__(max_head_bytes, max_fields)
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = False
        self._head_buffer: bytearray | None = None
        self._interim = False
        self._reading_until_close = False
        # Bytes that arrived after the end of a message: a reused connection with
        # leftovers would answer the next request with them. Never reuse it.
        self.dirty = False

    def expect(self, method: bytes) -> None:
        self._head_request = method == b"HEAD"
        self._head_buffer = bytearray() if self._head_request else None

    def feed(self, data: bytes) -> None:
        if self._head_buffer is not None:
            self._head_buffer += data
        super().feed(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise ProtocolError(502, f"unsupported HTTP version {version}")
        if 100 <= status < 200 and status != 101:
            self._interim = True  # consumed here, never forwarded: we send our own 100
            self._headers = []
            return
        # The reason phrase is not kept: it carries no meaning (RFC 9112 §4) and
        # skipping llhttp's on_status saves a Python call per response. Like Envoy, we
        # send the standard phrase for the status.
        head = ResponseHead(status, reason_phrase(status), self._headers, version)
        self._headers = []
        connection: list[bytes] = []
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"content-length":
                head.content_length = int(value)
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise ProtocolError(502, "transfer-encoding other than chunked")
                head.chunked = True
            elif lname == _CONNECTION:
                connection.extend(_tokens(value))
        if connection:
            head.connection = frozenset(connection)
        if version == "1.1":
            head.keep_alive = b"close" not in connection
        else:
            head.keep_alive = b"keep-alive" in connection
        head.no_body = status in (204, 304) or self._head_request
        if not head.no_body and status != 101 and head.content_length is None:
            if not head.chunked:
                head.until_close = True
                head.keep_alive = False
                self._reading_until_close = True
        self.events.append(head)
        if self._head_request:
            raise _StopAtHead

    def on_message_complete(self) -> None:
        if self._interim:  # the end of a 1xx message: nothing to report
            self._interim = False
            self._in_head = True
            self._head_bytes = 0
            return
        super().on_message_complete()

    def _fail(self, error: ProtocolError) -> None:
        # Whatever llhttp or our limits say, a bad response is the upstream's fault: 502.
        super()._fail(error if error.status == 502 else ProtocolError(502, error.detail))

    def _after_stop(self, data: bytes) -> None:
        # The head of a HEAD response ended at the first empty line of what was fed.
        buffered = bytes(self._head_buffer or b"")
        end = buffered.find(b"\r\n\r\n")
        if end == -1 or end + 4 != len(buffered):
            self.dirty = True
        self.messages_completed += 1
        self.events.append(END)
        self._head_buffer = None
        self._head_request = False
        self._in_head = True
        self._head_bytes = 0
        self._parser = httptools.HttpResponseParser(self)

    def feed_eof(self) -> None:
        """The upstream closed: ends a read-until-close body; anywhere else the close
        queues nothing, and the caller treats the missing events as a cut-short message."""
        if self._reading_until_close and not self.failed:
            self._reading_until_close = False
            self.messages_completed += 1
            self.events.append(END)


_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _PHRASES.get(status, b"")


def _head_lines(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    parts: list[bytes] = []
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    parts.append(b"\r\n")
    return parts


def serialize_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([method, b" ", target, b" HTTP/1.1\r\n", *_head_lines(headers)])


def serialize_response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([b"HTTP/1.1 %d " % status, reason, b"\r\n", *_head_lines(headers)])


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data would end the body, so never pass it."""
    return b"%x\r\n%b\r\n" % (len(data), data)
