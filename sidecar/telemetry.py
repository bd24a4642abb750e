"""Every metric the sidecar exports: names, labels and buckets in one place.

The request path only bumps plain integers in dicts keyed by label tuples (no locks,
no prometheus-client objects per request: ``Counter.labels().inc()`` takes a lock and
several calls each time).
At scrape time :func:`render` turns one or more :meth:`Telemetry.snapshot` values
into Prometheus text (sidecar/core/exposition.py), so ``--workers N`` adds the workers' snapshots up.

The per-hop request series are bounded (sidecar/core/cardinality.py): a label tuple seen
for the first time goes through the allow-list and the value caps once, and the answer is
kept, so a request pays one dict lookup for it. :meth:`Telemetry.sweep`, every minute,
removes series idle for the expiry (10 min by default).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from .core.cardinality import IdleSeries, MetricsSettings, SeriesLimits
from .core.exposition import CounterFamily, Family, GaugeFamily, HistogramFamily
from .core.exposition import text as exposition_text
from .core.tcp import DURATION_BUCKETS as TCP_DURATION_BUCKETS
from .core.tcp import TcpStats

# 0.5 ms to 30 s: the sidecar's own overhead sits in the first buckets, timeouts in the last.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Body sizes, 100 B to 100 MB.
SIZE_BUCKETS = (100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0, 10_000_000.0, 100_000_000.0)

# grpc_status: a gRPC call's status code ("0".."16"), "" for other requests, which Prometheus
# reads as no label at all: an HTTP/1.1 series is the very series it was before the label.
REQUEST_LABELS = ("direction", "source", "destination", "route", "code", "reason", "grpc_status")
HISTOGRAMS = ("durations", "request_bytes", "response_bytes")  # kept per request series, as lists
SERIES_CACHE_MAX = 20_000  # raw label tuples → recorded ones; cleared when full
INFLIGHT_LABELS = ("direction",)
CONNECTION_LABELS = ("destination", "endpoint", "state")
POOL_LABELS = ("destination", "endpoint")
SHADOW_LABELS = ("route", "rule", "decision")
SHADOW_ACCESS_LABELS = ("policy", "source", "rule", "decision")
SHADOW_DESTINATION_LABELS = ("policy", "destination", "decision")
RETRY_LABELS = ("destination", "outcome")
DROPPED_LABELS = ("reason",)
TRANSITION_LABELS = ("destination", "to")
CIRCUIT_LABELS = ("destination",)
EJECTION_LABELS = ("destination",)
ENDPOINT_LABELS = ("destination", "state")
CIRCUIT_STATES = ("closed", "open", "half_open")
MIRROR_LABELS = ("destination", "outcome")
LISTENER_LABELS = ("listener",)
TCP_COUNTS = ("tcp_connections", "tcp_bytes", "tcp_open")  # TcpStats.snapshot's, summed over workers
TCP_KINDS = (*TCP_COUNTS, "tcp_durations")
ListenerStats = tuple[str, int, int, int, dict[str, int], dict[str, int]]
# (listener, HTTP/2 connections open, streams being handled, streams opened, {reason: connections
# closed}, {reason: streams reset})
Http2Stats = tuple[str, int, int, int, dict[str, int], dict[str, int]]


class Telemetry:
    def __init__(self, settings: MetricsSettings | None = None) -> None:
        self.settings = settings or MetricsSettings()
        self.limits = SeriesLimits(REQUEST_LABELS, self.settings.labels, self.settings.max_label_values)
        self.idle: IdleSeries[tuple[str, ...]] = IdleSeries(self.settings.idle_expiry)
        self._recorded_as: dict[tuple[str, ...], tuple[str, ...]] = {}  # raw labels → bounded labels
        self.requests: dict[tuple[str, ...], int] = {}
        # labels → [count per bucket..., +Inf count, sum]
        self.durations: dict[tuple[str, ...], list[float]] = {}
        self.request_bytes: dict[tuple[str, ...], list[float]] = {}  # the body from the caller
        self.response_bytes: dict[tuple[str, ...], list[float]] = {}  # the body to the caller
        self.inflight: dict[str, int] = {}  # direction → requests in flight
        # A shadow policy's decisions: what it would have done (docs/policy.md, mode: shadow).
        self.shadow: dict[tuple[str, str, str], int] = {}
        self.shadow_access: dict[tuple[str, str, str, str], int] = {}  # an AccessPolicy's, at the inbound side
        self.shadow_destination: dict[tuple[str, str, str], int] = {}  # a DestinationPolicy's
        self.mirror: dict[tuple[str, str], int] = {}  # (destination, outcome) → mirrored copies
        self.retries: dict[tuple[str, str], int] = {}  # (destination, "retried" | "budget-exhausted")
        self.transitions: dict[tuple[str, str], int] = {}  # (destination, new circuit state)
        self.ejections: dict[tuple[str], int] = {}
        self.spans_dropped: dict[tuple[str], int] = {}  # why: queue-full, collector-unreachable, -refused
        self.spans_exported: dict[tuple[()], int] = {}  # delivered to the collector
        # Redirected connections (transparent mode) by what became of them: service, passthrough,
        # blocked (REGISTRY_ONLY), loop. Destination: the service, or "" for an unknown address.
        self.transparent: dict[tuple[str, str], int] = {}
        # mTLS between sidecars: handshakes by (side, resumed), failures by (side, reason),
        # plaintext connections a strict inbound listener refused.
        self.tls_handshakes: dict[tuple[str, str], int] = {}
        self.tls_failures: dict[tuple[str, str], int] = {}
        self.plaintext_refused: dict[tuple[()], int] = {}
        # Called at scrape time: yields (destination, circuit state 0/1/2, {endpoint state: count}).
        self.destination_stats: Callable[[], Iterable[tuple[str, int, dict[str, int]]]] = lambda: ()
        # Called at scrape time: yields (destination, endpoint, state, count).
        self.connection_stats: Callable[[], Iterable[tuple[str, str, str, int]]] = lambda: ()
        # Called at scrape time: yields (destination, endpoint, requests that found every
        # connection busy for their connect timeout).
        self.pool_overflow_stats: Callable[[], Iterable[tuple[str, str, int]]] = lambda: ()
        # Called at scrape time, HTTP/2 upstream pools: (destination, endpoint, streams open);
        # (destination, endpoint, reason, connections ended); (destination, endpoint, error
        # code, RST_STREAMs received).
        self.h2_stream_stats: Callable[[], Iterable[tuple[str, str, int]]] = lambda: ()
        self.h2_close_stats: Callable[[], Iterable[tuple[str, str, str, int]]] = lambda: ()
        self.h2_reset_stats: Callable[[], Iterable[tuple[str, str, str, int]]] = lambda: ()
        # Called at scrape time: yields (listener, open connections, their limit, connections
        # closed at once at the limit, {timeout phase: connections it closed}, {status code:
        # requests the listener answered itself}).
        self.listener_stats: Callable[[], Iterable[ListenerStats]] = lambda: ()
        # Called at scrape time: yields each listener kind's HTTP/2 figures (Http2Stats).
        self.http2_stats: Callable[[], Iterable[Http2Stats]] = lambda: ()
        # Called at scrape time: (the config version applied, control plane connected: 1/0, or
        # None without a control plane).
        self.status: Callable[[], tuple[str, int | None]] = lambda: ("", None)
        # Seconds until this sidecar's certificate expires (negative: expired); None: it has none.
        self.certificate_expiry: Callable[[], float | None] = lambda: None
        self.tcp = TcpStats()  # opaque TCP connections (sidecar/net/tcp_proxy.py)

    def configure(self, settings: MetricsSettings | None) -> None:
        """New bounds (a MeshConfig changed them): the request series start again under them."""
        settings = settings or MetricsSettings()
        if settings == self.settings:
            return
        self.settings = settings
        self.limits = SeriesLimits(REQUEST_LABELS, settings.labels, settings.max_label_values)
        self.idle = IdleSeries(settings.idle_expiry)
        self._recorded_as.clear()
        self.requests.clear()  # a counter that starts again is a reset to Prometheus
        self.durations.clear()
        self.request_bytes.clear()
        self.response_bytes.clear()

    def request_finished(
        self,
        direction: str,
        source: str,
        destination: str,
        route: str,
        code: int,
        reason: str,
        seconds: float,
        request_bytes: int = 0,
        response_bytes: int = 0,
        grpc_status: str = "",
    ) -> None:
        raw = (direction, source, destination, route, str(code), reason, grpc_status)
        labels = self._recorded_as.get(raw)
        if labels is None:
            labels = self._bound(raw)
        requests = self.requests
        requests[labels] = requests.get(labels, 0) + 1
        hist = self.durations.get(labels)
        if hist is None:
            hist = self.durations[labels] = [0.0] * (len(DURATION_BUCKETS) + 2)
        hist[bisect_left(DURATION_BUCKETS, seconds)] += 1
        hist[-1] += seconds
        sizes = self.request_bytes.get(labels)
        if sizes is None:
            sizes = self.request_bytes[labels] = [0.0] * (len(SIZE_BUCKETS) + 2)
            self.response_bytes[labels] = [0.0] * (len(SIZE_BUCKETS) + 2)
        sizes[bisect_left(SIZE_BUCKETS, request_bytes)] += 1
        sizes[-1] += request_bytes
        sizes = self.response_bytes[labels]
        sizes[bisect_left(SIZE_BUCKETS, response_bytes)] += 1
        sizes[-1] += response_bytes

    def _bound(self, raw: tuple[str, ...]) -> tuple[str, ...]:
        if len(self._recorded_as) >= SERIES_CACHE_MAX:
            self._recorded_as.clear()
        labels = self.limits.admit(raw)
        if labels not in self.requests and len(self.requests) >= self.settings.max_series:
            labels = self.limits.fold(labels)
        self._recorded_as[raw] = labels
        return labels

    def sweep(self, now: float) -> int:
        """Remove the request series idle for the expiry; how many went."""
        idle = self.idle.sweep(self.requests, now)
        for key in idle:
            del self.requests[key]
            self.durations.pop(key, None)
            self.request_bytes.pop(key, None)
            self.response_bytes.pop(key, None)
        if idle:
            self.limits.rebuild(self.requests)
            self._recorded_as.clear()
        return len(idle)

    def shadow_decision(self, route: str, rule: str, decision: str) -> None:
        key = (route, rule, decision)
        self.shadow[key] = self.shadow.get(key, 0) + 1

    def shadow_access_decision(self, policy: str, source: str, rule: str, decision: str) -> None:
        key = (policy, source, rule, decision)
        self.shadow_access[key] = self.shadow_access.get(key, 0) + 1

    def shadow_destination_decision(self, policy: str, destination: str, decision: str) -> None:
        key = (policy, destination, decision)
        self.shadow_destination[key] = self.shadow_destination.get(key, 0) + 1

    def dropped_spans(self, count: int, why: str) -> None:
        key = (why,)
        self.spans_dropped[key] = self.spans_dropped.get(key, 0) + count

    def exported_spans(self, count: int) -> None:
        self.spans_exported[()] = self.spans_exported.get((), 0) + count

    def intercepted(self, outcome: str, destination: str = "") -> None:
        key = (outcome, destination)
        self.transparent[key] = self.transparent.get(key, 0) + 1

    def tls_handshake(self, side: str, resumed: bool) -> None:
        key = (side, "true" if resumed else "false")
        self.tls_handshakes[key] = self.tls_handshakes.get(key, 0) + 1

    def tls_failure(self, side: str, reason: str) -> None:
        key = (side, reason)
        self.tls_failures[key] = self.tls_failures.get(key, 0) + 1

    def refused_plaintext(self) -> None:
        self.plaintext_refused[()] = self.plaintext_refused.get((), 0) + 1

    def retried(self, destination: str, outcome: str) -> None:
        key = (destination, outcome)
        self.retries[key] = self.retries.get(key, 0) + 1

    def circuit_moved(self, destination: str, state: int) -> None:
        key = (destination, CIRCUIT_STATES[state])
        self.transitions[key] = self.transitions.get(key, 0) + 1

    def ejected(self, destination: str, endpoint: object) -> None:
        key = (destination,)
        self.ejections[key] = self.ejections.get(key, 0) + 1

    def mirror_finished(self, destination: str, outcome: str) -> None:
        key = (destination, outcome)
        self.mirror[key] = self.mirror.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Plain, msgpack-able values: what a worker sends its supervisor."""
        stats = list(self.destination_stats())
        listeners = list(self.listener_stats())
        http2 = list(self.http2_stats())
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "durations": [[*k, v] for k, v in self.durations.items()],
            "request_bytes": [[*k, v] for k, v in self.request_bytes.items()],
            "response_bytes": [[*k, v] for k, v in self.response_bytes.items()],
            "inflight": [[k, v] for k, v in self.inflight.items()],
            "connections": [list(row) for row in self.connection_stats()],
            "pool_overflows": [list(row) for row in self.pool_overflow_stats()],
            "h2_streams": [list(row) for row in self.h2_stream_stats()],
            "h2_closes": [list(row) for row in self.h2_close_stats()],
            "h2_resets": [list(row) for row in self.h2_reset_stats()],
            "shadow": [[*k, v] for k, v in self.shadow.items()],
            "shadow_access": [[*k, v] for k, v in self.shadow_access.items()],
            "shadow_destination": [[*k, v] for k, v in self.shadow_destination.items()],
            "mirror": [[*k, v] for k, v in self.mirror.items()],
            "retries": [[*k, v] for k, v in self.retries.items()],
            "transitions": [[*k, v] for k, v in self.transitions.items()],
            "ejections": [[*k, v] for k, v in self.ejections.items()],
            "spans_dropped": [[*k, v] for k, v in self.spans_dropped.items()],
            "spans_exported": [[*k, v] for k, v in self.spans_exported.items()],
            "transparent": [[*k, v] for k, v in self.transparent.items()],
            "tls_handshakes": [[*k, v] for k, v in self.tls_handshakes.items()],
            "tls_failures": [[*k, v] for k, v in self.tls_failures.items()],
            "plaintext_refused": [[*k, v] for k, v in self.plaintext_refused.items()],
            "folded": [[k, v] for k, v in self.limits.folded.items()],
            "info": [[*self.status()]],
            "certificate_expiry": [] if (expiry := self.certificate_expiry()) is None else [[expiry]],
            "circuits": [[d, state] for d, state, _ in stats],
            "endpoints": [[d, name, n] for d, _, counts in stats for name, n in counts.items()],
            "downstream_open": [[name, n] for name, n, *_ in listeners],
            "downstream_limit": [[name, n] for name, _, n, *_ in listeners],
            "downstream_rejected": [[name, n] for name, _, _, n, *_ in listeners],
            "downstream_timeouts": [
                [name, phase, n] for name, _, _, _, expired, _ in listeners for phase, n in expired.items()
            ],
            "downstream_requests_rejected": [
                [name, code, n] for name, *_, rejected in listeners for code, n in rejected.items()
            ],
            "http2_open": [[name, n] for name, n, *_ in http2],
            "http2_streams": [[name, n] for name, _, n, *_ in http2],
            "http2_streams_opened": [[name, n] for name, _, _, n, *_ in http2],
            "http2_closed": [[name, why, n] for name, _, _, _, closed, _ in http2 for why, n in closed.items()],
            "http2_resets": [[name, why, n] for name, *_, resets in http2 for why, n in resets.items()],
            **self.tcp.snapshot(),
        }


