"""The request path's one seam: a Handler takes a Request and returns a Response.

Layers wrap a Handler and are themselves Handlers, composed once per config snapshot by
the sidecar's composition root into an outbound and an inbound stack (their order is in
docs/architecture.md, "How a request flows"). A Response's body is pulled by the
downstream loop; ``finish`` is called exactly once when the exchange is over, with
whether the body went through whole, so the pool can keep or drop the connection and
metrics can record the outcome once.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeAlias

import trio

from meshlet.routes import CompiledRule

from ..core.errors import Reason, error_response
from ..core.grpc import Call as GrpcCall
from ..core.http1 import RequestHead
from ..core.services import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Endpoint
from ..core.tracecontext import TraceContext


class _WouldBlock(enum.Enum):
    # A one-member enum rather than a bare object(), so that a type checker narrows
    # ``piece is WOULD_BLOCK``.
    WOULD_BLOCK = "WOULD_BLOCK"

    def __repr__(self) -> str:
        return "WOULD_BLOCK"


WOULD_BLOCK: Final = _WouldBlock.WOULD_BLOCK
# What BodySource.read_nowait returns: a piece of body, None at its end, or WOULD_BLOCK.
BodyPiece: TypeAlias = bytes | None | _WouldBlock


class BodySource(Protocol):
    async def read(self) -> bytes | None:
        """The next piece of body, or None at its end."""

    def read_nowait(self) -> BodyPiece:
        """What ``read`` would return if it needs no network, else WOULD_BLOCK.
        Synchronous: the downstream loop drains what is buffered without a coroutine
        per piece, and sends it in one ``send_all``."""


class Request:
    __slots__ = (
        "head",
        "body",
        "peer_ip",
        "service",
        "target",
        "authority",
        "nursery",
        "source",
        "endpoint",
        "connect_timeout",
        "timeout",
        "direction",
        "rule",
        "subset",
        "deadline",
        "attempt",
        "trace",
        "grpc",
    )

    def __init__(self, head: RequestHead, body: BodySource | None, peer_ip: bytes) -> None:
        self.head = head
        self.body = body
        self.peer_ip = peer_ip
        self.service = ""  # destination service, once known
        self.target = head.target  # origin-form target to send upstream
        self.authority: bytes | None = head.host
        self.source = "unknown"  # calling service, where known
        # A nursery for work that outlives the handler call (the request-body pump);
        # set by the downstream loop only for requests that have a body.
        self.nursery: trio.Nursery | None = None
        self.endpoint: Endpoint | None = None  # chosen by the balancer
        self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self.timeout = DEFAULT_REQUEST_TIMEOUT
        self.direction = "outbound"
        self.rule: CompiledRule | None = None  # the Route rule that matched (meshlet/routes.py), if any
        self.subset: tuple[tuple[str, str], ...] = ()  # labels the endpoint must carry (a rule's subset)
        self.deadline = 0.0  # when the whole exchange must be over (trio clock); 0: request.timeout from now
        self.attempt = 0  # which attempt the resilience layer is making (1, 2, ...)
        self.trace: TraceContext | None = None  # the caller's, read on the first attempt (layers/tracing.py)
        self.grpc: GrpcCall | None = None  # a gRPC call: its deadline and status (layers/grpc.py)


class Response:
    __slots__ = (
        "status",
        "reason",
        "headers",
        "body",
        "framing",
        "content_length",
        "keep_alive",
        "mesh_error",
        "upgrade",
        "on_finish",
        "raw",
        "body_bytes",
        "trailers",
    )

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # already end-to-end: the downstream loop adds framing
        self.body: BodySource | None = None
        # "length" (content_length bytes), "chunked" (length unknown), "none" (no body)
        self.framing = "none"
        self.content_length: int | None = None
        self.keep_alive = True  # False: close the downstream connection after this one
        self.mesh_error = ""  # the x-meshlet-error reason when the mesh made it
        self.upgrade: Tunnel | None = None  # a tunnel to splice after a 101 (see net/upstream.py)
        self.on_finish: Callable[[bool], None] | None = None
        self.raw: bytes | None = None  # a whole pre-serialized response (mesh errors)
        self.body_bytes = 0  # body bytes sent to the caller, set by the downstream loop before finish
        # Trailer fields (HTTP/2, gRPC's grpc-status): set by the upstream side once the body
        # has ended, read by the downstream side after the body's last piece; None: none came.
        self.trailers: list[tuple[bytes, bytes]] | None = None

    def finish(self, complete: bool) -> None:
        callback, self.on_finish = self.on_finish, None
        if callback is not None:
            callback(complete)

    @classmethod
    def mesh(
        cls, reason: Reason, detail: str, *, close: bool = False, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> Response:
        response = cls(reason.status, reason.phrase, [])
        response.raw = error_response(reason, detail, close=close, extra=extra)
        response.mesh_error = reason.name
        response.keep_alive = not close
        return response


class Tunnel(Protocol):
    """The upstream side of an upgraded connection (after 101): raw bytes both ways."""

    first_bytes: bytes

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self) -> bytes: ...

    def close(self) -> None: ...


Handler = Callable[[Request], Awaitable[Response]]

# A synchronous step before the handler (routing, header rules): it edits the request
# or raises MeshError. Filters run in one coroutine frame, not one per step: on this
# hot path every coroutine level costs a little on each suspension and resumption.
Filter = Callable[[Request], None]


def filters_layer(inner: Handler, *filters: Filter) -> Handler:
    """Runs ``filters`` in order, then ``inner``."""
    if len(filters) == 1:
        (only,) = filters

        async def handle_one(request: Request) -> Response:
            only(request)
            return await inner(request)

        return handle_one

    async def handle(request: Request) -> Response:
        for step in filters:
            step(request)
        return await inner(request)

    return handle
