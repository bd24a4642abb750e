"""The control plane's HTTP API (JSON), read by `meshlet get`, `meshlet status` and
Prometheus. Starlette on hypercorn's trio worker."""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from meshlet import wire
from meshlet.policy import PolicyError
from meshlet.wire import POLICIES

from . import golden
from .bodies import read_body
from .explain import explain
from .push import Session
from .scraper import Scraper
from .server import PushServer
from .store import StoreError, StoreFull
from .traces import TraceStore
from .zipkin import zipkin_routes

# The dashboard: one page, no build step, nothing fetched from elsewhere (control_plane/static).
DASHBOARD_HTML = (Path(__file__).parent / "static" / "dashboard.html").read_text()

log = logging.getLogger("meshlet.cp.api")

CONVERGENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _sessions(push: PushServer) -> list[Session]:
    """Connected sidecars, and those whose channel closed while their lease still holds
    (a sidecar that bye'd or expired is forgotten here)."""
    departed = push.hub.departed
    for node, session in list(departed.items()):
        if push.registry.get(session.instance_id) is None:
            del departed[node]
    return [*push.hub.sessions.values(), *departed.values()]


def _sessions_json(push: PushServer, now: float) -> list[dict[str, Any]]:
    registry = push.registry
    return sorted(
        (s.to_json(now, registered=registry.get(s.instance_id) is not None) for s in _sessions(push)),
        key=lambda s: s["node"],
    )