def _merge(snapshots: Iterable[dict[str, Any]]) -> tuple[dict[str, dict[tuple[str, ...], Any]], dict[str, Any]]:
    """The workers' snapshots as one: each kind's series (labels → value) summed, and the
    configuration info (version, connected) of the first worker."""
    merged: dict[str, dict[tuple[str, ...], Any]] = {
        "requests": {},
        "durations": {},
        "request_bytes": {},
        "response_bytes": {},
        "inflight": {},
        "connections": {},
        "pool_overflows": {},
        "h2_streams": {},
        "h2_closes": {},
        "h2_resets": {},
        "shadow": {},
        "shadow_access": {},
        "shadow_destination": {},
        "mirror": {},
        "retries": {},
        "transitions": {},
        "ejections": {},
        "spans_dropped": {},
        "spans_exported": {},
        "transparent": {},
        "tls_handshakes": {},
        "tls_failures": {},
        "plaintext_refused": {},
        "folded": {},
        "circuits": {},
        "endpoints": {},
        "downstream_open": {},
        "downstream_limit": {},
        "downstream_rejected": {},
        "downstream_timeouts": {},
        "downstream_requests_rejected": {},
        "http2_open": {},
        "http2_streams": {},
        "http2_streams_opened": {},
        "http2_closed": {},
        "http2_resets": {},
        **{kind: {} for kind in TCP_KINDS},
    }
    info: dict[str, Any] = {}
    for snap in snapshots:
        for kind in (
            "requests",
            "inflight",
            "connections",
            "pool_overflows",
            "h2_streams",
            "h2_closes",
            "h2_resets",
            "shadow",
            "shadow_access",
            "shadow_destination",
            "mirror",
            "retries",
            "transitions",
            "ejections",
            "endpoints",
            "spans_dropped",
            "spans_exported",
            "transparent",
            "tls_handshakes",
            "tls_failures",
            "plaintext_refused",
            "folded",
            "downstream_open",  # workers: each has its own listeners' connections and limits
            "downstream_limit",
            "downstream_rejected",
            "downstream_timeouts",
            "downstream_requests_rejected",
            "http2_open",
            "http2_streams",
            "http2_streams_opened",
            "http2_closed",
            "http2_resets",
            *TCP_COUNTS,
        ):
            table = merged[kind]
            for *labels, value in snap.get(kind, ()):
                key = tuple(labels)
                table[key] = table.get(key, 0) + value
        for version, connected in snap.get("info", ()):  # workers share one configuration: the first says
            info.setdefault("version", version)
            info.setdefault("connected", connected)
        for (expiry,) in snap.get("certificate_expiry", ()):
            info.setdefault("certificate_expiry", expiry)
        circuits = merged["circuits"]
        for destination, state in snap.get("circuits", ()):
            # Workers keep a breaker each: show the most alarming (open, then half-open).
            key = (destination,)
            circuits[key] = max(circuits.get(key, 0), state, key=lambda v: (v == 1, v == 2))
        for kind in (*HISTOGRAMS, "tcp_durations"):
            histograms = merged[kind]
            for *labels, values in snap.get(kind, ()):
                key = tuple(labels)
                have = histograms.get(key)
                histograms[key] = list(values) if have is None else [a + b for a, b in zip(have, values, strict=True)]
    return merged, info


