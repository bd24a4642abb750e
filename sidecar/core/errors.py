"""Responses the mesh makes itself (the table in docs/reference.md): a reason, its status, a short text body.

Every such response carries ``x-meshlet-error: <reason>`` so a caller can tell a mesh
failure from the app's own answer, which passes through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlet.headers import ERROR_HEADER

from .http1 import serialize_response_head


@dataclass(frozen=True, slots=True)
class Reason:
    name: str
    status: int
    phrase: bytes


NO_ROUTE = Reason("no-route", 404, b"Not Found")
NO_HEALTHY_ENDPOINTS = Reason("no-healthy-endpoints", 503, b"Service Unavailable")
CIRCUIT_OPEN = Reason("circuit-open", 503, b"Service Unavailable")
OVERLOADED = Reason("overloaded", 503, b"Service Unavailable")
RATE_LIMITED = Reason("rate-limited", 429, b"Too Many Requests")
CONNECT_FAILED = Reason("connect-failed", 503, b"Service Unavailable")
UPSTREAM_RESET = Reason("upstream-reset", 502, b"Bad Gateway")
# A reason of its own, not upstream-reset: an upstream that answers with bytes that are not
# HTTP/1.1 did not reset; calling it so would send operators to the wrong place.
UPSTREAM_PROTOCOL_ERROR = Reason("upstream-protocol-error", 502, b"Bad Gateway")
TIMEOUT = Reason("timeout", 504, b"Gateway Timeout")
# mTLS to the next sidecar: the handshake failed (its certificate is not trusted, ours was
# refused, it does not speak TLS, it took too long), or the endpoint proved an identity other
# than the destination service's. Never a silent success: the request was not sent.
TLS_HANDSHAKE_FAILED = Reason("tls-handshake-failed", 502, b"Bad Gateway")
PEER_IDENTITY_MISMATCH = Reason("peer-identity-mismatch", 502, b"Bad Gateway")
# In transparent mode, a request the sidecar sent came back to it
# (the iptables rules do not exempt its own traffic); RFC 5842's status for a loop.
LOOP_DETECTED = Reason("loop-detected", 508, b"Loop Detected")
FORBIDDEN = Reason("forbidden", 403, b"Forbidden")
INTERNAL = Reason("internal", 500, b"Internal Server Error")  # a bug of ours
BAD_REQUEST = Reason("bad-request", 400, b"Bad Request")
HEADERS_TOO_LARGE = Reason("bad-request", 431, b"Request Header Fields Too Large")
URI_TOO_LONG = Reason("bad-request", 414, b"URI Too Long")
VERSION_NOT_SUPPORTED = Reason("bad-request", 505, b"HTTP Version Not Supported")
# The client stopped sending its request (head or body) before the deadline: its fault.
REQUEST_TIMEOUT = Reason("bad-request", 408, b"Request Timeout")

# What the downstream loop answers for a request it cannot read, by status.
REJECTIONS = {
    reason.status: reason
    for reason in (BAD_REQUEST, HEADERS_TOO_LARGE, URI_TOO_LONG, REQUEST_TIMEOUT, VERSION_NOT_SUPPORTED)
}


class MeshError(Exception):
    """A failure the request path turns into a mesh response (never an app's)."""

    def __init__(
        self, reason: Reason, detail: str = "", *, cause: str = "", headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(detail or reason.name)
        self.reason = reason
        self.detail = detail or reason.name
        self.cause = cause  # finer than the reason where retries care: "refused" (a connect failure)
        self.headers = headers  # more for the response (a 429's Retry-After)


def error_response(
    reason: Reason, detail: str, *, close: bool = False, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """The whole response (head and body) for a mesh-made error."""
    body = f"{reason.name}: {detail}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (ERROR_HEADER, reason.name.encode()),
        *extra,
    ]
    if close:
        headers.append((b"connection", b"close"))
    return serialize_response_head(reason.status, reason.phrase, headers) + body


def policy_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A whole response a Route rule makes (a redirect, a direct response, an injected
    fault): the policy's answer, so no ``x-meshlet-error``."""
    from .http1 import reason_phrase

    head = [*headers, (b"content-length", b"%d" % len(body))]
    if not any(k.lower() == b"content-type" for k, _ in headers) and body:
        head.append((b"content-type", b"text/plain; charset=utf-8"))
    return serialize_response_head(status, reason_phrase(status), head) + body
