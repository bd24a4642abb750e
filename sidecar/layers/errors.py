"""Outermost layer: turns a MeshError into the mesh's own response (docs/reference.md)."""

from __future__ import annotations

import logging

from ..core import errors
from ..core.errors import MeshError
from .base import Handler, Request, Response

log = logging.getLogger("meshlet.errors")


def errors_layer(inner: Handler) -> Handler:
    async def handle(request: Request) -> Response:
        try:
            return await inner(request)
        except MeshError as exc:
            # A request body left unread makes the connection unusable: say so.
            close = request.body is not None
            return Response.mesh(exc.reason, exc.detail, close=close, extra=exc.headers)
        except Exception as exc:  # a bug of ours: answer, log, keep serving others
            log.exception("internal error handling %r", request.head.target)
            return Response.mesh(
                errors.Reason("internal", 500, b"Internal Server Error"), type(exc).__name__, close=True
            )

    return handle
