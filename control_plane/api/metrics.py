"""/metrics: the control plane's own Prometheus metrics (the push channel, the registry, the
trace store), read from their counters at each scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..replicas.engine import Replica
from ..server import PushServer
from ..traces import TraceStore
from .guard import ApiGuard

CONVERGENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsView:
    def __init__(
        self, push: PushServer, traces: TraceStore, guard: ApiGuard | None = None, replica: Replica | None = None
    ) -> None:
        self.push = push
        self.traces = traces
        self.guard = guard if guard is not None else ApiGuard(None)
        self.replica = replica

    async def metrics(self, request: Request) -> Response:
        collector_registry = CollectorRegistry(auto_describe=False)
        collector_registry.register(_Collector(self.push, self.traces, self.guard))
        if self.replica is not None:
            collector_registry.register(_ReplicaCollector(self.replica))
        return PlainTextResponse(generate_latest(collector_registry), media_type="text/plain; version=0.0.4")


class _Collector:
    def __init__(self, push: PushServer, traces: TraceStore, guard: ApiGuard) -> None:
        self.push = push
        self.traces = traces
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        push, stats = self.push, self.push.registry.stats()
        yield _gauge("meshlet_cp_connected_sidecars", "Sidecars with an open push channel.", len(push.hub.sessions))
        yield _counter("meshlet_cp_pushes", "Pushes sent to sidecars.", push.hub.pushes_total)
        yield _counter("meshlet_cp_nacks", "Pushes a sidecar rejected.", push.hub.nacks_total)
        yield _counter("meshlet_cp_protocol_errors", "Sessions ended by a protocol error.", push.protocol_errors)
        yield _gauge("meshlet_cp_spans_stored", "Spans in the embedded trace store.", self.traces.span_count)
        yield _counter("meshlet_cp_spans_evicted", "Spans let go to keep the trace store bounded.", self.traces.dropped)
        yield _gauge("meshlet_cp_registry_instances", "Registered instances.", stats.instances)
        yield _gauge("meshlet_cp_registry_ready_instances", "Registered instances that are ready.", stats.ready)
        yield _gauge(
            "meshlet_cp_self_preservation",
            "1 while self-preservation freezes lease expiry.",
            int(stats.self_preservation),
        )
        yield _gauge(
            "meshlet_cp_store_conflicts",
            "Connected sidecars that keep policies this control plane's store lacks (an empty or foreign store).",
            push.store_conflicts(),
        )
        yield _gauge("meshlet_cp_push_connections", "Open push-channel connections (hello or not).", push.connections)
        yield _counter(
            "meshlet_cp_hello_timeouts",
            "Push-channel connections closed because no hello came in time (HELLO_TIMEOUT, 5 s).",
            push.hello_timeouts.count,
        )
        yield _by_reason(
            "meshlet_cp_sessions_ended",
            "Sidecar sessions the control plane ended that were no failure: max-age, after --max-session-age.",
            {"max-age": push.max_age.ended},
        )
        refused = CounterMetricFamily(
            "meshlet_cp_connections_refused",
            "Push-channel connections closed at once because a cap was reached.",
            labels=["cap"],
        )
        for cap, count in sorted(push.refused.items()):
            refused.add_metric([cap], count)
        yield refused
        if push.joins is not None:
            yield from _joins(push)
        yield _counter(
            "meshlet_cp_registrations_restored",
            "Registrations put back when a sidecar whose lease ran out (a paused process) spoke again.",
            stats.restored_total,
        )
        yield from _refusals(push)
        yield _convergence(push.hub.convergence)
        api_refused = CounterMetricFamily(
            "meshlet_cp_api_refused",
            "API requests refused (401) for lack of a token, by the token they needed.",
            labels=["need"],
        )
        for need, count in sorted(self.guard.refused.items()):
            api_refused.add_metric([need], count)
        yield api_refused


class _ReplicaCollector:
    """A replica on etcd: what an operator alerts on (no leader, etcd cut off, writes piling up)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        replica = self.replica
        yield _gauge("meshlet_cp_replicas", "Control-plane replicas with a card in etcd.", len(replica.shared.cards))
        yield _gauge(
            "meshlet_cp_leader", "1 while this replica leads (CA rotation, compaction).", int(replica.is_leader)
        )
        yield _gauge(
            "meshlet_cp_etcd_watching",
            "1 while this replica's watch on etcd is open (0: it pushes what it last saw).",
            int(replica.watching),
        )
        yield _gauge(
            "meshlet_cp_etcd_writes_waiting",
            "Registry changes of this replica's sessions not yet written to etcd.",
            replica.writer.backlog,
        )
        yield _counter("meshlet_cp_etcd_relists", "Full listings after etcd compacted past the watch.", replica.relists)
        yield _gauge(
            "meshlet_cp_lease_expiry_held",
            "Instances lost with a replica's etcd lease, held by the safety valve.",
            len(replica.shared.held),
        )


def _refusals(push: PushServer) -> Iterator[Metric]:
    """What sessions claimed and were not given (control_plane/ownership.py, span_tokens.py)."""
    yield _counter(
        "meshlet_cp_claims_refused",
        "Hellos refused because their instance id or node belongs to another session (instance-in-use).",
        push.claims.refused.count,
    )
    yield _counter(
        "meshlet_cp_admin_refused",
        "Registrations whose admin address is not on the session's host: accepted, never scraped.",
        push.admin_refused.count,
    )
    tokens = push.span_tokens
    yield _by_reason(
        "meshlet_cp_spans_refused",
        "Spans dropped from a batch: not of the service the span token was given to.",
        tokens.spans_refused,
    )
    yield _by_reason(
        "meshlet_cp_span_posts_refused",
        "Span batches refused (401): no token, or not a live span token nor the API token.",
        tokens.posts_refused,
    )


def _by_reason(name: str, help: str, counts: dict[str, int]) -> CounterMetricFamily:
    counter = CounterMetricFamily(name, help, labels=["reason"])
    for reason, count in sorted(counts.items()):
        counter.add_metric([reason], count)
    return counter


def _joins(push: PushServer) -> Iterator[Metric]:
    assert push.joins is not None
    joins = CounterMetricFamily(
        "meshlet_cp_joins_refused",
        "Hellos refused because they did not prove the service they name (no join token, an invalid, "
        "expired or other service's token, a bad client certificate).",
        labels=["reason"],
    )
    for reason, count in sorted(push.joins.refused.items()):
        joins.add_metric([reason], count)
    yield joins
    yield _counter(
        "meshlet_cp_certificates_issued", "Certificates issued to sidecars (joins and renewals).", push.joins.issued
    )


def _convergence(samples: list[float]) -> HistogramMetricFamily:
    buckets = [(repr(bound), sum(1 for s in samples if s <= bound)) for bound in CONVERGENCE_BUCKETS]
    buckets.append(("+Inf", len(samples)))
    histogram = HistogramMetricFamily(
        "meshlet_cp_convergence_seconds",
        "From a change to a sidecar's ACK of the push carrying it (the most recent 10,000 ACKs).",
    )
    histogram.add_metric([], buckets, sum(samples))
    return histogram


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    counter = CounterMetricFamily(name, help)
    counter.add_metric([], value)
    return counter


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, help)
    gauge.add_metric([], value)
    return gauge