def build_api(
    push: PushServer, token: str | None = None, traces: TraceStore | None = None, scraper: Scraper | None = None
) -> Starlette:
    """``token``: what writes (PUT/POST) must carry as ``Authorization: Bearer TOKEN``
    (spans excepted: Zipkin's collector API is open, control_plane/zipkin.py).
    ``traces``: the embedded trace store behind Zipkin's API."""
    registry = push.registry
    traces = traces if traces is not None else TraceStore()

    def refused(request: Request) -> Response | None:
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return JSONResponse(
            {
                "problems": [
                    "writing needs the control plane's token (Authorization: Bearer ...); it is in its data "
                    "directory, file api-token (meshlet apply --token-file PATH, or MESHLET_TOKEN)"
                ]
            },
            status_code=401,
        )

    def instance_json(instance: Any) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "id": instance.instance_id,
            "service": instance.service,
            "address": instance.address,
            "admin": instance.admin,
            "labels": dict(instance.labels),
            "app_port": instance.app_port,
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
                "sidecars": _sessions_json(push, now),
                "registry": {
                    "instances": stats.instances,
                    "ready": stats.ready,
                    "services": stats.services,
                    "connected": stats.connected,
                    "self_preservation": stats.self_preservation,
                    "self_preservation_reason": stats.self_preservation_reason,
                    "expired_total": stats.expired_total,
                    "restored_total": stats.restored_total,
                },
                "pushes_total": push.hub.pushes_total,
                "nacks_total": push.hub.nacks_total,
            }
        )

    async def stat(request: Request) -> Response:
        # Golden metrics over a window, from the sidecars' own counters (control_plane/golden.py).
        by = request.query_params.get("by", "service")
        if by not in golden.BY:
            return _bad(f"by must be one of {', '.join(golden.BY)}")
        try:
            window = float(request.query_params.get("window", "30"))
        except ValueError:
            return _bad("window must be a number of seconds")
        if not 1 <= window <= 300:
            return _bad("window must be between 1 and 300 seconds")
        if scraper is None:
            return JSONResponse({"problems": ["this control plane does not read sidecar metrics"]}, status_code=404)
        return JSONResponse(scraper.stat(by, window))

    async def dashboard_data(request: Request) -> Response:
        # Everything the dashboard draws, in one answer (it asks every 2 s while open).
        now = trio.current_time()
        window = 30.0
        services = {name: [instance_json(i) for i in registry.all_endpoints(name)] for name in registry.services()}
        data: dict[str, Any] = {
            "services": services,
            "sidecars": _sessions_json(push, now),
            "policy_version": push.policies.version if push.policies is not None else "",
            # the same policy as the sidecars name it in their ACKs (their "policies" version)
            "policy_push_version": _policies_push_version(push),
            "window_seconds": window,
            "traces": [_trace_summary(t) for t in traces.traces(limit=12, now=time.time())],
        }
        if scraper is not None:
            scraper.wanted()
            windows = scraper.windows(window)  # once: both groupings are sums of the same windows
            data["stat"] = {by: [row.to_json() for row in golden.rows(windows, by)] for by in ("service", "edge")}
            data["health"] = scraper.health(window)
            data["warming_up"] = not windows and bool(services)
        return JSONResponse(data)

    async def stream(request: Request) -> Response:
        # Hystrix's event stream (what Hystrix dashboards and Turbine read): every second, per
        # destination, a HystrixCommand event with the circuit state and the rolling counts of
        # the last 10 s (Hystrix's default rolling window), over every calling sidecar.
        if scraper is None:
            return JSONResponse({"problems": ["this control plane does not read sidecar metrics"]}, status_code=404)

        async def events() -> Any:
            while True:
                scraper.wanted()
                for event in hystrix_events(scraper, HYSTRIX_WINDOW):
                    yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
                yield ": ping\n\n"  # a comment line: keeps proxies from closing an idle stream
                await trio.sleep(1.0)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
        )

    async def dashboard_page(request: Request) -> Response:
        return HTMLResponse(DASHBOARD_HTML)

    async def prometheus_targets(request: Request) -> Response:
        # Prometheus HTTP service discovery (http_sd_configs): one target group per sidecar,
        # its admin listener, labelled with what an operator filters by. Not-ready sidecars
        # are listed too: their metrics say why they are not ready.
        return JSONResponse([prometheus_target(instance) for instance in registry.instances()])

    async def metrics(request: Request) -> Response:
        collector_registry = CollectorRegistry(auto_describe=False)
        collector_registry.register(_Collector(push, traces))
        return PlainTextResponse(generate_latest(collector_registry), media_type="text/plain; version=0.0.4")

    async def live(request: Request) -> Response:
        return PlainTextResponse("live\n")

    # policy ------------------------------------------------------------------------------
    apply_lock = trio.Lock()  # one apply at a time: each diffs against what the last one left

    async def policies(request: Request) -> Response:
        store = push.policies
        assert store is not None
        if request.method == "PUT":
            if (denied := refused(request)) is not None:
                return denied
            body = await _json_body(request)
            if isinstance(body, Response):
                return body
            files = body.get("files")
            if not isinstance(files, list) or not all(
                isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f) for f in files
            ):
                return _bad('"files" must be a list of [name, text] pairs')
            return await _apply(
                lambda: store.apply(
                    [(name, text) for name, text in files],
                    source=str(body.get("source", "PUT /v1/policies")),
                    now=time.time(),
                    dry_run=bool(body.get("dry_run", False)),
                )
            )
        current = store.current
        return JSONResponse(
            {
                "version": store.version,
                # What a sidecar's ACK of the policies type names once it holds this version
                # (meshlet apply waits for it).
                "push_version": _policies_push_version(push),
                "applied": None if current is None else current.to_json(with_files=True),
                "documents": [
                    {"kind": name.split("/", 1)[0], "name": name.split("/", 1)[1], "version": version}
                    for name, (version, _) in sorted(push.wanted(POLICIES).items())
                ],
            }
        )

    async def history(request: Request) -> Response:
        assert push.policies is not None
        try:
            versions = await push.policies.history()
        except StoreError as exc:
            return _store_failed(exc)
        return JSONResponse({"history": [v.to_json() for v in versions]})

    async def rollback(request: Request) -> Response:
        store = push.policies
        assert store is not None
        if (denied := refused(request)) is not None:
            return denied
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        version = body.get("version")
        if not isinstance(version, str) or not version:
            return _bad('"version" must be a version string (meshlet get policies --history)')
        return await _apply(lambda: store.rollback(version, now=time.time()))

    async def explain_request(request: Request) -> Response:
        url = request.query_params.get("url")
        if not url:
            return _bad("give url, e.g. /v1/explain?url=http://item/items/1 (and method, header=k:v, from)")
        headers = []
        for item in request.query_params.getlist("header"):
            name, sep, value = item.partition(":")
            if not sep or not name.strip():
                return _bad(f"header {item!r}: expected NAME:VALUE")
            headers.append((name.strip(), value.strip()))
        endpoints = {
            name: [
                {"id": i.instance_id, "address": i.address, "labels": dict(i.labels)} for i in registry.endpoints(name)
            ]
            for name in registry.services()
        }
        documents = push.policies.documents if push.policies is not None else []
        return JSONResponse(
            explain(
                url,
                documents,
                endpoints,
                method=request.query_params.get("method", "GET").upper(),
                headers=headers,
                source=request.query_params.get("from"),
            )
        )

    async def _apply(run: Any) -> Response:
        async with apply_lock:
            before = dict(push.wanted(POLICIES))
            try:
                result = await run()
            except PolicyError as exc:
                return JSONResponse({"problems": exc.problems}, status_code=422)
            except StoreError as exc:
                return _store_failed(exc)
            if result.applied:
                push.policies_changed(before)
                log.info("policy version %s applied (%d changes)", result.version, len(result.changes))
            return JSONResponse(result.to_json())

    return Starlette(
        routes=[
            Route("/v1/services", services),
            Route("/v1/endpoints", endpoints),
            Route("/v1/status", status),
            Route("/metrics", metrics),
            Route("/v1/prometheus/targets", prometheus_targets),
            Route("/v1/stat", stat),
            Route("/v1/dashboard", dashboard_data),
            Route("/v1/stream", stream),
            Route("/", dashboard_page),
            Route("/v1/policies", policies, methods=["GET", "PUT"]),
            Route("/v1/policies/history", history),
            Route("/v1/policies/rollback", rollback, methods=["POST"]),
            Route("/v1/explain", explain_request),
            Route("/live", live),
            Route("/ready", live),
            *zipkin_routes(traces),
        ]
    )


