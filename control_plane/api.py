"""The control plane's HTTP API (JSON), read by `meshlet get`, `meshlet status` and
Prometheus. Starlette on hypercorn's trio worker."""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .push import Session
from .server import PushServer

CONVERGENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _sessions(push: PushServer) -> list[Session]:
    """Connected sidecars, and those whose channel closed while their lease still holds
    (a sidecar that bye'd or expired is forgotten here)."""
    departed = push.hub.departed
    for node, session in list(departed.items()):
        if push.registry.get(session.instance_id) is None:
            del departed[node]
    return [*push.hub.sessions.values(), *departed.values()]


def build_api(push: PushServer) -> Starlette:
    registry = push.registry

    def instance_json(instance: Any) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "id": instance.instance_id,
            "service": instance.service,
            "address": instance.address,
            "admin": instance.admin,
            "labels": dict(instance.labels),
            "node": instance.node,
            "ready": instance.ready,
            "connected": registry.is_connected(instance.instance_id),
            "lease_expires_in": round(registry.lease_expires_at(instance.instance_id) - now, 3),
        }

    async def services(request: Request) -> Response:
        out = []
        for name in registry.services():
            instances = registry.all_endpoints(name)
            out.append(
                {
                    "name": name,
                    "instances": len(instances),
                    "ready": sum(i.ready for i in instances),
                    "version": registry.version(name),
                }
            )
        return JSONResponse({"services": out})

    async def endpoints(request: Request) -> Response:
        wanted = request.query_params.get("service")
        names = [wanted] if wanted else registry.services()
        return JSONResponse(
            {"endpoints": {name: [instance_json(i) for i in registry.all_endpoints(name)] for name in names}}
        )

    async def status(request: Request) -> Response:
        stats = registry.stats()
        now = trio.current_time()
        return JSONResponse(
            {
                "sidecars": sorted((s.to_json(now) for s in _sessions(push)), key=lambda s: s["node"]),
                "registry": {
                    "instances": stats.instances,
                    "ready": stats.ready,
                    "services": stats.services,
                    "connected": stats.connected,
                    "self_preservation": stats.self_preservation,
                    "self_preservation_reason": stats.self_preservation_reason,
                    "expired_total": stats.expired_total,
                },
                "pushes_total": push.hub.pushes_total,
                "nacks_total": push.hub.nacks_total,
            }
        )

    async def metrics(request: Request) -> Response:
        collector_registry = CollectorRegistry(auto_describe=False)
        collector_registry.register(_Collector(push))
        return PlainTextResponse(generate_latest(collector_registry), media_type="text/plain; version=0.0.4")

    async def live(request: Request) -> Response:
        return PlainTextResponse("live\n")

    return Starlette(
        routes=[
            Route("/v1/services", services),
            Route("/v1/endpoints", endpoints),
            Route("/v1/status", status),
            Route("/metrics", metrics),
            Route("/live", live),
            Route("/ready", live),
        ]
    )


class _Collector:
    def __init__(self, push: PushServer) -> None:
        self.push = push

    def collect(self) -> Any:
        push, stats = self.push, self.push.registry.stats()
        yield _gauge("meshlet_cp_connected_sidecars", "Sidecars with an open push channel.", len(push.hub.sessions))
        pushes = CounterMetricFamily("meshlet_cp_pushes", "Pushes sent to sidecars.")
        pushes.add_metric([], push.hub.pushes_total)
        yield pushes
        nacks = CounterMetricFamily("meshlet_cp_nacks", "Pushes a sidecar rejected.")
        nacks.add_metric([], push.hub.nacks_total)
        yield nacks
        errors = CounterMetricFamily("meshlet_cp_protocol_errors", "Sessions ended by a protocol error.")
        errors.add_metric([], push.protocol_errors)
        yield errors
        yield _gauge("meshlet_cp_registry_instances", "Registered instances.", stats.instances)
        yield _gauge("meshlet_cp_registry_ready_instances", "Registered instances that are ready.", stats.ready)
        yield _gauge(
            "meshlet_cp_self_preservation", "1 while lease expiry is frozen (PRODUCT §5).", int(stats.self_preservation)
        )
        samples = push.hub.convergence
        buckets, total = [], 0.0
        for bound in CONVERGENCE_BUCKETS:
            buckets.append((repr(bound), sum(1 for s in samples if s <= bound)))
        buckets.append(("+Inf", len(samples)))
        total = sum(samples)
        histogram = HistogramMetricFamily(
            "meshlet_cp_convergence_seconds",
            "From a change to a sidecar's ACK of the push carrying it (the most recent 10,000 ACKs).",
        )
        histogram.add_metric([], buckets, total)
        yield histogram


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, help)
    gauge.add_metric([], value)
    return gauge
