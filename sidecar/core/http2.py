"""HTTP/2 on the downstream side, the parts that need no ``h2``: the client preface, our
limits, the budgets that bound what a client may make us do, and the mapping between an
HTTP/2 header list and the request path's RequestHead (and a response back).

A stream's request becomes a RequestHead of the shape sidecar/core/http1.py documents
(``http_version="2"``, ``target`` from ``:path``, ``host`` from ``:authority``, no
pseudo-header in ``headers``, ``chunked`` for a body of unknown length), so every layer
reads one shape. The ``h2`` library itself is sidecar/core/http2_server.py's, imported only
when a first HTTP/2 connection arrives.

Pure: no clock reads (``now`` is passed in), no sockets.
"""

from __future__ import annotations

from typing import Any

from .http1 import _HOST, ProtocolError, RequestHead

# The HTTP/2 client connection preface (RFC 9113 §3.4): h2c with prior knowledge.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Our SETTINGS and bounds (docs/limits.md, "HTTP/2").
MAX_CONCURRENT_STREAMS = 100  # advertised; a stream past it is refused (RST_STREAM REFUSED_STREAM)
MAX_HEADER_LIST_SIZE = 64 * 1024  # as HTTP/1.1's head limit (http1.MAX_HEAD_BYTES)
MAX_HEADER_FIELDS = 100  # as HTTP/1.1's (http1.MAX_HEADER_FIELDS)
HEADER_TABLE_SIZE = 4096  # our HPACK decoder's dynamic table
STREAM_WINDOW = 256 * 1024  # request body a stream may send ahead of the upstream's reading
CONNECTION_WINDOW = 1024 * 1024  # request body all of a connection's streams may send ahead
# A header block (HEADERS and its CONTINUATIONs, still compressed) longer than this closes
# the connection before it ends: a CONTINUATION flood is cut at this many bytes.
MAX_HEADER_BLOCK = MAX_HEADER_LIST_SIZE
# Rapid reset (CVE-2023-44487): streams the client resets before their answer, and streams
# refused for exceeding MAX_CONCURRENT_STREAMS, at most this many a window; past it the
# connection gets GOAWAY ENHANCE_YOUR_CALM and closes.
RESET_BUDGET = 200
# SETTINGS, PING, PRIORITY, unknown frames and empty DATA frames: at most this many a window.
CONTROL_BUDGET = 1000
BUDGET_WINDOW = 10.0  # seconds
# Output queued for the client: response DATA is queued only while less than OUTPUT_LOW waits,
# in frames of DATA_FRAME bytes at most, so a queue past MAX_OUTPUT holds answers a client made
# us send (PING, SETTINGS) and does not read: the connection is closed.
OUTPUT_LOW = 256 * 1024
DATA_FRAME = 16 * 1024
MAX_OUTPUT = OUTPUT_LOW + MAX_CONCURRENT_STREAMS * (DATA_FRAME + 9) + 1024 * 1024

# Why an HTTP/2 connection was closed by us (meshlet_http2_connections_closed{reason}).
CLOSE_REASONS = (
    "protocol-error",  # frames or headers h2 refused (GOAWAY PROTOCOL_ERROR and the like)
    "header-too-large",  # a header block past MAX_HEADER_BLOCK (a CONTINUATION flood)
    "rapid-reset",  # RESET_BUDGET spent
    "control-flood",  # CONTROL_BUDGET spent
    "output-unread",  # MAX_OUTPUT queued and not read
)
# Why a stream was reset (meshlet_http2_streams_reset{reason}).
RESET_REASONS = (
    "refused",  # past MAX_CONCURRENT_STREAMS (REFUSED_STREAM)
    "client",  # the client reset it before its answer ended
    "malformed",  # its body's length is not its Content-Length (PROTOCOL_ERROR)
    "timeout",  # its body did not move for the idle timeout (CANCEL)
    "response-cut",  # the upstream's body broke off (INTERNAL_ERROR)
)

# Response fields HTTP/2 forbids (RFC 9113 §8.2.2): never sent to an HTTP/2 client.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_SCHEMES = frozenset((b"http", b"https"))


