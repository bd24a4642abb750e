"""What the admin listener shows of one sidecar: /ready, /config_dump, /clusters, /explain,
/metrics and /metrics/cardinality, and the snapshot a ``--workers`` supervisor adds up.

Views only read: the sidecar owns the state, and hands each view what it reads. The routes
themselves are net/admin.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..core.config import MeshSnapshot
from ..core.destination import Destinations
from ..layers.explain import Explanations
from ..telemetry import Telemetry, cardinality, render
from .admin import AdminHandler
from .listeners import Listeners
from .upstream import UpstreamPools

if TYPE_CHECKING:  # a static sidecar has neither (nor cryptography): see sidecar/app.py
    from .control import ControlPlaneClient
    from .identity import SidecarIdentity


def control_dump(control: ControlPlaneClient, identity: SidecarIdentity | None) -> dict[str, Any]:
    """/config_dump's ``control_plane``: the session, and who it proves this sidecar is."""
    return {
        "addresses": [f"{h}:{p}" for h, p in control.addresses],
        "connected": control.connected,
        "instance": control.instance.instance_id,
        "pushes_applied": control.pushes_applied,
        "nacks_sent": control.nacks_sent,
        "last_error": control.last_error,
        "policies_store": control.config.store,  # the store the policies held came from
        "store_conflict": list(control.store_conflict),  # policies kept against the control plane's
        "identity": None if identity is None else identity.describe(),
    }


class AdminViews:
    """``snapshot`` and ``control`` read the sidecar's current configuration and control
    plane client (None: static mode, or not started yet); ``configured`` is set with the
    first configuration applied."""

    def __init__(
        self,
        *,
        service: str,
        app: tuple[str, int],
        telemetry: Telemetry,
        pools: UpstreamPools,
        destinations: Destinations,
        explanations: Explanations,
        listeners: Listeners,
        clock: Callable[[], float],
        configured: trio.Event,
        snapshot: Callable[[], MeshSnapshot],
        control: Callable[[], ControlPlaneClient | None],
        identity: SidecarIdentity | None = None,
    ) -> None:
        self.service = service
        self.app = app
        self.telemetry = telemetry
        self.pools = pools
        self.destinations = destinations
        self.explanations = explanations
        self.listeners = listeners
        self.clock = clock
        self.configured = configured
        self.snapshot = snapshot
        self.control = control
        self.identity = identity  # None: no control plane, so no certificate to wait for
        self.draining = False  # set when the sidecar starts to stop: not ready any more

    def handler(self) -> AdminHandler:
        """The admin listener's handler, answering with these views."""
        return AdminHandler(
            metrics=self.metrics,
            ready=self.readiness,
            config_dump=self.config_dump,
            clusters=self.clusters,
            worker_snapshot=self.worker_snapshot,
            explain=self.explanations.get,
            cardinality=self.cardinality,
        )

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining (stopping)"
        if not self.configured.is_set():
            return False, "no configuration applied yet"
        if self.identity is not None and (why := self.identity.not_ready()):
            return False, why
        return True, ""

    def metrics(self) -> bytes:
        return render(lambda: [self.telemetry.snapshot()])

    def cardinality(self) -> dict[str, Any]:
        return cardinality(self.metrics(), self.telemetry)

    def config_dump(self) -> dict[str, Any]:
        control = self.control()
        host, port = self.app
        return {
            "control_plane": None if control is None else control_dump(control, self.identity),
            "service": self.service,
            "app": f"{host}:{port}",
            "listeners": {name: f"{h}:{p}" for name, (h, p) in self.listeners.addresses.items()},
            "config": self.snapshot().to_json(),
        }

    def clusters(self) -> dict[str, list[dict[str, Any]]]:
        """Upstream connection pools by service, one row per endpoint: its HTTP/1.1 pool,
        and its HTTP/2 one (``h2_``) when requests went to it in HTTP/2."""
        out: dict[str, list[dict[str, Any]]] = {}
        pools, h2_pools = self.pools.pools, self.pools.h2_pools
        for host, port in sorted(pools.keys() | h2_pools.keys()):
            service = self.pools.services.get((host, port), "")
            pool, h2_pool = pools.get((host, port)), h2_pools.get((host, port))
            out.setdefault(service, []).append(
                {
                    "endpoint": f"{host}:{port}",
                    "active_connections": 0 if pool is None else pool.active,
                    "idle_connections": 0 if pool is None else len(pool.idle),
                    "connections_opened": 0 if pool is None else pool.connects,
                    "requests": 0 if pool is None else pool.requests,
                    "errors": 0 if pool is None else pool.errors,
                    "overflows": 0 if pool is None else pool.overflows,
                    "h2_connections": 0 if h2_pool is None else len(h2_pool.conns),
                    "h2_streams": 0 if h2_pool is None else sum(len(c.streams) for c in h2_pool.conns),
                    "h2_connections_opened": 0 if h2_pool is None else h2_pool.connects,
                    "h2_requests": 0 if h2_pool is None else h2_pool.requests,
                    "h2_errors": 0 if h2_pool is None else h2_pool.errors,
                    "h2_retries": 0 if h2_pool is None else h2_pool.retries,
                }
            )
        return out

    def worker_snapshot(self) -> dict[str, Any]:
        """What a ``--workers`` supervisor reads to add this worker's numbers to the others'."""
        return {
            "telemetry": self.telemetry.snapshot(),
            "clusters": self.clusters(),
            "config_dump": self.config_dump(),
            "explanations": list(self.explanations.by_id.values()),
        }

    # the sidecar's own gauges for /metrics (Telemetry calls these as it renders) -------------
    def destination_stats(self) -> list[tuple[str, int, dict[str, int]]]:
        """(destination, circuit state, endpoints by outlier state)."""
        now = self.clock()
        return [
            (key, int(d.breaker.state), d.outlier.counts(now)) for key, d in sorted(self.destinations.by_key.items())
        ]

    def metrics_status(self) -> tuple[str, int | None]:
        """The config version applied, and 1/0 for the control plane's channel (None in
        static mode)."""
        control = self.control()
        return self.snapshot().version, None if control is None else int(control.connected)
