"""Zipkin's v2 HTTP API on the embedded trace store (control_plane/traces.py), so sidecars,
`meshlet trace`, the dashboard, a Zipkin UI or Jaeger need nothing else (docs/tracing.md).

* ``POST /api/v2/spans``: a JSON list of v2 spans → 202. Only with a token
  (``Authorization: Bearer``): a sidecar's span token, which writes the spans of its own
  service only (the others in its batch are dropped and counted), or the API's write token,
  which writes any (control_plane/span_tokens.py); without one, 401 before the body is read.
  A batch with a malformed span is refused whole (400, saying which span and why): nothing
  half-stored. The body is limited to :data:`MAX_BODY` (5 MiB), counted while it is read: a
  larger one gets 413 before it is buffered.
* ``GET /api/v2/services``, ``/api/v2/spans?serviceName=``, ``/api/v2/traces`` (serviceName,
  spanName, minDuration, maxDuration, endTs, lookback, limit), ``/api/v2/trace/{traceId}``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .bodies import read_body
from .span_tokens import SpanTokens
from .traces import TraceStore

MAX_BODY = 5 * 1024 * 1024
_HEX_TRACE = re.compile(r"[0-9a-fA-F]{16}(?:[0-9a-fA-F]{16})?")
_HEX_SPAN = re.compile(r"[0-9a-fA-F]{16}")
KINDS = ("CLIENT", "SERVER", "PRODUCER", "CONSUMER")


def check_span(span: Any) -> str:
    """What is wrong with one v2 span ("" if nothing): the fields the store relies on."""
    if not isinstance(span, dict):
        return "must be an object"
    if not isinstance(span.get("traceId"), str) or not _HEX_TRACE.fullmatch(span["traceId"]):
        return "traceId must be 16 or 32 hex characters"
    if not isinstance(span.get("id"), str) or not _HEX_SPAN.fullmatch(span["id"]):
        return "id must be 16 hex characters"
    parent = span.get("parentId")
    if parent is not None and (not isinstance(parent, str) or not _HEX_SPAN.fullmatch(parent)):
        return "parentId must be 16 hex characters"
    if span.get("kind") is not None and span["kind"] not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}"
    for name in ("timestamp", "duration"):
        value = span.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"{name} must be a whole number of microseconds"
    for name in ("localEndpoint", "remoteEndpoint"):
        value = span.get(name)
        if value is not None and (not isinstance(value, dict) or not isinstance(value.get("serviceName", ""), str)):
            return f"{name} must be an object with a string serviceName"
    tags = span.get("tags")
    if tags is not None and (not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values())):
        return "tags must map names to strings"
    return ""


def _lower(span: dict[str, Any]) -> dict[str, Any]:
    out = {**span, "traceId": span["traceId"].lower(), "id": span["id"].lower()}
    if span.get("parentId"):
        out["parentId"] = span["parentId"].lower()
    return out


UNAUTHORIZED = (
    "posting spans needs a token (Authorization: Bearer ...): a sidecar's span token (its control "
    "plane gives it one per session), or the control plane's API token (file api-token in its data directory)"
)


def zipkin_routes(store: TraceStore, tokens: SpanTokens, api_token: str | None) -> list[Route]:
    """``tokens``: the sessions' span tokens; ``api_token``: the API's write token, which may
    post any service's spans (None: only span tokens may post)."""

    async def post_spans(request: Request) -> Response:
        now = trio.current_time()
        writer = tokens.writer(request.headers.get("authorization", ""), api_token, now)
        if writer is None:
            return JSONResponse({"problems": [UNAUTHORIZED]}, status_code=401)
        body = await read_body(request, MAX_BODY)
        if isinstance(body, Response):
            return body
        try:
            spans = json.loads(body)
        except ValueError:
            return JSONResponse({"problems": ["the body must be a JSON list of spans"]}, status_code=400)
        if not isinstance(spans, list):
            return JSONResponse({"problems": ["the body must be a JSON list of spans"]}, status_code=400)
        problems = [f"spans[{i}]: {why}" for i, span in enumerate(spans) if (why := check_span(span))]
        if problems:
            return JSONResponse({"problems": problems[:20]}, status_code=400)
        store.add([_lower(span) for span in tokens.keep(spans, writer, now)], time.time())
        return Response(status_code=202)

    async def services(request: Request) -> Response:
        return JSONResponse(store.services())

    def by_service(names: Callable[[str], list[str]]) -> Callable[[Request], Awaitable[Response]]:
        """A query answered per ``serviceName``, which it requires."""

        async def handle(request: Request) -> Response:
            service = request.query_params.get("serviceName")
            if not service:
                return JSONResponse({"problems": ["serviceName is required"]}, status_code=400)
            return JSONResponse(names(service))

        return handle

    async def traces(request: Request) -> Response:
        query = request.query_params
        try:
            found = store.traces(
                service=query.get("serviceName"),
                span_name=query.get("spanName"),
                min_duration=_int(query.get("minDuration")),
                max_duration=_int(query.get("maxDuration")),
                end_ts=_int(query.get("endTs")),
                lookback=_int(query.get("lookback")),
                limit=_int(query.get("limit")) or 10,
                now=time.time(),
            )
        except ValueError as exc:
            return JSONResponse({"problems": [str(exc)]}, status_code=400)
        return JSONResponse(found)

    async def trace(request: Request) -> Response:
        found = store.trace(request.path_params["trace_id"])
        if found is None:
            return JSONResponse({"problems": ["no such trace"]}, status_code=404)
        return JSONResponse(found)

    async def trace_many(request: Request) -> Response:
        ids = [i for i in request.query_params.get("traceIds", "").split(",") if i.strip()]
        if not ids:
            return JSONResponse({"problems": ["traceIds is required: trace ids, comma-separated"]}, status_code=400)
        return JSONResponse(store.trace_many([i.strip() for i in ids]))

    async def dependencies(request: Request) -> Response:
        query = request.query_params
        try:
            end_ts = _int(query.get("endTs"))
            lookback = _int(query.get("lookback"))
        except ValueError as exc:
            return JSONResponse({"problems": [str(exc)]}, status_code=400)
        if end_ts is None:
            return JSONResponse({"problems": ["endTs is required: milliseconds since the epoch"]}, status_code=400)
        return JSONResponse(store.dependencies(end_ts=end_ts, lookback=lookback))

    async def no_autocomplete(request: Request) -> Response:
        # No tags are configured for autocompletion (Zipkin's default, AUTOCOMPLETE_KEYS empty).
        return JSONResponse([])

    return [
        Route("/api/v2/spans", post_spans, methods=["POST"]),
        Route("/api/v2/spans", by_service(store.span_names), methods=["GET"]),
        Route("/api/v2/services", services),
        Route("/api/v2/traces", traces),
        Route("/api/v2/trace/{trace_id}", trace),
        Route("/api/v2/traceMany", trace_many),
        Route("/api/v2/remoteServices", by_service(store.remote_services)),
        Route("/api/v2/dependencies", dependencies),
        Route("/api/v2/autocompleteKeys", no_autocomplete),
        Route("/api/v2/autocompleteValues", no_autocomplete),
    ]


def _int(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


__all__ = ["check_span", "zipkin_routes"]
