"""Records every exchange once, when it ends: count, duration, status, mesh reason, the
route rule that matched (``ROUTE/RULE``; empty when none did, and on the inbound side),
the gRPC status of a gRPC call (sidecar/layers/grpc.py sets it, inside, as the exchange
ends), and the body bytes each way (the downstream loop counts them)."""

from __future__ import annotations

from time import perf_counter

from meshlet.grpc import LABELS as GRPC_LABELS

from ..telemetry import Telemetry
from .base import Handler, Request, Response


def metrics_layer(inner: Handler, telemetry: Telemetry, direction: str, local_service: str) -> Handler:
    inflight = telemetry.inflight
    finished = telemetry.request_finished
    outbound = direction == "outbound"
    inflight.setdefault(direction, 0)

    async def handle(request: Request) -> Response:
        start = perf_counter()
        body = request.body  # the caller's body as read off the socket (layers may wrap request.body)
        inflight[direction] += 1
        try:
            response = await inner(request)
        except BaseException:
            inflight[direction] -= 1
            raise
        if outbound:
            source, destination = local_service, request.service or "unknown"
        else:
            source, destination = request.source, local_service
        inner_finish = response.on_finish
        status = response.status
        reason = response.mesh_error
        rule = request.rule
        route = rule.ref if rule is not None else ""
        call = request.grpc

        def finish(complete: bool) -> None:
            inflight[direction] -= 1
            if inner_finish is not None:
                inner_finish(complete)
            why = reason or ("" if complete else "incomplete")
            # A gRPC call cut short before any status: CANCELLED, what its caller sees.
            grpc = "" if call is None else GRPC_LABELS[1 if call.status is None else call.status]
            finished(
                direction,
                source,
                destination,
                route,
                status,
                why,
                perf_counter() - start,
                getattr(body, "received", 0),
                response.body_bytes,
                grpc,
            )

        response.on_finish = finish
        return response

    return handle
