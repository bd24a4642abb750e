"""Golden metrics (`meshlet stat`, docs/observability.md): success rate, requests per second and latency
percentiles, per service, per edge (caller → callee) or per route, from the sidecars' own
Prometheus text. Pure: texts and times in, rows out.

A sidecar's ``meshlet_requests_total`` and ``meshlet_request_duration_seconds`` are
counters since it started. Two scrapes of one sidecar, ``before`` and ``after``, give what
it handled between them (:func:`since`; a counter that went down was reset, by a restart
or an idle series' expiry, and counts from 0). :func:`rows` adds those up over sidecars and
groups them:

* ``service``: what each service served, from its inbound sidecars (``direction=inbound``,
  by ``destination``). The service's own view, whoever called.
* ``edge``: each caller → callee pair as the caller saw it (``direction=outbound``, by
  ``source`` and ``destination``): the mesh's errors (no endpoint, timeouts, open
  circuits) count here, since the callee never saw those requests.
* ``route``: outbound, by destination and the Route rule that matched (``ROUTE/RULE``;
  ``-`` when none did): the busiest routes, for ``meshlet top``.
* ``destination``: outbound, by destination, every caller together (the Hystrix stream's
  "command").
* ``caller``: each caller → service as the service's inbound sidecar saw it (``direction=inbound``,
  by ``source`` and ``destination``): the caller its certificate proved, or ``unauthenticated``
  for a plaintext one (``meshlet check`` lists the services plaintext callers reach).

A request failed when its status is 5xx, or its gRPC status a server fault (``grpc_status``:
UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS, though its HTTP status is 200;
meshlet/grpc.py), or the mesh answered it (a ``reason``), except a caller that went away
(``incomplete``), as Linkerd counts success by response class.
Percentiles come from the histogram buckets as Prometheus's ``histogram_quantile`` does:
linear within the bucket the rank falls in, the highest finite bound past it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshlet.grpc import FAILED_LABELS

BY = ("service", "edge", "route", "destination", "caller")
Hop = tuple[str, str, str, str]  # direction, source, destination, route


@dataclass
class Counts:
    requests: float = 0.0
    failures: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound → cumulative count
    reasons: dict[str, float] = field(default_factory=dict)  # the mesh's own answers, by reason

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.failures += other.failures
        for bound, count in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + count
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0.0) + count


@dataclass
class Page:
    """What one scrape of a sidecar says: per-hop totals, and per destination its circuit
    state (0 closed, 1 open, 2 half-open) and the outlier ejections so far."""

    hops: dict[Hop, Counts] = field(default_factory=dict)
    circuits: dict[str, int] = field(default_factory=dict)
    ejections: dict[str, float] = field(default_factory=dict)


def parse(text: str) -> dict[Hop, Counts]:
    """Per-hop totals of one sidecar's /metrics page (codes and reasons added up)."""
    return read(text).hops


def read(text: str) -> Page:
    page = Page()
    out = page.hops
    for family in text_string_to_metric_families(text):
        if family.name == "meshlet_circuit_state":
            page.circuits = {s.labels.get("destination", ""): int(s.value) for s in family.samples}
            continue
        if family.name == "meshlet_outlier_ejections":
            page.ejections = {
                s.labels.get("destination", ""): s.value for s in family.samples if s.name.endswith("_total")
            }
            continue
        if family.name not in ("meshlet_requests", "meshlet_request_duration_seconds"):
            continue
        for sample in family.samples:
            labels = sample.labels
            hop = (
                labels.get("direction", ""),
                labels.get("source", ""),
                labels.get("destination", ""),
                labels.get("route", ""),
            )
            if sample.name == "meshlet_requests_total":
                counts = out.setdefault(hop, Counts())
                counts.requests += sample.value
                reason = labels.get("reason", "")
                if failed(labels.get("code", ""), reason, labels.get("grpc_status", "")):
                    counts.failures += sample.value
                if reason:
                    counts.reasons[reason] = counts.reasons.get(reason, 0.0) + sample.value
            elif sample.name == "meshlet_request_duration_seconds_bucket":
                counts = out.setdefault(hop, Counts())
                bound = float(labels["le"])
                counts.buckets[bound] = counts.buckets.get(bound, 0.0) + sample.value
    return page


def failed(code: str, reason: str, grpc_status: str = "") -> bool:
    return code.startswith("5") or (reason != "" and reason != "incomplete") or grpc_status in FAILED_LABELS


def since(before: dict[Hop, Counts], after: dict[Hop, Counts]) -> dict[Hop, Counts]:
    """What happened between two scrapes of one sidecar."""
    out: dict[Hop, Counts] = {}
    for hop, now in after.items():
        then = before.get(hop)
        if then is None or now.requests < then.requests:  # new, or reset: counted from 0
            delta = Counts(now.requests, now.failures, dict(now.buckets), dict(now.reasons))
        else:
            delta = Counts(
                now.requests - then.requests,
                now.failures - then.failures,
                {bound: count - then.buckets.get(bound, 0.0) for bound, count in now.buckets.items()},
                {reason: count - then.reasons.get(reason, 0.0) for reason, count in now.reasons.items()},
            )
        if delta.requests > 0:
            out[hop] = delta
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative ``buckets`` (seconds), None if empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return previous_bound  # past the last finite bucket: its bound is all we know
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


@dataclass(frozen=True)
class Row:
    name: str  # a service, "caller → callee", or "destination ROUTE/RULE"
    requests: float  # in the window
    rps: float
    success: float | None  # share of requests that did not fail; None: no requests
    p50: float | None  # seconds
    p95: float | None
    p99: float | None
    reasons: dict[str, float] = field(default_factory=dict)  # requests the mesh answered itself, by reason

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "rps": round(self.rps, 3),
            "success": None if self.success is None else round(self.success, 4),
            "p50_ms": _ms(self.p50),
            "p95_ms": _ms(self.p95),
            "p99_ms": _ms(self.p99),
            "reasons": {reason: n for reason, n in sorted(self.reasons.items()) if n},
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def group(hop: Hop, by: str) -> str | None:
    direction, source, destination, route = hop
    if by == "service":
        return destination if direction == "inbound" else None
    if by == "caller":
        return f"{source} → {destination}" if direction == "inbound" else None
    if direction != "outbound":
        return None
    if by == "edge":
        return f"{source} → {destination}"
    if by == "destination":
        return destination
    return f"{destination} {route or '-'}"


def rows(windows: Iterable[tuple[dict[Hop, Counts], float]], by: str) -> list[Row]:
    """Rows from each sidecar's (counts in its window, the window's seconds), busiest first."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
    totals: dict[str, Counts] = {}
    rates: dict[str, float] = {}
    for counts, seconds in windows:
        for hop, delta in counts.items():
            name = group(hop, by)
            if name is None:
                continue
            totals.setdefault(name, Counts()).add(delta)
            rates[name] = rates.get(name, 0.0) + (delta.requests / seconds if seconds > 0 else 0.0)
    out = [
        Row(
            name,
            total.requests,
            rates[name],
            1 - total.failures / total.requests if total.requests else None,
            quantile(0.50, total.buckets),
            quantile(0.95, total.buckets),
            quantile(0.99, total.buckets),
            total.reasons,
        )
        for name, total in totals.items()
    ]
    return sorted(out, key=lambda row: (-row.rps, row.name))


__all__ = ["BY", "Counts", "Page", "Row", "failed", "group", "parse", "quantile", "read", "rows", "since"]
