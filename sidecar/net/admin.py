"""The admin listener: /metrics /metrics/cardinality /ready /live /config_dump /clusters /explain.

Served by the same HTTP/1.1 loop as the data path, with a handler that answers itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qs

from ..core.http1 import serialize_response_head
from ..layers.base import Request, Response

PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


def _respond(status: int, reason: bytes, content_type: bytes, body: bytes) -> Response:
    response = Response(status, reason, [])
    response.raw = (
        serialize_response_head(
            status, reason, [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        )
        + body
    )
    return response


_REASONS = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}


def json_response(value: object, status: int = 200) -> Response:
    body = json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"
    return _respond(status, _REASONS.get(status, b"Error"), b"application/json", body)


class AdminHandler:
    """``metrics`` renders Prometheus text; the others return JSON-able values (``explain``:
    None when it kept nothing for that request id)."""

    def __init__(
        self,
        *,
        metrics: Callable[[], bytes],
        ready: Callable[[], tuple[bool, str]],
        config_dump: Callable[[], object],
        clusters: Callable[[], object],
        worker_snapshot: Callable[[], object] | None = None,
        explain: Callable[[str | None], object] | None = None,
        cardinality: Callable[[], object] | None = None,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.config_dump = config_dump
        self.clusters = clusters
        self.worker_snapshot = worker_snapshot
        self.explain = explain
        self.cardinality = cardinality

    async def __call__(self, request: Request) -> Response:
        path, _, query = request.head.target.partition(b"?")
        if request.head.method not in (b"GET", b"HEAD"):
            return _respond(405, b"Method Not Allowed", b"text/plain", b"admin endpoints are read-only\n")
        if path == b"/metrics":
            return _respond(200, b"OK", PROMETHEUS_TEXT, self.metrics())
        if path == b"/metrics/cardinality" and self.cardinality is not None:
            return json_response(self.cardinality())
        if path == b"/live":
            return _respond(200, b"OK", b"text/plain", b"live\n")
        if path == b"/ready":
            ok, why = self.ready()
            if ok:
                return _respond(200, b"OK", b"text/plain", b"ready\n")
            return _respond(503, b"Service Unavailable", b"text/plain", f"not ready: {why}\n".encode())
        if path == b"/config_dump":
            return json_response(self.config_dump())
        if path == b"/clusters":
            return json_response(self.clusters())
        if path == b"/explain" and self.explain is not None:
            wanted = parse_qs(query.decode("latin-1")).get("request_id", [None])[0]
            found = self.explain(wanted)
            if found is None:
                return json_response({"error": f"no explanation kept for request {wanted!r}"}, 404)
            return json_response(found)
        if path == b"/_worker/snapshot" and self.worker_snapshot is not None:
            return json_response(self.worker_snapshot())  # read by the --workers supervisor
        return _respond(
            404,
            b"Not Found",
            b"text/plain",
            b"unknown admin path; try /metrics /metrics/cardinality /ready /live /config_dump /clusters /explain\n",
        )
