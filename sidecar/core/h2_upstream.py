"""HTTP/2 towards an upstream, the pure part: which version a request goes upstream in, the
HEADERS a request becomes, and the response head its HEADERS make. No I/O, no h2.

Which version (:func:`upstream_version`):

* to another sidecar (``Endpoint.mtls``), the version the request came in: an HTTP/2
  request's stream rides a pooled HTTP/2 connection (ALPN ``h2`` over mTLS, h2c when the
  destination's mTLS mode is off), an HTTP/1.1 request stays HTTP/1.1 (cheaper in Python,
  and its pool already spreads requests over connections); the next sidecar speaks to its
  app in whatever the app declared;
* to an app or a static endpoint, what it declared: ``http2`` and ``grpc`` get HTTP/2 (h2c,
  prior knowledge), ``http1`` gets HTTP/1.1 (an HTTP/2 request is translated, its body of
  unknown length sent chunked); undeclared (``""``), the version the request came in.
"""

from __future__ import annotations

from .http1 import MAX_HEAD_BYTES, MAX_HEADER_FIELDS, reason_phrase

HTTP2_PROTOCOLS = frozenset(("http2", "grpc"))

# Fields that describe one connection: never sent in HTTP/2 (RFC 9113 §8.2.2), nor Host,
# which :authority replaces. ``te`` goes only as ``te: trailers``.
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host", b"te")
)


def upstream_version(http_version: str, protocol: str, sidecar: bool) -> str:
    """ "2" or "1.1": the version a request that came in ``http_version`` goes upstream in,
    to an endpoint that declared ``protocol`` ("" if it did not) and is a sidecar or not."""
    if sidecar or not protocol:
        return "2" if http_version == "2" else "1.1"
    return "2" if protocol in HTTP2_PROTOCOLS else "1.1"


def request_fields(
    method: bytes,
    authority: bytes,
    path: bytes,
    forwarded: list[tuple[bytes, bytes]],
    original: list[tuple[bytes, bytes]],
    content_length: int | None,
) -> list[tuple[bytes, bytes]]:
    """The HEADERS of a request: the pseudo-fields, then ``forwarded`` (the end-to-end fields
    and the forwarding ones, as sidecar/core/headers.py builds them for HTTP/1.1) lower-cased
    and without the connection-specific ones, ``te: trailers`` if the caller sent ``te``
    naming ``trailers`` (in ``original``: the forwarding rules drop ``te``, a hop-by-hop
    field, and gRPC needs it), and the content length when it is known."""
    fields = [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path)]
    for name, value in forwarded:
        lname = name.lower()
        if lname not in _CONNECTION_SPECIFIC:
            fields.append((lname, value))
    for name, value in original:
        if name.lower() == b"te" and b"trailers" in (t.strip().lower() for t in value.split(b",")):
            fields.append((b"te", b"trailers"))
            break
    if content_length is not None:
        fields.append((b"content-length", b"%d" % content_length))
    return fields


class ResponseFieldsError(Exception):
    """A response's HEADERS this side does not pass on (the upstream's fault)."""


class H2ResponseHead:
    """A response's head from its HEADERS: status, the fields without pseudo-fields and the
    content length, if any (h2 checks that the body then has that length)."""

    __slots__ = ("status", "reason", "headers", "content_length")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        status = None
        headers: list[tuple[bytes, bytes]] = []
        content_length = None
        size = 0
        for name, value in fields:
            size += len(name) + len(value) + 32  # RFC 9113 §6.5.2's measure
            if name == b":status":
                status = value
            elif name[:1] == b":":
                raise ResponseFieldsError(f"pseudo-header {name.decode('ascii', 'replace')} in a response")
            else:
                if name == b"content-length":
                    content_length = _length(value)
                headers.append((name, value))
        if len(headers) > MAX_HEADER_FIELDS:
            raise ResponseFieldsError(f"more than {MAX_HEADER_FIELDS} header fields")
        if size > MAX_HEAD_BYTES:
            raise ResponseFieldsError(f"header fields above {MAX_HEAD_BYTES} bytes")
        if status is None or len(status) != 3 or not status.isdigit():
            raise ResponseFieldsError("no valid :status")
        self.status = int(status)
        self.reason = reason_phrase(self.status)
        self.headers = headers
        self.content_length = content_length


def _length(value: bytes) -> int:
    if not value.isdigit() or len(value) > 18:
        raise ResponseFieldsError("content-length is not a number")
    return int(value)


def trailer_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The trailing HEADERS as trailer fields; pseudo-fields are refused (h2 checks the
    rest: lower-case names, no connection-specific field)."""
    if len(fields) > MAX_HEADER_FIELDS:
        raise ResponseFieldsError(f"more than {MAX_HEADER_FIELDS} trailer fields")
    for name, _ in fields:
        if name[:1] == b":":
            raise ResponseFieldsError("a pseudo-header in trailers")
    return fields
