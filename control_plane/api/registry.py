"""The registry as the API shows it: /v1/services, /v1/endpoints and Prometheus's HTTP service
discovery (/v1/prometheus/targets)."""

from __future__ import annotations

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..ownership import admin_target
from ..registry import Instance, Registry
from .replies import JSON


class RegistryViews:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def services(self, request: Request) -> Response:
        out = []
        for name in self.registry.services():
            instances = self.registry.all_endpoints(name)
            out.append(
                {
                    "name": name,
                    "instances": len(instances),
                    "ready": sum(i.ready for i in instances),
                    "version": self.registry.version(name),
                }
            )
        return JSONResponse({"services": out})

    async def endpoints(self, request: Request) -> Response:
        wanted = request.query_params.get("service")
        names = [wanted] if wanted else self.registry.services()
        return JSONResponse({"endpoints": endpoints_json(self.registry, names)})

    async def prometheus_targets(self, request: Request) -> Response:
        # Prometheus HTTP service discovery (http_sd_configs): one target group per sidecar,
        # its admin listener, labelled with what an operator filters by. Not-ready sidecars
        # are listed too: their metrics say why they are not ready.
        # Only admin addresses on the registering session's host: a registration must not make
        # Prometheus fetch another host either (control_plane/ownership.py).
        targets = ((i, admin_target(i.admin, i.owner)) for i in self.registry.instances())
        return JSONResponse([prometheus_target(i, target) for i, target in targets if target is not None])


def endpoints_json(registry: Registry, services: list[str]) -> dict[str, list[JSON]]:
    """Every instance of those services, ready or not (also the dashboard's "services")."""
    now = trio.current_time()
    return {name: [instance_json(registry, i, now) for i in registry.all_endpoints(name)] for name in services}


def instance_json(registry: Registry, instance: Instance, now: float) -> JSON:
    return {
        "id": instance.instance_id,
        "service": instance.service,
        "address": instance.address,
        "admin": instance.admin,
        "labels": dict(instance.labels),
        "app_port": instance.app_port,
        "protocol": instance.protocol,
        "node": instance.node,
        "ready": instance.ready,
        "connected": registry.is_connected(instance.instance_id),
        "lease_expires_in": round(registry.lease_expires_at(instance.instance_id) - now, 3),
    }


def prometheus_target(instance: Instance, target: str) -> JSON:
    """A target group in the http_sd_configs format: ``service`` and ``instance`` (the instance
    id, in place of Prometheus's default HOST:PORT) as labels; the rest as ``__meta_meshlet_*``
    for relabelling (node, readiness, the instance's own labels: zone, version...)."""
    labels = {
        "service": instance.service,
        "instance": instance.instance_id,
        "__meta_meshlet_node": instance.node,
        "__meta_meshlet_ready": "true" if instance.ready else "false",
        "__meta_meshlet_address": instance.address,
    }
    for key, value in instance.labels.items():
        name = "".join(c if c.isalnum() else "_" for c in key)
        labels[f"__meta_meshlet_label_{name}"] = value
    return {"targets": [target], "labels": labels}
