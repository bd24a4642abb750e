"""What the admin listener shows of one sidecar (sidecar/net/admin_views.py), read from the
units it is given; the HTTP side is covered by tests/integration (metrics, lifecycle)."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from meshlet.io import Deadlines
from sidecar.core.config import MeshSnapshot, empty_snapshot, load_static
from sidecar.core.destination import Destinations
from sidecar.core.services import Endpoint
from sidecar.layers.explain import Explanations
from sidecar.net.admin_views import AdminViews
from sidecar.net.listeners import Listeners
from sidecar.net.upstream import UpstreamPools
from sidecar.telemetry import Telemetry

STATIC = """\
services:
  item:
    endpoints: ["10.0.0.1:8080"]
"""


@dataclass
class Sidecar:
    """The state a sidecar keeps, which the views read."""

    listeners: Listeners
    pools: UpstreamPools
    configured: trio.Event
    snapshot: MeshSnapshot


def _sidecar() -> tuple[Sidecar, AdminViews]:
    deadlines = Deadlines()
    state = Sidecar(Listeners(deadlines, header_timeout=1.0), UpstreamPools(), trio.Event(), empty_snapshot())
    views = AdminViews(
        service="user",
        app=("127.0.0.1", 8080),
        telemetry=Telemetry(),
        pools=state.pools,
        destinations=Destinations(),
        explanations=Explanations(),
        listeners=state.listeners,
        clock=deadlines.clock,
        configured=state.configured,
        snapshot=lambda: state.snapshot,
        control=lambda: None,
    )
    return state, views


def test_ready_once_configured_and_not_while_draining() -> None:
    sidecar, views = _sidecar()
    assert views.readiness() == (False, "no configuration applied yet")
    sidecar.configured.set()
    assert views.readiness() == (True, "")
    views.draining = True
    assert views.readiness() == (False, "draining (stopping)")


def test_config_dump_shows_the_current_snapshot_and_the_listeners_as_bound() -> None:
    sidecar, views = _sidecar()
    sidecar.listeners.addresses["inbound"] = ("0.0.0.0", 15006)
    sidecar.snapshot = load_static(STATIC, "static.yaml")
    dump = views.config_dump()
    assert dump["control_plane"] is None  # static mode
    assert dump["service"] == "user"
    assert dump["app"] == "127.0.0.1:8080"
    assert dump["listeners"] == {"inbound": "0.0.0.0:15006"}
    assert dump["config"] == sidecar.snapshot.to_json()
    assert views.metrics_status() == (sidecar.snapshot.version, None)


def test_clusters_are_the_upstream_pools_by_service() -> None:
    sidecar, views = _sidecar()
    assert views.clusters() == {}
    sidecar.pools.get(Endpoint("10.0.0.1", 8080), "item")
    assert views.clusters() == {
        "item": [
            {
                "endpoint": "10.0.0.1:8080",
                "active_connections": 0,
                "idle_connections": 0,
                "connections_opened": 0,
                "requests": 0,
                "errors": 0,
                "overflows": 0,
                "h2_connections": 0,
                "h2_streams": 0,
                "h2_connections_opened": 0,
                "h2_requests": 0,
                "h2_errors": 0,
                "h2_retries": 0,
            }
        ]
    }


def test_a_worker_snapshot_holds_what_the_supervisor_adds_up() -> None:
    """sidecar/workers.py reads these keys from every worker."""
    snapshot = _sidecar()[1].worker_snapshot()
    assert set(snapshot) == {"telemetry", "clusters", "config_dump", "explanations"}
    assert snapshot["explanations"] == []
