"""Inbound: every request goes to the local app, whatever its Host says."""

from __future__ import annotations

from ..core.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Endpoint
from .base import Filter, Request

# Set by the calling sidecar so the receiving one can label its metrics by caller.
# Not an identity: mTLS (PRODUCT §12) will provide a verified one.
SOURCE_HEADER = b"x-meshlet-source"


def to_local_app(
    app: Endpoint,
    local_service: str,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> Filter:
    """Inbound: the destination is always the local app; the caller is named by the
    calling sidecar's source header (consumed here, the app never sees it)."""

    def handle(request: Request) -> None:
        request.service = local_service
        request.endpoint = app
        request.connect_timeout = connect_timeout
        request.timeout = timeout
        headers = request.head.headers
        for i, (name, value) in enumerate(headers):
            if len(name) == 16 and name.lower() == SOURCE_HEADER:
                request.source = value.decode("ascii", "replace")
                del headers[i]
                break

    return handle


def source_header(local_service: str) -> Filter:
    """Outbound: tell the next sidecar which service is calling."""
    value = local_service.encode()

    def handle(request: Request) -> None:
        request.head.headers.append((SOURCE_HEADER, value))

    return handle
