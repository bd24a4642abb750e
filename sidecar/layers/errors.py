"""Outermost layer: turns a MeshError into the mesh's own response (docs/reference.md);
for a gRPC call, into a gRPC status (sidecar/layers/grpc.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..core import errors
from ..core.errors import MeshError
from .base import Handler, Request, Response
from .grpc import grpc_layer

log = logging.getLogger("meshlet.errors")


def errors_layer(inner: Handler, *, clock: Callable[[], float] = trio.current_time) -> Handler:
    """``clock``: trio's, for a gRPC call's deadline."""
    grpc = grpc_layer(inner, answer, clock)

    async def handle(request: Request) -> Response:
        if request.head.http_version == "2":  # gRPC runs over HTTP/2 only: one comparison for the rest
            return await grpc(request)
        try:
            return await inner(request)
        except Exception as exc:
            return answer(request, exc)

    return handle


def answer(request: Request, exc: Exception) -> Response:
    """The mesh's response to a request that failed with ``exc`` (called in its ``except``)."""
    if isinstance(exc, MeshError):
        # A request body left unread makes the connection unusable: say so.
        close = request.body is not None
        return Response.mesh(exc.reason, exc.detail, close=close, extra=exc.headers)
    # A bug of ours: answer, log, keep serving others.
    log.exception("internal error handling %r", request.head.target)
    return Response.mesh(errors.INTERNAL, type(exc).__name__, close=True)