class _Collector:
    def __init__(self, snapshots: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterable[Family]:
        merged, info = _merge(self._snapshots())
        requests = CounterFamily(
            "meshlet_requests",
            "Requests per hop, by status code, mesh error reason and gRPC status.",
            labels=REQUEST_LABELS,
        )
        for labels, value in merged["requests"].items():
            requests.add_metric(labels, value)
        yield requests
        yield _histogram(
            "meshlet_request_duration_seconds",
            "Time from request head to the end of the response, per hop.",
            DURATION_BUCKETS,
            merged["durations"],
        )
        yield _histogram(
            "meshlet_request_bytes",
            "Request body bytes from the caller, per hop.",
            SIZE_BUCKETS,
            merged["request_bytes"],
        )
        yield _histogram(
            "meshlet_response_bytes",
            "Response body bytes to the caller, per hop.",
            SIZE_BUCKETS,
            merged["response_bytes"],
        )
        inflight = GaugeFamily("meshlet_inflight_requests", "Requests being handled now.", labels=INFLIGHT_LABELS)
        for labels, value in merged["inflight"].items():
            inflight.add_metric(labels, value)
        yield inflight
        yield _family(
            GaugeFamily,
            "meshlet_upstream_connections",
            "Upstream connections per endpoint: active (carrying a request) or idle (pooled).",
            CONNECTION_LABELS,
            merged["connections"],
        )
        yield _family(
            CounterFamily,
            "meshlet_upstream_pool_overflow",
            "Requests answered 503 overloaded because every connection to the endpoint (1,024 at most) stayed "
            "busy for the connect timeout.",
            POOL_LABELS,
            merged["pool_overflows"],
        )
        yield _family(
            GaugeFamily,
            "meshlet_upstream_streams",
            "Streams open on the HTTP/2 connections to each endpoint.",
            POOL_LABELS,
            merged["h2_streams"],
        )
        yield _family(
            CounterFamily,
            "meshlet_upstream_connections_ended",
            "HTTP/2 upstream connections ended, by reason: idle, goaway (the peer's), peer-closed, lost, "
            "protocol-error, no-settings, no-h2 (ALPN), retired, cancelled, closed.",
            (*POOL_LABELS, "reason"),
            merged["h2_closes"],
        )
        yield _family(
            CounterFamily,
            "meshlet_upstream_stream_resets",
            "RST_STREAM frames received from HTTP/2 upstreams, by error code (refused-stream: sent again once).",
            (*POOL_LABELS, "code"),
            merged["h2_resets"],
        )
        yield _family(
            CounterFamily,
            "meshlet_shadow_route_decisions",
            "What Route policies in shadow mode would have done: the rule, and the destination or answer.",
            SHADOW_LABELS,
            merged["shadow"],
        )
        yield _family(
            CounterFamily,
            "meshlet_shadow_access_decisions",
            "What AccessPolicies in shadow mode would have done with each caller: allow or deny, and by which "
            "rule (or the default).",
            SHADOW_ACCESS_LABELS,
            merged["shadow_access"],
        )
        yield _family(
            CounterFamily,
            "meshlet_shadow_destination_decisions",
            "What DestinationPolicies in shadow mode would have done with each request: allow, circuit-open, "
            "rate-limited or overloaded (the defaults served it).",
            SHADOW_DESTINATION_LABELS,
            merged["shadow_destination"],
        )
        yield _family(
            CounterFamily,
            "meshlet_retries",
            "Retries made (outcome retried) and refused because the retry budget was spent (budget-exhausted).",
            RETRY_LABELS,
            merged["retries"],
        )
        yield _family(
            CounterFamily,
            "meshlet_retry_budget_exhausted",
            "Retries the retry budget refused.",
            CIRCUIT_LABELS,
            {(d,): n for (d, outcome), n in merged["retries"].items() if outcome == "budget-exhausted"},
        )
        yield _family(
            GaugeFamily,
            "meshlet_circuit_state",
            "Circuit breaker state per destination: 0 closed, 1 open, 2 half-open.",
            CIRCUIT_LABELS,
            merged["circuits"],
        )
        yield _family(
            CounterFamily,
            "meshlet_circuit_transitions",
            "Circuit breaker transitions, by the state entered.",
            TRANSITION_LABELS,
            merged["transitions"],
        )
        yield _family(
            CounterFamily,
            "meshlet_outlier_ejections",
            "Endpoints ejected by outlier detection.",
            EJECTION_LABELS,
            merged["ejections"],
        )
        yield _family(
            GaugeFamily,
            "meshlet_endpoints",
            "Endpoints per destination by outlier state: healthy, ejected, probation.",
            ENDPOINT_LABELS,
            merged["endpoints"],
        )
        yield _family(
            CounterFamily,
            "meshlet_spans_dropped",
            "Finished spans not delivered to the collector: the queue was full, or the collector was down or refused.",
            DROPPED_LABELS,
            merged["spans_dropped"],
        )
        yield _family(
            CounterFamily,
            "meshlet_spans_exported",
            "Finished spans the collector accepted.",
            (),
            merged["spans_exported"],
        )
        yield _family(
            CounterFamily,
            "meshlet_transparent_connections",
            "Connections redirected to the outbound listener by meshlet init-iptables, by outcome: service "
            "(routed to a mesh service), passthrough (unknown address, ALLOW_ANY), blocked (REGISTRY_ONLY), "
            "loop (the sidecar's own connection came back: its uid is not exempt).",
            ("outcome", "destination"),
            merged["transparent"],
        )
        yield _family(
            CounterFamily,
            "meshlet_tls_handshakes",
            "mTLS handshakes completed with other sidecars, by side (client: our calls; server: the inbound "
            "listener) and whether a session was resumed.",
            ("side", "resumed"),
            merged["tls_handshakes"],
        )
        yield _family(
            CounterFamily,
            "meshlet_tls_failures",
            "mTLS connections that failed, by side and reason: tls-handshake-failed, peer-identity-mismatch, "
            "no-credentials (a TLS caller while this sidecar holds no certificate).",
            ("side", "reason"),
            merged["tls_failures"],
        )
        yield _family(
            CounterFamily,
            "meshlet_plaintext_refused",
            "Plaintext connections the inbound listener closed at once: its service is in strict mTLS mode.",
            (),
            merged["plaintext_refused"],
        )
        yield from _tcp_families(merged)
        yield _family(
            CounterFamily,
            "meshlet_mirror_requests",
            "Mirrored copies of requests, by destination and outcome (2xx..5xx, a mesh reason, failed, "
            "skipped-body, no-endpoint); never seen by the caller.",
            MIRROR_LABELS,
            merged["mirror"],
        )
        yield _family(
            CounterFamily,
            "meshlet_metrics_series_folded",
            "New per-hop series written with 'other' for a label, past its value cap (MeshConfig metrics).",
            ("label",),
            {(label,): n for (label,), n in merged["folded"].items()},
        )
        yield _family(
            GaugeFamily,
            "meshlet_downstream_connections",
            "Client connections open, per listener (outbound includes the --upstream listeners).",
            LISTENER_LABELS,
            merged["downstream_open"],
        )
        yield _family(
            GaugeFamily,
            "meshlet_downstream_connections_limit",
            "Client connections a listener may hold at once (--max-<listener>-connections).",
            LISTENER_LABELS,
            merged["downstream_limit"],
        )
        yield _family(
            CounterFamily,
            "meshlet_downstream_connections_rejected",
            "Client connections closed at once (a reset) because their listener was at its limit.",
            LISTENER_LABELS,
            merged["downstream_rejected"],
        )
        yield _family(
            CounterFamily,
            "meshlet_downstream_timeouts",
            "Client connections closed by a timeout: first-byte (a new one sent nothing within --header-timeout), "
            "request-head (a head not complete in time: 408), idle (no next request, or a stalled exchange).",
            ("listener", "phase"),
            merged["downstream_timeouts"],
        )
        yield _family(
            CounterFamily,
            "meshlet_downstream_requests_rejected",
            "Requests a listener answered itself before the request path, by status code: 400 (a malformed head "
            "or a bad chunk read with it), 431 (a head too large), 414 (a request target too long), 505 (an HTTP "
            "version other than 1.0 and 1.1), 408 (a head not complete within --header-timeout).",
            ("listener", "code"),
            merged["downstream_requests_rejected"],
        )
        yield from _http2_families(merged)
        if info.get("version"):
            yield _family(
                GaugeFamily,
                "meshlet_config_version_info",
                "The configuration version this sidecar applies (always 1).",
                ("version",),
                {(info["version"],): 1},
            )
        if info.get("certificate_expiry") is not None:
            yield _family(
                GaugeFamily,
                "meshlet_certificate_expiry_seconds",
                "Seconds until this sidecar's certificate expires; negative once it has (peers refuse it).",
                (),
                {(): info["certificate_expiry"]},
            )
        if info.get("connected") is not None:
            yield _family(
                GaugeFamily,
                "meshlet_control_plane_connected",
                "1 while the push channel to the control plane is up.",
                (),
                {(): info["connected"]},
            )


def _http2_families(merged: dict[str, dict[tuple[str, ...], Any]]) -> Iterable[Family]:
    yield _family(
        GaugeFamily,
        "meshlet_http2_connections",
        "HTTP/2 client connections open, per listener (also counted in meshlet_downstream_connections).",
        LISTENER_LABELS,
        merged["http2_open"],
    )
    yield _family(
        GaugeFamily,
        "meshlet_http2_streams",
        "HTTP/2 streams being handled, per listener.",
        LISTENER_LABELS,
        merged["http2_streams"],
    )
    yield _family(
        CounterFamily,
        "meshlet_http2_streams_opened",
        "HTTP/2 streams taken onto the request path, per listener.",
        LISTENER_LABELS,
        merged["http2_streams_opened"],
    )
    yield _family(
        CounterFamily,
        "meshlet_http2_connections_closed",
        "HTTP/2 client connections closed for what the client did: protocol-error, header-too-large (a "
        "header block past 64 KiB: a CONTINUATION flood), rapid-reset, control-flood (SETTINGS, PING...), "
        "output-unread (answers the client made us queue and did not read).",
        ("listener", "reason"),
        merged["http2_closed"],
    )
    yield _family(
        CounterFamily,
        "meshlet_http2_streams_reset",
        "HTTP/2 streams reset: refused (past the concurrent streams limit), client (reset by the client "
        "before its answer), timeout (no body moved for the idle timeout), response-cut (the upstream's "
        "body broke off).",
        ("listener", "reason"),
        merged["http2_resets"],
    )


def _tcp_families(merged: dict[str, dict[tuple[str, ...], Any]]) -> Iterable[Family]:
    """Opaque TCP connections (sidecar/core/tcp.py TcpStats)."""
    yield _family(
        CounterFamily,
        "meshlet_tcp_connections",
        "Opaque TCP connections that ended, by direction, source and destination service and outcome: ok, "
        "reset, idle-timeout, connect-failed, circuit-open, no-endpoints, denied.",
        ("direction", "source", "destination", "outcome"),
        merged["tcp_connections"],
    )
    yield _family(
        CounterFamily,
        "meshlet_tcp_bytes",
        "Bytes spliced on opaque TCP connections: received from the client (the app outbound, the caller "
        "inbound) and sent to it.",
        ("direction", "source", "destination", "way"),
        merged["tcp_bytes"],
    )
    yield _histogram(
        "meshlet_tcp_connection_duration_seconds",
        "How long opaque TCP connections lasted, from the splice to their end.",
        TCP_DURATION_BUCKETS,
        merged["tcp_durations"],
        ("direction", "source", "destination"),
    )
    yield _family(
        GaugeFamily,
        "meshlet_tcp_connections_open",
        "Opaque TCP connections open now (not meshlet_tcp_connections: the counter's family has that name).",
        ("direction",),
        merged["tcp_open"],
    )


def _family(
    kind: type[CounterFamily | GaugeFamily],
    name: str,
    help: str,
    labels: tuple[str, ...],
    values: dict[tuple[str, ...], Any],
) -> Family:
    """A counter or gauge family with one sample per label tuple."""
    family = kind(name, help, labels=labels)
    for key, value in values.items():
        family.add_metric(key, value)
    return family


def _histogram(
    name: str,
    help: str,
    bounds: tuple[float, ...],
    values: dict[tuple[str, ...], list[float]],
    labels: tuple[str, ...] = REQUEST_LABELS,
) -> Family:
    family = HistogramFamily(name, help, labels=labels)
    for labels, counts in values.items():
        cumulative, buckets = 0.0, []
        for bound, count in zip((*bounds, float("inf")), counts[:-1], strict=True):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        family.add_metric(labels, buckets, counts[-1])
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def render(snapshots: Callable[[], Iterable[dict[str, Any]]]) -> bytes:
    return exposition_text(_Collector(snapshots).collect())


def cardinality(text: bytes, telemetry: Telemetry | None = None) -> dict[str, Any]:
    """/metrics/cardinality: the series per metric in ``text`` (a /metrics page; a
    histogram counts one series per label set, not per bucket), and the bounds."""
    # Imported here: the admin's /metrics/cardinality only, not every sidecar, needs a parser.
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, int] = {}
    for family in text_string_to_metric_families(text.decode()):
        label_sets = {
            tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            for sample in family.samples
            if family.type != "histogram" or sample.name.endswith("_count")
        }
        if label_sets:
            series[family.name] = len(label_sets)
    out: dict[str, Any] = {"series": dict(sorted(series.items())), "total": sum(series.values())}
    if telemetry is not None:
        settings = telemetry.settings
        out["limits"] = {
            "labels": list(settings.labels),
            "max_label_values": settings.max_label_values,
            "max_series": settings.max_series,
            "idle_expiry_seconds": settings.idle_expiry,
        }
        out["label_values"] = telemetry.limits.distinct()
        out["folded"] = dict(telemetry.limits.folded)
    return out