class Budget:
    """Events counted in fixed windows of ``window`` seconds: ``spend`` is False once more
    than ``limit`` happened in the current window."""

    __slots__ = ("limit", "window", "started", "spent")

    def __init__(self, limit: int, window: float = BUDGET_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.started = float("-inf")
        self.spent = 0

    def spend(self, now: float, count: int = 1) -> bool:
        if now - self.started >= self.window:
            self.started = now
            self.spent = 0
        self.spent += count
        return self.spent <= self.limit


class Http2Counters:
    """One listener kind's HTTP/2 figures, for /metrics."""

    __slots__ = ("connections", "streams", "closed", "resets", "served", "open")

    def __init__(self) -> None:
        self.open: set[Any] = set()  # the connections, to send GOAWAY when the listener drains
        self.connections = 0  # open now
        self.streams = 0  # being handled now
        self.served = 0  # streams handed to the request path, ever
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.resets = dict.fromkeys(RESET_REASONS, 0)


def request_head(fields: list[tuple[bytes, bytes]], end_stream: bool) -> RequestHead:
    """The RequestHead of a stream's request from its decoded header list (``h2`` has
    already checked the pseudo-header rules: the required ones present, before the others,
    none repeated; no connection-specific field, ``te`` only ``trailers``). ProtocolError
    (answered 400) for what the request path cannot take."""
    method = target = scheme = authority = protocol = None
    headers: list[tuple[bytes, bytes]] = []
    hosts: list[bytes] = []
    cookies: list[bytes] = []
    content_length: int | None = None
    if len(fields) > MAX_HEADER_FIELDS + 5:  # + the pseudo-headers
        raise ProtocolError(431, "too many header fields")
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b":scheme":
                scheme = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                protocol = value
            continue
        if name == b"host":
            hosts.append(value)
        elif name == b"cookie":
            cookies.append(value)  # crumbs (RFC 9113 §8.2.3): joined below
            continue
        elif name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise ProtocolError(400, "content-length is not a number")
            if content_length is not None and int(value) != content_length:
                raise ProtocolError(400, "content-length repeated with another value")
            content_length = int(value)
        headers.append((name, value))
    if method == b"CONNECT" or protocol is not None:
        raise ProtocolError(400, "CONNECT (and extended CONNECT) is not supported")
    if method is None or target is None:
        raise ProtocolError(400, "a request needs :method and :path")
    if scheme not in _SCHEMES:
        raise ProtocolError(400, "the :scheme is not http or https")
    if len(hosts) > 1:
        raise ProtocolError(400, "more than one host")
    host = authority if authority is not None else hosts[0] if hosts else None
    if host is None:
        raise ProtocolError(400, "a request needs :authority (or host)")
    if _HOST.fullmatch(host) is None:
        raise ProtocolError(400, "the :authority is not a host[:port]")
    if hosts and authority is not None and hosts[0] != authority:
        raise ProtocolError(400, "the host header disagrees with :authority")
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if not hosts:
        headers.insert(0, (b"host", host))  # an HTTP/1.1 upstream reads it, and so do the layers
    head = RequestHead(method, target, headers, "2", host=host)
    if not end_stream:
        if content_length is None:
            head.chunked = True  # the body ends with the stream
        else:
            head.content_length = content_length
    elif content_length:
        raise ProtocolError(400, "content-length with no body")
    return head


def response_fields(status: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The HEADERS of a response: ``:status`` then the fields, lower-cased, without those
    HTTP/2 forbids (and the framing ones: the stream frames the body)."""
    out = [(b":status", b"%d" % status)]
    for name, value in headers:
        lname = name.lower()
        if lname in CONNECTION_SPECIFIC or lname == b"content-length" and status == 304:
            continue
        out.append((lname, value))
    return out


def trailer_fields(trailers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Trailer fields to send: lower-cased, no pseudo-header and no connection-specific one."""
    return [
        (name.lower(), value)
        for name, value in trailers
        if name[:1] != b":" and name.lower() not in CONNECTION_SPECIFIC
    ]


def raw_parts(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A whole HTTP/1.1 response the mesh made itself (``Response.raw``: an error, a policy's
    answer) as status, fields and body, for an HTTP/2 stream. Our own bytes: well formed."""
    end = raw.index(b"\r\n\r\n")
    lines = raw[:end].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    return status, headers, raw[end + 4 :]


__all__ = [
    "CLOSE_REASONS",
    "CONNECTION_SPECIFIC",
    "PREFACE",
    "RESET_REASONS",
    "Budget",
    "Http2Counters",
    "raw_parts",
    "request_head",
    "response_fields",
    "trailer_fields",
]
