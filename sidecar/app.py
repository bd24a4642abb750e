"""The composition root: listeners, the request stacks built per config snapshot, admin.

Outbound stack (app → other services), outermost first:
    metrics → errors → [routing/balance, source header] → forwarder (upstream pool)
Inbound stack (other sidecars → local app):
    metrics → errors → [local app] → forwarder
(metrics sits outside errors so that the mesh's own error responses are counted;
[...] are synchronous filters run in one frame.)

A new snapshot rebuilds both stacks; the listeners read the current stack per request,
so a change takes effect on the next request and in-flight ones finish on the old one.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from meshlet.io import (
    BACKLOG,
    Connection,
    ConnectionLimit,
    Deadlines,
    derived_connection_limits,
    listen_socket,
    raise_open_files_limit,
    serve_socket,
)

from .core.config import Endpoint, MeshSnapshot, ServiceConfig, empty_snapshot, load_static
from .core.destination import Destinations
from .core.interception import REGISTRY_ONLY, AddressMap
from .core.spans import Endpoint as SpanEndpoint
from .core.spans import TracingSettings
from .layers.base import Filter, Handler, Request, Response, filters_layer
from .layers.errors import errors_layer
from .layers.explain import Explanations
from .layers.inbound import access_check, source_header, to_local_app
from .layers.metrics import metrics_layer
from .layers.mirror import Mirror
from .layers.resilience import resilience_layer
from .layers.routing import Discover, router, routing_layer
from .layers.tracing import Tracer, client_tracing, server_tracing
from .net.admin import AdminHandler
from .net.control import ControlPlaneClient, InstanceInfo
from .net.downstream import HEADER_TIMEOUT, Timeouts, serve_connection
from .net.exporter import SpanExporter
from .net.transparent import Passthrough, original_destination
from .net.upstream import Forwarder, UpstreamPools
from .telemetry import ListenerStats, Telemetry, cardinality, render

log = logging.getLogger("meshlet.sidecar")

# After saying bye: the control plane's debounce (0.1 s) and one push round trip to every
# caller take well under this; until then, callers may still pick this instance.
DRAIN_PROPAGATION = 1.0
METRICS_SWEEP_INTERVAL = 60.0  # seconds between looks for idle metric series


@dataclass
class SidecarOptions:
    service: str
    app: tuple[str, int]
    inbound: tuple[str, int] = ("0.0.0.0", 15006)
    outbound: tuple[str, int] = ("127.0.0.1", 15001)
    admin: tuple[str, int] = ("127.0.0.1", 15090)
    static: Path | None = None
    upstreams: dict[str, tuple[str, int]] = field(default_factory=dict)
    reuse_port: bool = False
    header_timeout: float = HEADER_TIMEOUT
    # Connections each listener may hold at once (the outbound one's limit is shared with the
    # --upstream listeners); None: derived from the open files limit (meshlet/io.py).
    max_inbound_connections: int | None = None
    max_outbound_connections: int | None = None
    max_admin_connections: int | None = None
    control_plane: list[tuple[str, int]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    advertise: str | None = None  # the host other sidecars reach our inbound listener at
    instance_id: str | None = None
    data_dir: Path | None = None  # where the last good config is persisted
    health_path: str = "/health"
    trace_collector: str | None = None  # a Zipkin v2 endpoint; MeshConfig's wins, the control plane's by default
    trace_sampling: float | None = None  # MeshConfig's wins; 1.0 by default
    drain_timeout: float = 30.0  # on SIGTERM: how long requests in flight may take to finish
    # The app's traffic reaches the outbound listener through iptables REDIRECT rules (meshlet
    # init-iptables): route each connection by its original destination; learn every service.
    transparent: bool = False


def build_outbound(
    route: Filter,
    forwarder: Forwarder,
    telemetry: Telemetry,
    service: str,
    destinations: Destinations,
    discover: Discover | None = None,
    mirror: Mirror | None = None,
    clock: Callable[[], float] = trio.current_time,
    explanations: Explanations | None = None,
    tracer: Tracer | None = None,
) -> Handler:
    handler: Handler = forwarder if tracer is None else client_tracing(forwarder, tracer)  # a span per attempt
    handler = resilience_layer(
        handler,
        destinations,
        clock=clock,
        on_retry=telemetry.retried,
        explanations=explanations,
        on_shadow=telemetry.shadow_destination_decision,
        discover=discover,  # a fallback service the app never called is looked up like one it calls
    )
    handler = routing_layer(handler, route, source_header(service), discover, mirror=mirror)
    handler = errors_layer(handler)
    return metrics_layer(handler, telemetry, "outbound", service)


def build_inbound(
    app: Endpoint,
    forwarder: Forwarder,
    telemetry: Telemetry,
    service: str,
    snapshot: MeshSnapshot | None = None,
    tracer: Tracer | None = None,
) -> Handler:
    filters = [to_local_app(app, service)]
    if snapshot is not None:
        access = access_check(
            snapshot.access.get(service), snapshot.shadow_access.get(service), telemetry.shadow_access_decision
        )
        if access is not None:
            filters.append(access)
    handler = filters_layer(forwarder, *filters)
    handler = errors_layer(handler)
    if tracer is not None:  # outside errors: the mesh's own answers get their span too
        handler = server_tracing(handler, tracer)
    return metrics_layer(handler, telemetry, "inbound", service)


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    timeouts: Timeouts,
    *,
    reuse_port: bool = False,
    stop_accepting: trio.Event | None = None,
    accept: Callable[[Connection], Awaitable[None]] | None = None,
    listen_after: trio.Event | None = None,
    limit: ConnectionLimit | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (port 0: any) and serve HTTP/1.1 with ``handler``; reports the
    bound port through ``task_status``. Once ``stop_accepting`` is set, the listener closes
    (new connections are refused) and this returns when the open connections are done.
    ``accept``: serves each connection instead (it may look at the socket first).
    ``listen_after``: the port is bound at once but refuses connections until it is set.
    ``limit``: the connections it may hold at once (shared with other listeners if given to them)."""
    listener = listen_socket(host, port, reuse_port=reuse_port, listen=listen_after is None)
    try:
        async with trio.open_nursery() as nursery:

            async def on_connection(io: Connection) -> None:
                await serve_connection(io, handler, timeouts)

            task_status.started(listener.getsockname()[1])
            with trio.CancelScope() as accepting:
                if stop_accepting is not None:
                    nursery.start_soon(_cancel_when_set, stop_accepting, accepting)
                if listen_after is not None:
                    await listen_after.wait()
                    listener.listen(BACKLOG)
                await serve_socket(listener, accept or on_connection, nursery, limit)
            listener.close()
    finally:
        listener.close()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class Sidecar:
    def __init__(self, options: SidecarOptions) -> None:
        self.options = options
        self.telemetry = Telemetry()
        self.deadlines = Deadlines()
        self.pools = UpstreamPools(clock=self.deadlines.clock)
        self.telemetry.connection_stats = self.pools.stats
        self.telemetry.pool_overflow_stats = self.pools.overflow_stats
        self.timeouts = Timeouts(self.deadlines, header=options.header_timeout)  # inbound: drained
        # The app's own calls (outbound, --upstream ports) are served until the sidecar exits:
        # its requests in flight may still need to call other services to finish.
        self.outbound_timeouts = Timeouts(self.deadlines, header=options.header_timeout)
        self.admin_timeouts = Timeouts(self.deadlines)  # the admin listener keeps serving while draining
        self.connection_limits: dict[str, ConnectionLimit] = {}  # by listener kind; set by serve()
        self.telemetry.listener_stats = self.listener_stats
        self.stop_accepting = trio.Event()
        self.draining = False
        self.forwarder = Forwarder(self.pools, self.deadlines)
        self.mirror = Mirror(self.forwarder, self.telemetry)
        self.app = Endpoint(*options.app)
        self.snapshot = empty_snapshot()
        self.config_ready = False
        # Set with the first configuration (pushed, persisted or static): the inbound listener
        # refuses connections until then, so no caller reaches the app unchecked (fail-closed).
        self.configured = trio.Event()
        self.inbound_handler = build_inbound(self.app, self.forwarder, self.telemetry, options.service)
        self.routes: dict[str | None, Filter] = {}  # listener (None: outbound, else --upstream name) → router
        self.destinations = Destinations(
            on_transition=self.telemetry.circuit_moved,
            on_eject=self.telemetry.ejected,
            local_zone=options.labels.get("zone"),  # endpoints in our zone first
        )
        self.telemetry.destination_stats = self.destination_stats
        self.telemetry.status = self.metrics_status
        self.explanations = Explanations()
        self.tracing = TracingSettings()  # MeshConfig's, as of the last snapshot
        self.exporter = SpanExporter(
            self._span_collector, on_dropped=self.telemetry.dropped_spans, on_sent=self.telemetry.exported_spans
        )
        self.trace_rng = random.Random()
        self.outbound_handler: Handler = build_outbound(
            router(self.snapshot),
            self.forwarder,
            self.telemetry,
            options.service,
            self.destinations,
            explanations=self.explanations,
        )
        self.upstream_handlers: dict[str, Handler] = {}
        self.control: ControlPlaneClient | None = None
        self.static_services: dict[str, ServiceConfig] = {}  # from --static, parsed once per (re)load
        self.addresses: dict[str, tuple[str, int]] = {}
        self.address_map = AddressMap()  # transparent mode: original destination → service
        self.passthrough = Passthrough()
        self._logged_addresses: set[tuple[str, int]] = set()
        self.admin_handler = AdminHandler(
            metrics=lambda: render(lambda: [self.telemetry.snapshot()]),
            ready=self.readiness,
            config_dump=self.config_dump,
            clusters=self.clusters,
            worker_snapshot=lambda: {
                "telemetry": self.telemetry.snapshot(),
                "clusters": self.clusters(),
                "config_dump": self.config_dump(),
                "explanations": list(self.explanations.by_id.values()),
            },
            explain=self.explanations.get,
            cardinality=lambda: cardinality(render(lambda: [self.telemetry.snapshot()]), self.telemetry),
        )

    # configuration ------------------------------------------------------------------
    def apply(self, snapshot: MeshSnapshot) -> None:
        """Install a snapshot: the next request runs on stacks built from it."""
        self._build(snapshot)
        self.config_ready = True
        self.configured.set()
        log.info("applied config %s from %s (%d services)", snapshot.version, snapshot.source, len(snapshot.services))

    def _build(self, snapshot: MeshSnapshot) -> None:
        service = self.options.service
        shadow = self.telemetry.shadow_decision
        routes: dict[str | None, Filter] = {None: router(snapshot, on_shadow=shadow)}
        routes.update((name, router(snapshot, name, on_shadow=shadow)) for name in self.options.upstreams)
        self.routes = routes
        discover = self._discoverer
        self.mirror.use(snapshot)
        mirror = self.mirror
        destinations = self.destinations
        clock = self.deadlines.clock
        destinations.configure(snapshot.services, snapshot.destinations, snapshot.shadow_destinations, clock())
        telemetry, forwarder = self.telemetry, self.forwarder
        telemetry.configure(snapshot.metrics)
        explanations = self.explanations
        tracer = self._tracer(snapshot)
        self.outbound_handler = build_outbound(
            routes[None],
            forwarder,
            telemetry,
            service,
            destinations,
            discover(None),
            mirror,
            clock,
            explanations,
            tracer,
        )
        self.inbound_handler = build_inbound(self.app, forwarder, telemetry, service, snapshot, tracer)
        if self.options.transparent:
            self.address_map = AddressMap.of(snapshot.services)
        self.upstream_handlers = {
            name: build_outbound(
                routes[name],
                forwarder,
                telemetry,
                service,
                destinations,
                discover(name),
                mirror,
                clock,
                explanations,
                tracer,
            )
            for name in self.options.upstreams
        }
        self.snapshot = snapshot

    def _tracer(self, snapshot: MeshSnapshot) -> Tracer:
        settings = snapshot.tracing
        if settings is None:
            default = TracingSettings()
            sampling = default.sampling if self.options.trace_sampling is None else self.options.trace_sampling
            settings = TracingSettings(sampling, default.formats, default.collector)
        self.tracing = settings
        return Tracer(
            self.options.service,
            SpanEndpoint(self.options.service),
            self.exporter.submit,
            sample_rate=settings.sampling,
            formats=settings.formats,
            rng=self.trace_rng,
            # With nowhere to send spans (no control plane, no collector) none are recorded.
            recording=bool(self.options.control_plane or self.options.trace_collector or settings.collector),
        )

    def _span_collector(self) -> str | None:
        """Where spans go: MeshConfig's collector, else --trace-collector, else the control
        plane's trace store (its welcome said where); None: nowhere yet (they wait, bounded)."""
        if self.tracing.collector:
            return self.tracing.collector
        if self.options.trace_collector:
            return self.options.trace_collector
        return self.control.span_collector if self.control is not None else None

    def destination_stats(self) -> list[tuple[str, int, dict[str, int]]]:
        """(destination, circuit state, endpoints by outlier state), for /metrics."""
        now = self.deadlines.clock()
        return [
            (key, int(d.breaker.state), d.outlier.counts(now)) for key, d in sorted(self.destinations.by_key.items())
        ]

    def _discoverer(self, listener: str | None) -> Discover | None:
        """With a control plane: look up a service this sidecar has not heard of, then
        route by the snapshot installed with the answer."""
        if self.control is None:
            return None

        async def discover(service: str) -> Filter:
            assert self.control is not None
            await self.control.discover(service)  # raises MeshError when it cannot be found
            return self.routes[listener]

        return discover

    def load_static(self) -> None:
        """Read --static (at start and on SIGHUP). With a control plane too, its endpoints
        are merged with the file's, so a reload keeps what was pushed."""
        path = self.options.static
        assert path is not None
        snapshot = load_static(path.read_text(), str(path))
        self.static_services = dict(snapshot.services)
        if self.control is not None:
            self.control.reinstall("static-reload")
        else:
            self.apply(snapshot)

    def _control_plane_client(self) -> ControlPlaneClient:
        opts = self.options
        inbound_host, inbound_port = self.addresses["inbound"]
        host = opts.advertise or (inbound_host if inbound_host not in ("0.0.0.0", "::") else "127.0.0.1")
        address = f"{host}:{inbound_port}"
        admin_host, admin_port = self.addresses["admin"]
        if admin_host in ("0.0.0.0", "::"):  # bound to every address: reported at the advertised host
            admin_host = host
        instance_id = opts.instance_id or f"{opts.service}-{host}-{inbound_port}"
        state_file = None
        if opts.data_dir is not None:
            # Per service, not per instance: any instance's last good config serves the
            # next one (whose port, and so default id, may differ).
            state_file = opts.data_dir / f"{opts.service}.json"
        app_host, app_port = opts.app
        return ControlPlaneClient(
            opts.control_plane,
            InstanceInfo(
                opts.service, instance_id, address, f"{admin_host}:{admin_port}", dict(opts.labels), app_port=app_port
            ),
            self.apply,
            static=lambda: self.static_services,
            app_health_url=f"http://{app_host}:{app_port}{opts.health_path}",
            state_file=state_file,
            watch_all=opts.transparent,
        )

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining (stopping)"
        if not self.config_ready:
            return False, "no configuration applied yet"
        return True, ""

    def config_dump(self) -> dict[str, Any]:
        control = self.control
        return {
            "control_plane": None
            if control is None
            else {
                "addresses": [f"{h}:{p}" for h, p in control.addresses],
                "connected": control.connected,
                "instance": control.instance.instance_id,
                "pushes_applied": control.pushes_applied,
                "nacks_sent": control.nacks_sent,
                "last_error": control.last_error,
            },
            "service": self.options.service,
            "app": f"{self.options.app[0]}:{self.options.app[1]}",
            "listeners": {name: f"{h}:{p}" for name, (h, p) in self.addresses.items()},
            "config": self.snapshot.to_json(),
        }

    def clusters(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (host, port), pool in sorted(self.pools.pools.items()):
            service = self.pools.services.get((host, port), "")
            out.setdefault(service, []).append(
                {
                    "endpoint": f"{host}:{port}",
                    "active_connections": pool.active,
                    "idle_connections": len(pool.idle),
                    "connections_opened": pool.connects,
                    "requests": pool.requests,
                    "errors": pool.errors,
                    "overflows": pool.overflows,
                }
            )
        return out

    # serving ------------------------------------------------------------------------
    async def _outbound(self, request: Request) -> Response:
        return await self.outbound_handler(request)

    async def _inbound(self, request: Request) -> Response:
        return await self.inbound_handler(request)

    async def _intercepted(self, io: Connection) -> None:
        """A connection to the outbound listener in transparent mode: routed by where the
        app was connecting to (sidecar/core/interception.py); one made to the listener on
        purpose is served as usual."""
        original = original_destination(io.sock)
        if original is None:
            await serve_connection(io, self._outbound, self.outbound_timeouts)
            return
        ip, port = original
        service = self.address_map.service(ip, port)
        telemetry = self.telemetry
        if service is not None:
            telemetry.intercepted("service", service)

            async def to_service(request: Request) -> Response:
                request.service = service  # the router takes it instead of the Host header
                return await self.outbound_handler(request)

            await serve_connection(io, to_service, self.outbound_timeouts)
            return
        try:
            if self.passthrough.is_own(io.sock.getpeername()[1]):
                telemetry.intercepted("loop")
                self._log_once(
                    ip,
                    port,
                    "a passthrough connection of this sidecar came back to it: the iptables rules do "
                    "not exempt its own traffic (run the sidecar as the uid given to init-iptables --proxy-uid)",
                )
                io.reset()
                return
            if self.snapshot.outbound_traffic_policy == REGISTRY_ONLY:
                telemetry.intercepted("blocked")
                self._log_once(
                    ip,
                    port,
                    "refused: no service has this address and outbound_traffic_policy is REGISTRY_ONLY "
                    "(allow it with a Service document if it speaks HTTP, else with init-iptables "
                    "--exclude-outbound-ports or --exclude-outbound-cidrs)",
                )
                io.reset()
                return
            telemetry.intercepted("passthrough")
            await self.passthrough.relay(io, ip, port)
        except (OSError, trio.TooSlowError):
            io.reset()  # as the app would have seen it: the destination did not answer
        finally:
            io.close()

    def _log_once(self, ip: str, port: int, what: str) -> None:
        """One line per address, not per connection (a bounded set: at most 1,000 kept)."""
        if (ip, port) in self._logged_addresses:
            return
        if len(self._logged_addresses) >= 1000:
            self._logged_addresses.clear()
        self._logged_addresses.add((ip, port))
        log.warning("outbound connection to %s:%d %s", ip, port, what)

    def _fixed(self, name: str) -> Handler:
        async def handle(request: Request) -> Response:
            return await self.upstream_handlers[name](request)

        return handle

    async def serve(
        self, *, task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        opts = self.options
        if opts.static is not None:
            self.load_static()
        wanted: list[tuple[str, tuple[str, int], Handler]] = [
            ("outbound", opts.outbound, self._outbound),
            ("inbound", opts.inbound, self._inbound),
            ("admin", opts.admin, self.admin_handler),
        ]
        for name, address in opts.upstreams.items():
            wanted.append((f"upstream:{name}", address, self._fixed(name)))
        limits = self._connection_limits()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.deadlines.serve)
            for name, (host, port), handler in wanted:
                reuse = opts.reuse_port and name != "admin"
                kind = name if name in ("inbound", "admin") else "outbound"  # --upstream ones are the app's calls
                timeouts = {"admin": self.admin_timeouts, "inbound": self.timeouts}.get(kind, self.outbound_timeouts)
                bound = await nursery.start(
                    partial(
                        serve_http,
                        host,
                        port,
                        handler,
                        timeouts,
                        reuse_port=reuse,
                        stop_accepting=self.stop_accepting if name == "inbound" else None,
                        accept=self._intercepted if name == "outbound" and opts.transparent else None,
                        listen_after=self.configured if name == "inbound" else None,
                        limit=limits[kind],
                    )
                )
                self.addresses[name] = (host, bound)
            nursery.start_soon(self.pools.serve_expiry)
            if opts.control_plane:
                self.control = self._control_plane_client()
                if not self.control.load_persisted():
                    self._build(self.snapshot)  # the same stacks, now able to look services up
                nursery.start_soon(self.control.serve)
            self.mirror.spawn = nursery.start_soon
            nursery.start_soon(self.exporter.run)
            nursery.start_soon(self._sweep_metrics)
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            task_status.started(dict(self.addresses))

    def _connection_limits(self) -> dict[str, ConnectionLimit]:
        """Raise the open files limit as far as allowed, then one limit per listener kind: the
        flags', else derived from the open files limit so that full data listeners still leave
        descriptors for the admin listener, upstream connections and the push channel."""
        opts = self.options
        open_files = raise_open_files_limit()
        derived = derived_connection_limits(open_files)
        chosen = {
            "inbound": opts.max_inbound_connections or derived.inbound,
            "outbound": opts.max_outbound_connections or derived.outbound,
            "admin": opts.max_admin_connections or derived.admin,
        }
        log.info(
            "connection limits: inbound %d, outbound %d, admin %d (open files limit %d)",
            chosen["inbound"],
            chosen["outbound"],
            chosen["admin"],
            open_files,
        )
        self.connection_limits = {kind: ConnectionLimit(kind, n) for kind, n in chosen.items()}
        return self.connection_limits

    def listener_stats(self) -> list[ListenerStats]:
        """For /metrics: (listener, open connections, limit, closed at once, timed out by
        phase, requests answered by the listener itself by code)."""
        timeouts = {"inbound": self.timeouts, "outbound": self.outbound_timeouts, "admin": self.admin_timeouts}
        return [
            (kind, limit.open, limit.limit, limit.rejected, timeouts[kind].expired, timeouts[kind].rejected)
            for kind, limit in self.connection_limits.items()
        ]

    async def _sweep_metrics(self) -> None:
        """Idle request series go (MeshConfig metrics.idle_expiry), judged once a minute."""
        while True:
            await trio.sleep(METRICS_SWEEP_INTERVAL)
            gone = self.telemetry.sweep(trio.current_time())
            if gone:
                log.debug("%d idle metric series removed", gone)

    def metrics_status(self) -> tuple[str, int | None]:
        """For /metrics: the config version applied, and 1/0 for the control plane's channel
        (None in static mode)."""
        connected = None if self.control is None else int(self.control.connected)
        return self.snapshot.version, connected

    async def _watch_signals(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP and self.options.static is not None:
                    try:
                        self.load_static()
                    except Exception as exc:  # keep serving the last good config
                        log.error(
                            "reload of %s failed, keeping version %s:\n%s",
                            self.options.static,
                            self.snapshot.version,
                            exc,
                        )
                    continue
                log.info("signal %s: stopping", signal.Signals(signum).name)
                await self.drain()
                cancel_scope.cancel()
                return

    async def drain(self) -> None:
        """Stop gracefully (docs/architecture.md): not ready any more; deregister and keep serving while
        the removal reaches the callers, so nobody is sent here after we stop; then refuse
        new inbound connections, close idle ones, and give the requests in flight until
        ``drain_timeout`` to finish (each inbound response closes its connection). The app's
        outbound calls are served to the end, as Envoy keeps outbound listeners while it
        drains: a request in flight here may need them to finish."""
        self.draining = True
        if self.control is not None:
            await self.control.drain()
            await trio.sleep(DRAIN_PROPAGATION)
        self.stop_accepting.set()
        self.timeouts.drain()
        inflight = self.telemetry.inflight
        with trio.move_on_after(self.options.drain_timeout) as waited:
            while sum(inflight.values()) > 0:  # noqa: ASYNC110 - counted on the request path, not an event
                await trio.sleep(0.05)
        if waited.cancelled_caught:
            log.warning(
                "%d request(s) still in flight after %gs: cut", sum(inflight.values()), self.options.drain_timeout
            )