class _Collector:
    def __init__(self, push: PushServer, traces: TraceStore) -> None:
        self.push = push
        self.traces = traces

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
        yield _gauge("meshlet_cp_spans_stored", "Spans in the embedded trace store.", self.traces.span_count)
        evicted = CounterMetricFamily("meshlet_cp_spans_evicted", "Spans let go to keep the trace store bounded.")
        evicted.add_metric([], self.traces.dropped)
        yield evicted
        yield _gauge("meshlet_cp_registry_instances", "Registered instances.", stats.instances)
        yield _gauge("meshlet_cp_registry_ready_instances", "Registered instances that are ready.", stats.ready)
        yield _gauge(
            "meshlet_cp_self_preservation",
            "1 while self-preservation freezes lease expiry.",
            int(stats.self_preservation),
        )
        yield _gauge("meshlet_cp_push_connections", "Open push-channel connections (hello or not).", push.connections)
        refused = CounterMetricFamily(
            "meshlet_cp_connections_refused",
            "Push-channel connections closed at once because a cap was reached.",
            labels=["cap"],
        )
        for cap, count in sorted(push.refused.items()):
            refused.add_metric([cap], count)
        yield refused
        restored = CounterMetricFamily(
            "meshlet_cp_registrations_restored",
            "Registrations put back when a sidecar whose lease ran out (a paused process) spoke again.",
        )
        restored.add_metric([], stats.restored_total)
        yield restored
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


HYSTRIX_WINDOW = 10.0  # seconds: Hystrix's metrics.rollingStats.timeInMilliseconds default


