"""A span per hop and side (docs/tracing.md), and the trace headers that tie them together.

* Inbound (:func:`server_tracing`, outside the errors layer so the mesh's own answers are
  recorded too): the caller's context is read from the request (W3C or B3,
  sidecar/core/tracecontext.py), this hop's SERVER span is its child, and the app gets
  the headers of the SERVER span, so the calls it makes (when it passes the headers on,
  as with Envoy) are its children.
* Outbound (:func:`client_tracing`, inside the resilience layer, so once per attempt):
  the app's context is read once, on the first attempt; each attempt is a CLIENT span,
  its child, whose id goes to the next hop as the parent. A retry is one more CLIENT
  span, tagged with its attempt number.

With no incoming context the sidecar starts a trace and decides sampling (``sample_rate``),
unless it has nowhere to send spans (no control plane, no collector: ``recording`` is
off), then it starts none; a context that came in always goes on, with a new span id,
and its decision is kept. Only sampled spans are recorded and exported.

A context that came in *not sampled* goes on untouched: no span of it is recorded anywhere,
so which span is the parent does not matter, and the trace id and the decision are what
the next hops need (W3C lets a hop that does not record pass ``traceparent`` unchanged:
"MAY mutate"). That keeps an unsampled request, 99 in 100 at the sampling rate
recommended in production, to one header scan per sidecar, instead of reading,
stripping and writing five headers again at every hop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from ..core import tracecontext
from ..core.grpc import Call as GrpcCall
from ..core.grpc import final_status, mesh_error_status
from ..core.spans import CLIENT, SERVER, Endpoint, Span, http_span, rpc_tags
from ..core.tracecontext import TraceContext
from .base import Handler, Request, Response


class Tracer:
    """This sidecar's tracing settings and where finished spans go."""

    def __init__(
        self,
        service: str,
        local: Endpoint,
        export: Callable[[Span], None],
        *,
        sample_rate: float = 1.0,
        formats: Iterable[str] = tracecontext.DEFAULT_FORMATS,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        recording: bool = True,
    ) -> None:
        # False: no collector to send spans to; the headers still go on, nothing is recorded.
        self.recording = recording
        self.service = service
        self.local = local
        self.export = export
        self.sample_rate = sample_rate
        self.formats = tuple(formats)
        self.rng = rng or random.Random()
        self.wall = wall
        self.timer = timer
        self._endpoints: dict[tuple[str, str, int], Endpoint] = {}  # the peers spans name, made once

    def peer(self, service: str, host: str = "", port: int = 0) -> Endpoint:
        """The remote endpoint of a span: one object per peer (service, address)."""
        key = (service, host, port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= 4096:  # bounded: the source name comes from the caller
                self._endpoints.clear()
            endpoint = self._endpoints[key] = Endpoint(service, host, port)
        return endpoint

    def leaves_alone(self, parent: TraceContext | None) -> bool:
        """Whether a request with this incoming context goes on untouched: no context and
        nowhere to send spans (no trace is started), or a context not sampled (passed on as
        it came; see the module docstring)."""
        if parent is None:
            return not self.recording
        return parent.sampled is False and not parent.debug

    def begin(self, request: Request, parent: TraceContext | None) -> TraceContext:
        """This hop's context: the child of ``parent``; its headers replace the request's."""
        context = tracecontext.child(parent, self.rng, self.sample_rate)
        headers = request.head.headers
        tracecontext.strip(headers)
        headers.extend(tracecontext.inject(context, self.formats))
        return context

    def span(self, context: TraceContext, kind: str, request: Request, remote: Endpoint | None) -> Span:
        return http_span(
            context.trace_id,
            context.span_id,
            context.parent_id or None,
            kind,
            request.head.method,
            request.target,
            self.local,
            remote,
            int(self.wall() * 1_000_000),
            context.debug,
        )

    def record(
        self, span: Span, response: Response, started: float, attempt: int = 0, grpc: GrpcCall | None = None
    ) -> None:
        """Finish ``span`` when ``response`` has gone through (or failed), then export it.
        ``grpc``: the request is a gRPC call, whose status the span tells too."""
        inner = response.on_finish
        timer, export = self.timer, self.export

        def finished(complete: bool) -> None:
            if inner is not None:
                inner(complete)
            span.finish(int((timer() - started) * 1_000_000), response.status, response.mesh_error, attempt)
            if not complete:  # cut short, or an attempt given up for a retry
                span.tags["meshlet.complete"] = "false"
            if grpc is not None:
                status = final_status(response.status, response.headers, response.trailers, complete)
                rpc_tags(span.tags, span_path(span), status)
            export(span)

        response.on_finish = finished


def server_tracing(inner: Handler, tracer: Tracer) -> Handler:
    async def handle(request: Request) -> Response:
        parent = tracecontext.extract(request.head.headers)
        if tracer.leaves_alone(parent):
            return await inner(request)
        context = tracer.begin(request, parent)
        if not context.sampled or not tracer.recording:
            return await inner(request)
        started = tracer.timer()
        span = tracer.span(context, SERVER, request, None)
        response = await inner(request)
        span.remote = tracer.peer(request.source)  # known once the inbound filters read the caller
        if request.source != "unknown":
            span.tags["meshlet.peer"] = request.source
        tracer.record(span, response, started, grpc=request.grpc)  # the gRPC layer, inside, has read it
        return response

    return handle


def client_tracing(inner: Handler, tracer: Tracer) -> Handler:
    async def handle(request: Request) -> Response:
        if request.attempt <= 1:  # the app's context; later attempts reuse it (our own headers replaced it)
            request.trace = tracecontext.extract(request.head.headers)
        parent = request.trace
        if tracer.leaves_alone(parent):
            return await inner(request)
        context = tracer.begin(request, parent)
        if not context.sampled or not tracer.recording:
            return await inner(request)
        started = tracer.timer()
        endpoint = request.endpoint
        remote = tracer.peer(request.service, endpoint.host, endpoint.port) if endpoint is not None else None
        span = tracer.span(context, CLIENT, request, remote)
        try:
            response = await inner(request)
        except Exception as exc:  # a mesh error of this attempt (connect failure, reset, timeout)
            reason = getattr(getattr(exc, "reason", None), "name", type(exc).__name__)
            status = getattr(getattr(exc, "reason", None), "status", 0)
            span.finish(int((tracer.timer() - started) * 1_000_000), status, reason, request.attempt)
            if request.grpc is not None:  # the caller will see the status its mesh error stands for
                rpc_tags(span.tags, span_path(span), mesh_error_status(reason))
            tracer.export(span)
            raise
        tracer.record(span, response, started, request.attempt, request.grpc)
        return response

    return handle


def span_path(span: Span) -> bytes:
    return span.tags.get("http.path", "").encode("latin-1")


__all__ = ["Tracer", "client_tracing", "server_tracing"]
