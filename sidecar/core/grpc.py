"""gRPC on the request path (docs/policy.md, "gRPC"). Pure: no clock; durations in, bytes out.

What a gRPC call is (its ``content-type``), its ``grpc-timeout`` read and written
(grpc's PROTOCOL-HTTP2.md: 1 to 8 digits and a unit), ``grpc-message``'s
percent-encoding, the gRPC status the caller gets for each of the mesh's own errors, and
the gRPC status of a response: from its trailers, from its head for a Trailers-Only
response (a failure known before any message), or from an HTTP status other than 200
(the spec's HTTP-to-gRPC mapping, as clients apply it).
"""

from __future__ import annotations

from meshlet.grpc import SERVER_FAULTS, Status
from meshlet.headers import ERROR_HEADER

CONTENT_TYPE = b"application/grpc"
TIMEOUT_HEADER = b"grpc-timeout"
STATUS_HEADER = b"grpc-status"
MESSAGE_HEADER = b"grpc-message"

MAX_DIGITS = 8  # of a grpc-timeout value
_MAX_VALUE = 10**MAX_DIGITS - 1
# The units in nanoseconds, coarsest first.
UNITS = (
    (b"H", 3_600_000_000_000),
    (b"M", 60_000_000_000),
    (b"S", 1_000_000_000),
    (b"m", 1_000_000),
    (b"u", 1_000),
    (b"n", 1),
)
_UNIT_NS = dict(UNITS)
MAX_MESSAGE = 1024  # characters of a grpc-message the mesh writes (its own detail, cut)


def is_grpc(content_type: bytes) -> bool:
    """``application/grpc``, or with a subtype (``application/grpc+proto``) or parameters."""
    value = content_type.lower()
    if not value.startswith(CONTENT_TYPE):
        return False
    rest = value[len(CONTENT_TYPE) :]
    return not rest or rest[:1] in (b"+", b";")


class MalformedTimeout(ValueError):
    pass


def parse_timeout(value: bytes) -> int:
    """A ``grpc-timeout`` value in nanoseconds. Raises MalformedTimeout unless it is 1 to 8
    ASCII digits and one of the units ``H M S m u n``. Zero (not "positive", as the spec
    asks, but what grpc-go sends for a deadline already passed) is read as no time left."""
    digits, unit = value[:-1], value[-1:]
    size = _UNIT_NS.get(unit)
    if size is None or not 1 <= len(digits) <= MAX_DIGITS or not digits.isdigit() or not digits.isascii():
        raise MalformedTimeout(f"malformed grpc-timeout {value[:32]!r}: 1 to 8 digits and a unit (H M S m u n)")
    return int(digits) * size


def format_timeout(nanoseconds: int) -> bytes:
    """The shortest ``grpc-timeout`` that says ``nanoseconds`` exactly within 8 digits;
    when no unit does, the finest one it fits, rounded down (the next hop is never
    promised more time than is left). Zero or less: ``0n``."""
    if nanoseconds <= 0:
        return b"0n"
    for unit, size in UNITS:
        value, rest = divmod(nanoseconds, size)
        if rest == 0 and value <= _MAX_VALUE:
            return b"%d%s" % (value, unit)
    for unit, size in reversed(UNITS):
        value = nanoseconds // size
        if value <= _MAX_VALUE:
            return b"%d%s" % (value, unit)
    return b"%dH" % _MAX_VALUE  # over 11,000 years


def seconds_to_ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


# grpc-message: UTF-8, then every byte outside printable ASCII (0x20-0x7E), and '%', as %XX.
_ENCODED = tuple(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in range(256))
_HEX = frozenset(b"0123456789abcdefABCDEF")


def encode_message(text: str) -> bytes:
    return b"".join([_ENCODED[b] for b in text.encode("utf-8", "replace")])


def decode_message(value: bytes) -> str:
    """The text of a ``grpc-message``. Never fails (as the spec asks): a ``%`` not followed
    by two hex digits stays as it is, bytes that are not UTF-8 become U+FFFD."""
    if b"%" not in value:
        return value.decode("utf-8", "replace")
    out = bytearray()
    i, end = 0, len(value)
    while i < end:
        byte = value[i]
        if byte == 0x25 and i + 2 < end and value[i + 1] in _HEX and value[i + 2] in _HEX:
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return out.decode("utf-8", "replace")


# What a gRPC caller gets for each of the mesh's own errors (sidecar/core/errors.py, by reason).
MESH_ERRORS: dict[str, Status] = {
    "no-route": Status.UNIMPLEMENTED,  # no service by that name: as a server without the method
    "no-healthy-endpoints": Status.UNAVAILABLE,
    "circuit-open": Status.UNAVAILABLE,
    "overloaded": Status.UNAVAILABLE,
    "connect-failed": Status.UNAVAILABLE,
    "upstream-reset": Status.UNAVAILABLE,
    # mTLS to the next sidecar failed, or it proved another identity: this endpoint could not be
    # used safely (another may be), as gRPC clients report a failed TLS handshake.
    "tls-handshake-failed": Status.UNAVAILABLE,
    "peer-identity-mismatch": Status.UNAVAILABLE,
    "upstream-protocol-error": Status.INTERNAL,  # the upstream's bytes were not HTTP (RST_STREAM PROTOCOL_ERROR: INTERNAL)
    "timeout": Status.DEADLINE_EXCEEDED,
    "rate-limited": Status.RESOURCE_EXHAUSTED,
    "forbidden": Status.PERMISSION_DENIED,
    "bad-request": Status.INTERNAL,  # a request we could not read or accept (a malformed grpc-timeout)
    "loop-detected": Status.INTERNAL,  # a configuration fault, never transient
    "internal": Status.INTERNAL,  # a bug of ours
}


