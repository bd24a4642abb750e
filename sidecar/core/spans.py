"""Spans, one per hop and side, in Zipkin's v2 model (PRODUCT §10). Pure: times are
passed in (``start_us``: wall-clock microseconds since the epoch, for Zipkin's
``timestamp``; ``duration_us`` measured by the caller on a monotonic clock).

Per hop the outbound sidecar records a CLIENT span for each attempt it makes (a retry is
a second CLIENT span, so retries show in the trace) and the inbound sidecar a SERVER
span, the child of the CLIENT span whose id came in the trace headers. Tags follow
Zipkin's and OpenTelemetry's HTTP names where they exist (``http.method``,
``http.path``, ``http.status_code``, ``error``) and ``meshlet.*`` for the mesh's own
facts (the mesh error reason, the attempt, the claimed peer service).

:func:`encode` makes the JSON body of ``POST /api/v2/spans``: a list of spans, every tag
value a string, ``duration`` at least 1 µs (Zipkin drops 0), ids in lower hex.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CLIENT = "CLIENT"
SERVER = "SERVER"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """MeshConfig's ``tracing`` as a sidecar uses it."""

    sampling: float = 1.0  # for traces this sidecar starts; an incoming decision is kept
    formats: tuple[str, ...] = ("w3c", "b3")
    collector: str | None = None  # a Zipkin v2 endpoint; None: the control plane's store


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Zipkin's endpoint: who is at one end of the span."""

    service: str
    ip: str = ""
    port: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"serviceName": self.service}
        if self.ip:
            out["ipv6" if ":" in self.ip else "ipv4"] = self.ip
        if self.port:
            out["port"] = self.port
        return out


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
        tags["meshlet.peer"] = peer  # the calling service as its sidecar names it (claimed until mTLS)
    return tags


def encode(spans: list[Span]) -> bytes:
    """The body of ``POST /api/v2/spans`` (Zipkin v2 JSON)."""
    return json.dumps([span.to_json() for span in spans], separators=(",", ":")).encode()


__all__ = ["CLIENT", "SERVER", "Endpoint", "Span", "TracingSettings", "encode", "http_tags", "span_name"]
