"""Which service a request is for (docs/architecture.md), from its target and Host header."""

from __future__ import annotations

from .http1 import RequestHead


class NotRoutable(Exception):
    """The request names no service we can route by; the message says why."""


def split_authority(authority: bytes) -> bytes:
    """``item:8080`` → ``item``; ``[::1]:80`` → ``::1``; lower-cased."""
    authority = authority.strip().lower()
    if authority.startswith(b"["):
        return authority[1 : authority.find(b"]")]
    return authority.rpartition(b":")[0] if b":" in authority else authority


def destination(head: RequestHead) -> tuple[str, bytes, bytes]:
    """(service, origin-form target, Host to send) for an outbound request.

    Absolute-form (``GET http://item/x``, what HTTP_PROXY clients send) wins over the
    Host header, as RFC 9112 §3.2.2 requires of a proxy.
    """
    target = head.target
    if target[:7].lower() == b"http://":
        rest = target[7:]
        cut = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if i != -1 and i < cut:
                cut = i
        authority, path = rest[:cut], rest[cut:]
        if not authority:
            raise NotRoutable("absolute-form target without a host")
        if not path.startswith(b"/"):
            path = b"/" + path
        return split_authority(authority).decode("ascii", "replace"), path, authority
    if target[:8].lower() == b"https://":
        raise NotRoutable("https:// targets are not proxied; send plain http:// to the sidecar")
    if head.host is None:
        raise NotRoutable("no Host header to name the destination service")
    return split_authority(head.host).decode("ascii", "replace"), target, head.host
