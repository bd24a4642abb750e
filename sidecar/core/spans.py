"""Spans, one per hop and side, in Zipkin's v2 model (docs/tracing.md). Pure: times are
passed in (``start_us``: wall-clock microseconds since the epoch, for Zipkin's
``timestamp``; ``duration_us`` measured by the caller on a monotonic clock).

Per hop the outbound sidecar records a CLIENT span for each attempt it makes (a retry is
a second CLIENT span, so retries show in the trace) and the inbound sidecar a SERVER
span, the child of the CLIENT span whose id came in the trace headers. Tags follow
Zipkin's and OpenTelemetry's HTTP names where they exist (``http.method``,
``http.path``, ``http.status_code``, ``error``) and ``meshlet.*`` for the mesh's own
facts (the mesh error reason, the attempt, the claimed peer service). A gRPC call's span
also carries OpenTelemetry's ``rpc.system``, ``rpc.service``, ``rpc.method`` and
``rpc.grpc.status_code`` (:func:`rpc_tags`), and ``error`` when its status is a server
fault (meshlet/grpc.py).

:func:`encode` makes the JSON body of ``POST /api/v2/spans``: a list of spans, every tag
value a string, ``duration`` at least 1 µs (Zipkin drops 0), ids in lower hex. The exporter
encodes each span as it finishes (:func:`encode_span`, with orjson) and joins them per
batch (:func:`join`), so sending a batch never stalls the sidecar's event loop for the
milliseconds that encoding 500 spans at once with the standard library's json takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from meshlet.grpc import SERVER_FAULTS, Status

CLIENT = "CLIENT"
SERVER = "SERVER"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """MeshConfig's ``tracing`` as a sidecar uses it."""

    sampling: float = 1.0  # for traces this sidecar starts; an incoming decision is kept
    formats: tuple[str, ...] = ("w3c", "b3")
    collector: str | None = None  # a Zipkin v2 endpoint; None: the control plane's store


class Endpoint(NamedTuple):
    """Zipkin's endpoint: who is at one end of the span. (A NamedTuple: cheap to make,
    hashable, so its JSON form is made once per endpoint, see ``to_json``.)"""

    service: str
    ip: str = ""
    port: int = 0

    def to_json(self) -> dict[str, Any]:
        out = _ENDPOINT_JSON.get(self)
        if out is None:
            out = {"serviceName": self.service}
            if self.ip:
                out["ipv6" if ":" in self.ip else "ipv4"] = self.ip
            if self.port:
                out["port"] = self.port
            if len(_ENDPOINT_JSON) >= _ENDPOINT_JSON_MAX:
                _ENDPOINT_JSON.clear()
            _ENDPOINT_JSON[self] = out
        return out


# An endpoint's JSON object, shared by the spans that name it (read only: encoded, never changed).
_ENDPOINT_JSON: dict[Endpoint, dict[str, Any]] = {}
_ENDPOINT_JSON_MAX = 4096


@dataclass(slots=True)
class Span:
    trace_id: str  # 32 lower hex
    span_id: str  # 16 lower hex
    parent_id: str | None
    kind: str  # CLIENT | SERVER
    name: str  # "get /items/1": the method and the path (no query)
    local: Endpoint
    remote: Endpoint | None
    start_us: int
    duration_us: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    debug: bool = False

    def finish(
        self,
        duration_us: int,
        status: int,
        reason: str = "",
        attempt: int = 0,
    ) -> None:
        """The end of the exchange: its duration, status and the mesh's reason if it made one."""
        self.duration_us = max(1, duration_us)
        tags = self.tags
        if status:
            tags["http.status_code"] = str(status)
        if reason:
            tags["meshlet.reason"] = reason
        if reason or status >= 500:
            tags["error"] = reason or str(status)
        if attempt:
            tags["meshlet.attempt"] = str(attempt)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "traceId": self.trace_id,
            "id": self.span_id,
            "kind": self.kind,
            "name": self.name,
            "timestamp": self.start_us,
            "duration": max(1, self.duration_us),
            "localEndpoint": self.local.to_json(),
            "tags": self.tags,
        }
        if self.parent_id:
            out["parentId"] = self.parent_id
        if self.remote is not None:
            out["remoteEndpoint"] = self.remote.to_json()
        if self.debug:
            out["debug"] = True
        return out


def span_name(method: bytes, target: bytes) -> str:
    """Zipkin lower-cases names; the query stays out (ids in it would make every name new)."""
    return f"{method.decode('ascii', 'replace').lower()} {target.partition(b'?')[0].decode('latin-1')}"


def http_tags(method: bytes, target: bytes, peer: str = "") -> dict[str, str]:
    tags = {
        "http.method": method.decode("ascii", "replace"),
        "http.path": target.partition(b"?")[0].decode("latin-1"),
    }
    if peer:
        tags["meshlet.peer"] = peer  # the calling service its mTLS certificate proved, or "unauthenticated"
    return tags


def http_span(
    trace_id: str,
    span_id: str,
    parent_id: str | None,
    kind: str,
    method: bytes,
    target: bytes,
    local: Endpoint,
    remote: Endpoint | None,
    start_us: int,
    debug: bool = False,
) -> Span:
    """A span for one HTTP exchange: named and tagged as :func:`span_name` and :func:`http_tags`
    do, with the method and path decoded once (this runs per sampled request and hop)."""
    verb = method.decode("ascii", "replace")
    path = target.partition(b"?")[0].decode("latin-1")
    tags = {"http.method": verb, "http.path": path}
    return Span(trace_id, span_id, parent_id, kind, f"{verb.lower()} {path}", local, remote, start_us, 0, tags, debug)


def rpc_tags(tags: dict[str, str], path: bytes, status: int | None) -> None:
    """Tag a gRPC call's span: its service and method (from ``:path``, ``/pkg.Service/Method``)
    and its status (None: cut short before any), ``error`` for a server fault."""
    tags["rpc.system"] = "grpc"
    service, slash, method = path[1:].partition(b"/")
    if path[:1] == b"/" and slash and service and method:
        tags["rpc.service"] = service.decode("latin-1")
        tags["rpc.method"] = method.decode("latin-1")
    if status is not None:
        tags["rpc.grpc.status_code"] = str(status)
        if status in SERVER_FAULTS and "error" not in tags:
            tags["error"] = Status(status).name


def encode_span(span: Span) -> bytes:
    """One span as Zipkin v2 JSON, for :func:`join` to put in a batch. Copied: orjson's bytes
    keep the 4 KiB it allocated for any output, and the exporter's queue holds thousands."""
    return bytes(memoryview(orjson.dumps(span.to_json())))


def join(encoded: list[bytes]) -> bytes:
    """The body of ``POST /api/v2/spans`` from spans encoded one by one."""
    return b"[" + b",".join(encoded) + b"]"


def encode(spans: list[Span]) -> bytes:
    """The body of ``POST /api/v2/spans`` (Zipkin v2 JSON)."""
    return join([encode_span(span) for span in spans])


__all__ = [
    "CLIENT",
    "SERVER",
    "Endpoint",
    "Span",
    "TracingSettings",
    "encode",
    "encode_span",
    "http_span",
    "http_tags",
    "join",
    "rpc_tags",
    "span_name",
]
