"""Inbound: every request goes to the local app, whatever its Host says."""

from __future__ import annotations

from ..core.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Endpoint
from .base import Handler, Request, Response

# Set by the calling sidecar so the receiving one can label its metrics by caller.
# Not an identity: mTLS (PRODUCT §12) will provide a verified one.
SOURCE_HEADER = b"x-meshlet-source"


def local_app_layer(
    inner: Handler,
    app: Endpoint,
    local_service: str,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> Handler:
    async def handle(request: Request) -> Response:
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
        return await inner(request)

    return handle


def source_header_layer(inner: Handler, local_service: str) -> Handler:
    """Outbound: tell the next sidecar which service is calling."""
    value = local_service.encode()

    async def handle(request: Request) -> Response:
        request.head.headers.append((SOURCE_HEADER, value))
        return await inner(request)

    return handle
