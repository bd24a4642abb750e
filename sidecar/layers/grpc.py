"""gRPC calls on the request path (docs/policy.md, "gRPC"), where the errors layer sits in
both stacks (sidecar/layers/errors.py hands it the HTTP/2 requests: gRPC runs over
nothing else).

A request is a gRPC call when its ``content-type`` is ``application/grpc`` (sidecar/core/grpc.py).
For such a call:

* its ``grpc-timeout`` becomes its deadline (``request.grpc``, a :class:`~sidecar.core.grpc.Call`,
  on trio's clock): the attempts (sidecar/layers/attempts.py) and the inbound side
  (sidecar/layers/inbound.py) keep within it (:func:`cap`), and pass it on reduced by
  the time spent here, rewritten just before each attempt leaves (:func:`pass_on`). A
  malformed one is refused (INTERNAL, as grpc-go's servers answer it);
* the mesh's own errors reach the caller as a gRPC status: a Trailers-Only response
  (``:status 200``, ``grpc-status``, ``grpc-message``, ``x-meshlet-error`` kept), a
  structured :class:`~sidecar.layers.base.Response` with no body, which the HTTP/2
  writer sends as one HEADERS frame with END_STREAM;
* when the exchange is over, its gRPC status is known (``call.status``) to the metrics
  layer outside.

Any other request is answered as the errors layer answers it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..core import errors
from ..core.errors import MeshError
from ..core.grpc import (
    TIMEOUT_HEADER,
    Call,
    MalformedTimeout,
    Status,
    final_status,
    format_timeout,
    is_grpc,
    mesh_error_status,
    parse_timeout,
    seconds_to_ns,
    trailers_only,
)
from .base import Handler, Request, Response

log = logging.getLogger("meshlet.grpc")

# How the errors layer answers a failure of a request that is not a gRPC call.
Answer = Callable[[Request, Exception], Response]


def grpc_layer(inner: Handler, answer: Answer, clock: Callable[[], float] = trio.current_time) -> Handler:
    """``answer``: the errors layer's answer to a failure, for requests that are not gRPC
    calls. ``clock``: trio's (the deadline is the caller's, to the microsecond)."""

    async def handle(request: Request) -> Response:
        try:
            call = read_call(request.head.headers, clock())
        except MeshError as exc:  # a gRPC call with a malformed grpc-timeout
            request.grpc = call = Call()
            return mesh_response(call, exc, 0.0)
        if call is None:
            try:
                return await inner(request)
            except Exception as exc:
                return answer(request, exc)
        request.grpc = call
        try:
            response = await inner(request)
        except MeshError as exc:
            return mesh_response(call, exc, clock())
        except Exception as exc:  # a bug of ours: answer, log, keep serving others
            log.exception("internal error handling the gRPC call %r", request.head.target[:200])
            return mesh_response(call, MeshError(errors.INTERNAL, type(exc).__name__), clock())
        finish = response.on_finish

        def finished(complete: bool) -> None:
            if finish is not None:
                finish(complete)
            call.status = final_status(response.status, response.headers, response.trailers, complete)

        response.on_finish = finished
        return response

    return handle


def read_call(headers: list[tuple[bytes, bytes]], now: float) -> Call | None:
    """The gRPC call a request is; None if it is none. Raises MeshError (bad-request) for a
    gRPC call whose ``grpc-timeout`` is malformed or repeated (which one would count?)."""
    content_type: bytes | None = None
    timeout: bytes | None = None
    repeated = False
    for name, value in headers:
        if len(name) == 12:  # both names are 12 long: one length check passes over the rest
            lowered = name.lower()
            if lowered == b"content-type":
                if content_type is None:
                    content_type = value
            elif lowered == TIMEOUT_HEADER:
                repeated = timeout is not None
                timeout = value
    if content_type is None or not is_grpc(content_type):
        return None
    if timeout is None:
        return Call()
    if repeated:
        raise MeshError(errors.BAD_REQUEST, "more than one grpc-timeout")
    try:
        nanoseconds = parse_timeout(timeout)
    except MalformedTimeout as exc:
        raise MeshError(errors.BAD_REQUEST, str(exc)) from None
    return Call(now + nanoseconds / 1e9)


def mesh_response(call: Call, error: MeshError, now: float) -> Response:
    """The Trailers-Only answer to a gRPC call that the mesh failed: HTTP 200, the gRPC
    status for the mesh's reason, its detail as the message, ``x-meshlet-error`` and any
    header the error carries (a request id, Retry-After). Once the call's deadline has
    passed, whatever failed, the status is DEADLINE_EXCEEDED (an upstream that gave up on
    the same deadline resets its stream: gRPC asks clients to report that so too)."""
    reason = error.reason.name
    status = mesh_error_status(reason)
    if call.deadline is not None and now >= call.deadline:
        status = Status.DEADLINE_EXCEEDED
    response = Response(200, b"OK", trailers_only(status, error.detail, reason, error.headers))
    response.mesh_error = reason
    call.status = status
    return response


def cap(call: Call, timeout: float) -> float:
    """``timeout`` (seconds), or less if the call's deadline leaves less. MeshError
    (timeout: DEADLINE_EXCEEDED) when it has passed already: nothing is sent."""
    deadline = call.deadline
    if deadline is None:
        return timeout
    left = deadline - trio.current_time()
    if left <= 0:
        raise MeshError(errors.TIMEOUT, "the call's grpc-timeout passed before it could be sent")
    return left if left < timeout else timeout


def pass_on(call: Call, headers: list[tuple[bytes, bytes]], timeout: float) -> None:
    """Rewrite the call's ``grpc-timeout`` as it leaves: the time its deadline leaves now,
    at most ``timeout`` (the attempt's own: a per-try timeout may be shorter, as Envoy
    does). In place: gRPC asks for it right after the pseudo-headers."""
    deadline = call.deadline
    if deadline is None:
        return
    left = deadline - trio.current_time()
    value = format_timeout(seconds_to_ns(left if left < timeout else timeout))
    for i, (name, _) in enumerate(headers):
        if len(name) == 12 and name.lower() == TIMEOUT_HEADER:
            headers[i] = (TIMEOUT_HEADER, value)
            return
    headers.append((TIMEOUT_HEADER, value))


__all__ = ["cap", "grpc_layer", "mesh_response", "pass_on", "read_call"]