def hystrix_events(scraper: Scraper, window: float) -> list[dict[str, Any]]:
    """One HystrixCommand event per destination the sidecars call (hystrix-core's
    HystrixStreamingOutputProvider fields a dashboard needs)."""
    health = scraper.health(window)
    out = []
    for row in golden.rows(scraper.windows(window), "destination"):
        state = health.get(row.name, {})
        requests = int(row.requests)
        failures = requests - round(requests * (row.success if row.success is not None else 1.0))
        latencies = {"50": row.p50, "90": row.p95, "99": row.p99}  # 90: nearest we keep (p95)
        reasons = row.reasons
        out.append(
            {
                "type": "HystrixCommand",
                "name": row.name,
                "group": "meshlet",
                "currentTime": int(time.time() * 1000),
                "isCircuitBreakerOpen": bool(state.get("open")),
                "circuitOpenOn": state.get("open", 0),  # sidecars (each keeps its own breaker)
                "errorPercentage": round(100 * failures / requests) if requests else 0,
                "errorCount": failures,
                "requestCount": requests,
                "rollingCountSuccess": requests - failures,
                "rollingCountFailure": failures,
                "rollingCountShortCircuited": int(reasons.get("circuit-open", 0)),
                "rollingCountTimeout": int(reasons.get("timeout", 0)),
                "rollingCountThreadPoolRejected": 0,  # no thread pools: bulkheads are semaphores
                "rollingCountSemaphoreRejected": int(reasons.get("overloaded", 0)),
                "latencyTotal_mean": round((row.p50 or 0) * 1000),
                "latencyTotal": {k: round((v or 0) * 1000) for k, v in latencies.items()},
                "reportingHosts": 1,
                "propertyValue_metricsRollingStatisticalWindowInMilliseconds": int(window * 1000),
                "rollingRps": round(row.rps, 3),
            }
        )
    return out


def _policies_push_version(push: PushServer) -> str:
    """The policy as the sidecars name it in their ACKs: the version of the policies type."""
    return wire.type_version({name: version for name, (version, _) in push.wanted(POLICIES).items()})


def _trace_summary(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """One line of the dashboard's recent traces: where it entered, how long, any error."""
    root = next((s for s in spans if not s.get("parentId")), spans[0])
    start = min(s.get("timestamp", 0) for s in spans)
    end = max(s.get("timestamp", 0) + s.get("duration", 0) for s in spans)
    return {
        "traceId": root["traceId"],
        "service": (root.get("localEndpoint") or {}).get("serviceName", ""),
        "name": root.get("name", ""),
        "timestamp": start,
        "duration": end - start,
        "spans": len(spans),
        "error": any("error" in (s.get("tags") or {}) for s in spans),
    }


def prometheus_target(instance: Any) -> dict[str, Any]:
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
    return {"targets": [instance.admin], "labels": labels}


MAX_API_BODY = 4 * 1024 * 1024  # a PUT of policy files or a rollback; read with a running count


async def _json_body(request: Request) -> dict[str, Any] | Response:
    raw = await read_body(request, MAX_API_BODY)
    if isinstance(raw, Response):
        return raw
    try:
        body = json.loads(raw)
    except ValueError:
        return _bad("the body must be JSON")
    if not isinstance(body, dict):
        return _bad("the body must be a JSON object")
    return body


def _store_failed(exc: StoreError) -> Response:
    """The store could not be read or written: say which file and what to do, never a traceback.
    A full disk is 507 Insufficient Storage (WebDAV's, as etcd and S3 gateways answer it)."""
    log.error("%s", exc)
    return JSONResponse({"problems": [str(exc)]}, status_code=507 if isinstance(exc, StoreFull) else 500)


def _bad(message: str) -> Response:
    return JSONResponse({"problems": [message]}, status_code=400)


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, help)
    gauge.add_metric([], value)
    return gauge