def mesh_error_status(reason: str) -> Status:
    return MESH_ERRORS.get(reason, Status.UNKNOWN)


def status_from_http(status: int) -> Status:
    """What a gRPC client makes of an HTTP status other than 200 (grpc's
    http-grpc-status-mapping.md)."""
    return _FROM_HTTP.get(status, Status.UNKNOWN)


_FROM_HTTP = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}


def parse_status(value: bytes) -> int:
    """A ``grpc-status`` value; a number past the 17 known codes is UNKNOWN (as clients read
    it, and so that a label stays bounded); one that is not a number is INTERNAL (grpc-go)."""
    if not value.isdigit() or not value.isascii() or len(value) > 10:
        return Status.INTERNAL
    code = int(value)
    return code if code <= Status.UNAUTHENTICATED else Status.UNKNOWN


def _field(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    size = len(name)
    for key, value in fields:
        if len(key) == size and key.lower() == name:
            return value
    return None


def head_status(http_status: int, headers: list[tuple[bytes, bytes]]) -> int | None:
    """The gRPC status a response's head already tells: an HTTP status other than 200 (the
    mapping), a ``grpc-status`` in the head (a Trailers-Only response), a 200 that is not
    gRPC at all (UNKNOWN). None: a gRPC response whose status will come in its trailers."""
    if http_status != 200:
        return status_from_http(http_status)
    status = _field(headers, STATUS_HEADER)
    if status is not None:
        return parse_status(status)
    content_type = _field(headers, b"content-type")
    if content_type is None or not is_grpc(content_type):
        return Status.UNKNOWN
    return None


def final_status(
    http_status: int,
    headers: list[tuple[bytes, bytes]],
    trailers: list[tuple[bytes, bytes]] | None,
    complete: bool,
) -> int | None:
    """The gRPC status of a whole exchange: its trailers', else its head's; a response that
    ended without one is UNKNOWN (as clients synthesize it). None: it was cut short before
    any status (the caller went away, or the stream broke off): the status is nobody's to
    judge, and the caller sees CANCELLED or the reset."""
    if trailers is not None:
        status = _field(trailers, STATUS_HEADER)
        if status is not None:
            return parse_status(status)
    code = head_status(http_status, headers)
    if code is not None:
        return code
    return Status.UNKNOWN if complete else None


def server_fault(code: int | None) -> bool:
    return code is not None and code in SERVER_FAULTS


def trailers_only(
    status: int, message: str, reason: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> list[tuple[bytes, bytes]]:
    """The headers of a Trailers-Only response for a mesh error: one HEADERS block with
    ``:status 200``, the status, its message and the mesh's reason."""
    return [
        (b"content-type", CONTENT_TYPE),
        (STATUS_HEADER, b"%d" % status),
        (MESSAGE_HEADER, encode_message(message[:MAX_MESSAGE])),
        (ERROR_HEADER, reason.encode("ascii", "replace")),
        *extra,
    ]


def rpc_names(path: bytes) -> tuple[str, str]:
    """``/pkg.Service/Method`` → ("pkg.Service", "Method"); ("", "") for a path of another shape."""
    if path[:1] != b"/":
        return "", ""
    service, slash, method = path[1:].partition(b"/")
    if not slash or not service or not method or b"/" in method:
        return "", ""
    return service.decode("latin-1"), method.decode("latin-1")


class Call:
    """A gRPC call on the request path, made by sidecar/layers/grpc.py (``request.grpc``):
    its deadline, and its status once the exchange is over (for the metrics)."""

    __slots__ = ("deadline", "status")

    def __init__(self, deadline: float | None = None) -> None:
        # From grpc-timeout, on trio's clock; None: the caller sent none (nor is one sent on).
        self.deadline = deadline
        self.status: int | None = None  # set when the exchange is over


__all__ = [
    "CONTENT_TYPE",
    "MAX_MESSAGE",
    "MESH_ERRORS",
    "MESSAGE_HEADER",
    "STATUS_HEADER",
    "TIMEOUT_HEADER",
    "Call",
    "MalformedTimeout",
    "Status",
    "decode_message",
    "encode_message",
    "final_status",
    "format_timeout",
    "head_status",
    "is_grpc",
    "mesh_error_status",
    "parse_status",
    "parse_timeout",
    "rpc_names",
    "seconds_to_ns",
    "server_fault",
    "status_from_http",
    "trailers_only",
]
