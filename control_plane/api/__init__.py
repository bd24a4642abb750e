"""The control plane's HTTP API (JSON), read by the `meshlet` CLI (meshlet/cli/client.py), the
dashboard and Prometheus. Starlette on hypercorn's trio worker.

Each module answers for one resource and is given only what it reads: registry.py (services,
endpoints, Prometheus's service discovery), status.py (the sidecars), ca.py (the certificate
authority's roots), policies.py (apply,
history, rollback), explain.py, stat.py (the sidecars' golden metrics), metrics.py (the
control plane's own), dashboard.py; traces are Zipkin's API (control_plane/zipkin.py).
replies.py holds the answers they share: the 400, the store's failure; guard.py who may
read and write (the tokens) and whether a reader sees the policy's secrets.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp

from ..ca_rotation import Rotation
from ..replicas.engine import Replica
from ..scraper import Scraper
from ..server import PushServer
from ..token_records import TokenBook
from ..traces import TraceStore
from ..zipkin import zipkin_routes
from .ca import CAApi
from .dashboard import Dashboard
from .explain import ExplainView
from .guard import ApiGuard
from .metrics import MetricsView
from .policies import PolicyApi
from .registry import RegistryViews
from .stat import StatView
from .status import StatusView, live
from .tokens import TokenApi


def build_api(
    push: PushServer,
    token: str | None = None,
    traces: TraceStore | None = None,
    scraper: Scraper | None = None,
    *,
    read_token: str | None = None,
    tokens: TokenBook | None = None,
    rotation: Rotation | None = None,
    replica: Replica | None = None,
) -> ASGIApp:
    """``token``: what writes (PUT/POST) must carry as ``Authorization: Bearer TOKEN``
    (spans also take a sidecar's span token, control_plane/zipkin.py); a reader who
    presents it sees the policy unredacted. ``read_token``: when given, what reads under
    /v1 and of Zipkin's API need (or the write token); guard.py.
    ``traces``: the embedded trace store behind Zipkin's API.
    ``scraper``: reads the sidecars' metrics for /v1/stat, /v1/stream and the dashboard.
    ``tokens``: the join-token records ``POST /v1/tokens`` mints into (None: 404).
    ``rotation``: what ``POST /v1/ca/rotate`` rotates, whose state ``GET /v1/ca`` adds (None: the
    CA is only read; a control plane without a CA answers 404).
    ``replica``: this control plane's replica on etcd (None: a single control plane), whose
    replicas, leader and etcd's health /v1/status adds."""
    traces = traces if traces is not None else TraceStore()
    guard = ApiGuard(token, read_token)
    registry = RegistryViews(push.registry)
    status = StatusView(push, replica)
    policies = PolicyApi(push, guard)
    stat = StatView(scraper)
    dashboard = Dashboard(push, traces, scraper)
    authority = CAApi(push.joins, rotation, guard)
    app = Starlette(
        routes=[
            Route("/v1/services", registry.services),
            Route("/v1/endpoints", registry.endpoints),
            Route("/v1/status", status.status),
            Route("/metrics", MetricsView(push, traces, guard, replica).metrics),
            Route("/v1/prometheus/targets", registry.prometheus_targets),
            Route("/v1/stat", stat.stat),
            Route("/v1/dashboard", dashboard.data),
            Route("/v1/stream", stat.stream),
            Route("/", dashboard.page),
            Route("/v1/policies", policies.policies, methods=["GET", "PUT"]),
            Route("/v1/policies/history", policies.history),
            Route("/v1/policies/rollback", policies.rollback, methods=["POST"]),
            Route("/v1/explain", ExplainView(push, guard).explain),
            Route("/v1/tokens", TokenApi(tokens, guard).create, methods=["POST"]),
            Route("/v1/ca", authority.status),
            Route("/v1/ca/rotate", authority.rotate, methods=["POST"]),
            Route("/live", live),
            Route("/ready", live),
            *zipkin_routes(traces, push.span_tokens, token),
        ]
    )
    return guard.gate(app)


__all__ = ["build_api"]
