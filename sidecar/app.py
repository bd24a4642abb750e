"""The composition root: the request stacks built per config snapshot, the listeners
that serve them, and the tasks of one sidecar (control plane client, span exporter,
signals, draining).

Outbound stack (app → other services), outermost first:
    metrics → errors → [routing/balance, source header] → forwarder (upstream pool)
Inbound stack (other sidecars → local app):
    metrics → errors → [local app] → forwarder
(metrics sits outside errors so that the mesh's own error responses are counted;
[...] are synchronous filters run in one frame. The errors layer hands HTTP/2 requests to
layers/grpc.py: a gRPC call's deadline, and its errors as gRPC statuses.)

A new snapshot rebuilds both stacks; the listeners read the current stack per request,
so a change takes effect on the next request and in-flight ones finish on the old one.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from meshlet import compiled
from meshlet.io import Connection, Deadlines
from meshlet.names import is_service_name

from .core.config import MeshSnapshot, empty_snapshot, load_static
from .core.credentials import CredentialHolder
from .core.destination import Destinations
from .core.interception import AddressMap
from .core.services import Endpoint, ServiceConfig
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
from .net.admin_views import AdminViews
from .net.downstream import HEADER_TIMEOUT, serve_connection
from .net.exporter import Collector, SpanExporter, collector_trust
from .net.inbound import InboundGate
from .net.listeners import Listeners, kind_of, serve_http
from .net.tcp_proxy import TcpProxy
from .net.tls import MeshTLS
from .net.transparent import Interceptor
from .net.upstream import Forwarder, OwnConnections, UpstreamPools
from .telemetry import Telemetry

if TYPE_CHECKING:
    # Imported where a control plane is configured: the push channel and the identity, with
    # cryptography (~8 MiB of a sidecar's memory), are no static sidecar's business.
    from .net.control import ControlPlaneClient, InstanceInfo
    from .net.identity import SidecarIdentity
    from .net.worker_channel import SupervisorLink

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
    api_ca: Path | None = None  # --api-ca: trusted, with the system's CAs, for an https control-plane API or collector
    drain_timeout: float = 30.0  # on SIGTERM: how long requests in flight may take to finish
    # The app's traffic reaches the outbound listener through iptables REDIRECT rules (meshlet
    # init-iptables): route each connection by its original destination; learn every service.
    transparent: bool = False
    join_token: str | None = field(default=None, repr=False)  # --join-token VALUE: the join's credential
    join_token_file: Path | None = None  # --join-token @FILE: read at each connection
    control_plane_ca: bytes | None = None  # --control-plane-ca: roots to verify the control plane with at first
    # --tls-cert, --tls-key, --trust-bundle: static mTLS credentials (checked by the CLI)
    tls_files: tuple[Path, Path, Path] | None = None
    # --app-protocol: what the app speaks (http1, http2, grpc, tcp); "": its Service document's, else detected
    app_protocol: str = ""
    # A worker of a --workers supervisor that holds the control-plane session: the descriptor of
    # its private channel, over which the supervisor feeds it (sidecar/net/worker_channel.py).
    worker_channel: int | None = None


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


def health_url(app: Endpoint, health_path: str) -> str:
    """How the app's health is probed: a connection accepted (tcp, grpc), else ``health_path``
    over HTTP (HTTP/2 for an app declared http2)."""
    if app.protocol in ("tcp", "grpc"):
        return f"tcp://{app.address}"
    scheme = "h2c" if app.protocol == "http2" else "http"
    return f"{scheme}://{app.address}{health_path}"


def instance_info(opts: SidecarOptions, inbound: tuple[str, int], admin: tuple[str, int]) -> InstanceInfo:
    """What the control plane registers: the inbound and admin listeners as others reach them."""
    from .net.control import InstanceInfo  # with a control plane only: it loads the push channel's code

    inbound_host, inbound_port = inbound
    host = opts.advertise or (inbound_host if inbound_host not in ("0.0.0.0", "::") else "127.0.0.1")
    admin_host, admin_port = admin
    if admin_host in ("0.0.0.0", "::"):  # bound to every address: reported at the advertised host
        admin_host = host
    return InstanceInfo(
        opts.service,
        opts.instance_id or f"{opts.service}-{host}-{inbound_port}",
        f"{host}:{inbound_port}",
        f"{admin_host}:{admin_port}",
        dict(opts.labels),
        app_port=opts.app[1],
        protocol=opts.app_protocol,
    )


def state_file(opts: SidecarOptions) -> Path | None:
    """Where the last good config is kept: per service, not per instance, so any instance's
    serves the next one (whose port, and so default id, may differ)."""
    return None if opts.data_dir is None else opts.data_dir / f"{opts.service}.json"


@dataclass(frozen=True, slots=True)
class Stacks:
    """The request path built from one snapshot; a new snapshot replaces it whole."""

    outbound: Handler
    inbound: Handler
    upstreams: Mapping[str, Handler]  # by --upstream name
    routes: Mapping[str | None, Filter]  # by listener (None: outbound, else --upstream name) → router
    app: Endpoint  # the local app, with its protocol


class Sidecar:
    """Builds the request stacks from each snapshot and serves them on the listeners; the
    control plane client, the admin views and transparent interception are units of their own."""

    def __init__(self, options: SidecarOptions) -> None:
        self.options = options
        service = options.service
        self.telemetry = telemetry = Telemetry()
        self.deadlines = Deadlines()
        # What this sidecar proves and trusts (sidecar/core/credentials.py): the control-plane
        # session installs issued certificates here (or --tls-cert/--tls-key/--trust-bundle
        # give them at start), and the TLS contexts read it. One holder: both must see it.
        self.credentials = CredentialHolder()
        if options.tls_files is not None:
            from .net.credential_files import load_credentials

            self.credentials.install(load_credentials(*options.tls_files, options.service))
        self.tls = MeshTLS(self.credentials, on_handshake=telemetry.tls_handshake, on_failure=telemetry.tls_failure)
        # Transparent mode: our mTLS connections that the iptables rules send back are told apart.
        own = OwnConnections() if options.transparent else None
        self.pools = UpstreamPools(clock=self.deadlines.clock, tls=self.tls, own=own)
        self.listeners = Listeners(self.deadlines, options.header_timeout)
        self.forwarder = Forwarder(self.pools, self.deadlines)
        self.mirror = Mirror(self.forwarder, telemetry)
        self.destinations = Destinations(
            on_transition=telemetry.circuit_moved,
            on_eject=telemetry.ejected,
            local_zone=options.labels.get("zone"),  # endpoints in our zone first
        )
        self.explanations = Explanations()
        self.tcp = TcpProxy(service, self.destinations, self.deadlines, telemetry.tcp, self.tls)
        self.exporter = SpanExporter(
            self._span_collector,
            verify=collector_trust(options.api_ca),
            on_dropped=telemetry.dropped_spans,
            on_sent=telemetry.exported_spans,
        )
        self.trace_rng = random.Random()
        self.control: ControlPlaneClient | None = None
        self.link: SupervisorLink | None = None  # a worker fed by its supervisor: in the control client's place
        if options.worker_channel is not None:
            from .net.worker_channel import SupervisorLink  # a --workers worker only: the push channel's code

            self.link = SupervisorLink(options.worker_channel, self.credentials, self.apply)
        self.identity = self._identity()  # IdentityError: a key file we must not use
        self.static_services: dict[str, ServiceConfig] = {}  # from --static, parsed once per (re)load
        self.snapshot = empty_snapshot()
        # Set with the first configuration (pushed, persisted or static): the inbound listener
        # refuses connections until then, so no caller reaches the app unchecked (fail-closed).
        self.configured = trio.Event()
        self.stop_accepting = trio.Event()  # set while draining: the inbound listener closes
        self.stacks = Stacks(
            outbound=build_outbound(
                router(self.snapshot),
                self.forwarder,
                telemetry,
                service,
                self.destinations,
                explanations=self.explanations,
            ),
            inbound=build_inbound(self.app_endpoint(self.snapshot), self.forwarder, telemetry, service),
            upstreams={},
            routes={},
            app=self.app_endpoint(self.snapshot),
        )
        self.interceptor = Interceptor(
            self.stacks.outbound, self.listeners.timeouts["outbound"], telemetry.intercepted, own
        )
        self.interceptor.opaque = self.tcp
        self.admin_views = AdminViews(
            service=service,
            app=options.app,
            telemetry=telemetry,
            pools=self.pools,
            destinations=self.destinations,
            explanations=self.explanations,
            listeners=self.listeners,
            clock=self.deadlines.clock,
            configured=self.configured,
            snapshot=lambda: self.snapshot,
            control=lambda: self.control,
            identity=self.identity,
        )
        telemetry.connection_stats = self.pools.stats
        telemetry.pool_overflow_stats = self.pools.overflow_stats
        telemetry.h2_stream_stats = self.pools.h2_stream_stats
        telemetry.h2_close_stats = self.pools.h2_close_stats
        telemetry.h2_reset_stats = self.pools.h2_reset_stats
        telemetry.listener_stats = self.listeners.stats
        telemetry.http2_stats = self.listeners.http2_stats
        telemetry.destination_stats = self.admin_views.destination_stats
        telemetry.status = self.admin_views.metrics_status
        if self.identity is not None:
            telemetry.certificate_expiry = self.identity.expires_in

    def _identity(self) -> SidecarIdentity | None:
        """With a control plane: the key (kept in --data-dir if given) and the certificates it issues."""
        opts = self.options
        if not opts.control_plane:
            return None
        from .net.identity import SidecarIdentity

        return SidecarIdentity(
            opts.service,
            self.credentials,
            join_token=opts.join_token,
            join_token_file=opts.join_token_file,
            directory=opts.data_dir,
        )

    # configuration ------------------------------------------------------------------
    def apply(self, snapshot: MeshSnapshot) -> None:
        """Install a snapshot: the next request runs on stacks built from it."""
        self._build(snapshot)
        self.configured.set()
        log.info("applied config %s from %s (%d services)", snapshot.version, snapshot.source, len(snapshot.services))

    def _build(self, snapshot: MeshSnapshot) -> None:
        service = self.options.service
        shadow = self.telemetry.shadow_decision
        routes: dict[str | None, Filter] = {None: router(snapshot, on_shadow=shadow)}
        routes.update((name, router(snapshot, name, on_shadow=shadow)) for name in self.options.upstreams)
        discover = self._discoverer
        self.mirror.use(snapshot)
        mirror = self.mirror
        destinations = self.destinations
        clock = self.deadlines.clock
        destinations.configure(snapshot.services, snapshot.destinations, snapshot.shadow_destinations, clock())
        telemetry, forwarder = self.telemetry, self.forwarder
        telemetry.configure(snapshot.metrics)
        self.tls.configure(snapshot.mtls_mode, snapshot.mtls_modes)
        explanations = self.explanations
        tracer = self._tracer(snapshot)

        def outbound(listener: str | None) -> Handler:
            return build_outbound(
                routes[listener],
                forwarder,
                telemetry,
                service,
                destinations,
                discover(listener),
                mirror,
                clock,
                explanations,
                tracer,
            )

        app = self.app_endpoint(snapshot)
        self.stacks = stacks = Stacks(
            outbound=outbound(None),
            inbound=build_inbound(app, forwarder, telemetry, service, snapshot, tracer),
            upstreams={name: outbound(name) for name in self.options.upstreams},
            routes=routes,
            app=app,
        )
        if self.options.transparent:
            self.interceptor.use(stacks.outbound, AddressMap.of(snapshot.services), snapshot.outbound_traffic_policy)
        self.tcp.use(snapshot.services, snapshot.access.get(service))
        if self.control is not None and self.control.health is not None:
            self.control.health.url = self._health_url(app)  # a Service document may declare tcp
        self.snapshot = snapshot

    def app_endpoint(self, snapshot: MeshSnapshot) -> Endpoint:
        """The local app, with its protocol: --app-protocol, else its Service document's."""
        protocol = self.options.app_protocol or snapshot.protocols.get(self.options.service, "")
        return Endpoint(*self.options.app, protocol=protocol)

    def _health_url(self, app: Endpoint) -> str:
        return health_url(app, self.options.health_path)

    def _opaque_inbound(self) -> Callable[[Connection, str], Awaitable[None]] | None:
        """How the inbound listener splices a caller to the app when it speaks tcp; None: HTTP."""
        app = self.stacks.app
        if app.protocol != "tcp":
            return None
        return partial(self.tcp.inbound, app=app)

    def _upstream_gate(self, name: str, handler: Handler) -> Callable[[Connection], Awaitable[None]]:
        """An --upstream listener's connections: spliced when its service is tcp (per the
        current snapshot, decided at the accept: no sniffing), else served as HTTP."""
        timeouts = self.listeners.timeouts["outbound"]

        async def accept(io: Connection) -> None:
            if self.tcp.is_tcp(name):
                try:
                    await self.tcp.outbound(io, name)
                finally:
                    io.close()
            else:
                await serve_connection(io, handler, timeouts)

        return accept

    def _tracer(self, snapshot: MeshSnapshot) -> Tracer:
        settings = snapshot.tracing
        if settings is None:
            default = TracingSettings()
            sampling = default.sampling if self.options.trace_sampling is None else self.options.trace_sampling
            settings = TracingSettings(sampling, default.formats, default.collector)
        return Tracer(
            self.options.service,
            SpanEndpoint(self.options.service),
            self.exporter.submit,
            sample_rate=settings.sampling,
            formats=settings.formats,
            rng=self.trace_rng,
            # With nowhere to send spans (no control plane, no collector) none are recorded.
            recording=bool(
                self.options.control_plane or self.link or self.options.trace_collector or settings.collector
            ),
        )

    def _span_collector(self) -> str | Collector | None:
        """Where spans go: MeshConfig's collector, else --trace-collector, else the control
        plane's trace store (its welcome said where); None: nowhere yet (they wait, bounded)."""
        tracing = self.snapshot.tracing  # None: the defaults, which name no collector
        if tracing is not None and tracing.collector:
            return tracing.collector
        if self.options.trace_collector:
            return self.options.trace_collector
        if self.link is not None:
            return self.link.collector
        return self.control.span_collector if self.control is not None else None

    def _discoverer(self, listener: str | None) -> Discover | None:
        """With a control plane: look up a service this sidecar has not heard of, then
        route by the snapshot installed with the answer."""
        if self.control is None and self.link is None:
            return None

        async def discover(service: str) -> Filter:
            lookup = self.control or self.link  # a worker asks its supervisor
            assert lookup is not None
            await lookup.discover(service)  # raises MeshError when it cannot be found
            return self.stacks.routes[listener]

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
        from .net.control import ControlPlaneClient
        from .net.control_tls import ControlPlaneTLS

        opts = self.options
        return ControlPlaneClient(
            opts.control_plane,
            instance_info(opts, self.listeners.addresses["inbound"], self.listeners.addresses["admin"]),
            self.apply,
            static=lambda: self.static_services,
            app_health_url=self._health_url(self.stacks.app),
            state_file=state_file(opts),
            watch_all=opts.transparent,
            identity=self.identity,
            tls=None if self.identity is None else ControlPlaneTLS(self.identity, opts.control_plane_ca),
        )

    # serving ------------------------------------------------------------------------
    async def _outbound(self, request: Request) -> Response:
        return await self.stacks.outbound(request)

    async def _inbound(self, request: Request) -> Response:
        return await self.stacks.inbound(request)

    def _fixed(self, name: str) -> Handler:
        async def handle(request: Request) -> Response:
            return await self.stacks.upstreams[name](request)

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
            ("admin", opts.admin, self.admin_views.handler()),
        ]
        for name, address in opts.upstreams.items():
            wanted.append((f"upstream:{name}", address, self._fixed(name)))
        listeners = self.listeners
        inbound_gate = InboundGate(
            self.tls,
            opts.service,
            self._inbound,
            listeners.timeouts["inbound"],
            self.telemetry.refused_plaintext,
            self._opaque_inbound,
        )
        listeners.limit(opts.max_inbound_connections, opts.max_outbound_connections, opts.max_admin_connections)
        if self.link is not None:
            await self.link.receive_first()  # a worker listens once it has its supervisor's configuration
        async with trio.open_nursery() as nursery:
            await nursery.start(self.deadlines.serve)
            self.pools.nursery = nursery  # HTTP/2 upstream connections' reader and writer tasks
            for name, (host, port), handler in wanted:
                kind = kind_of(name)
                bound = await nursery.start(
                    partial(
                        serve_http,
                        host,
                        port,
                        handler,
                        listeners.timeouts[kind],
                        reuse_port=opts.reuse_port and name != "admin",
                        stop_accepting=self.stop_accepting if name == "inbound" else None,
                        accept=self.interceptor
                        if name == "outbound" and opts.transparent
                        else inbound_gate
                        if name == "inbound"
                        else self._upstream_gate(name[len("upstream:") :], handler)
                        if name.startswith("upstream:")
                        else None,
                        listen_after=self.configured if name == "inbound" else None,
                        limit=listeners.limits[kind],
                    )
                )
                listeners.addresses[name] = (host, bound)
            nursery.start_soon(self.pools.serve_expiry)
            if opts.control_plane:
                assert self.identity is not None
                certified = self.identity.load_persisted()  # its certificate proves it over TLS
                if not (opts.join_token or opts.join_token_file or certified):
                    log.warning(
                        "no --join-token: the control plane refuses a sidecar that proves nothing "
                        "(pass --join-token @DATA_DIR/join-token of the control plane, or MESHLET_JOIN_TOKEN)"
                    )
                nursery.start_soon(self.identity.watch_expiry)
                self.control = self._control_plane_client()
                if not self.control.load_persisted():
                    self._build(self.snapshot)  # the same stacks, now able to look services up
                # An --upstream listener's service is watched from the start: a tcp one must be
                # known before the app's first connection (decided at the accept, no lookup).
                self.control.config.discovered.watched.update(n for n in opts.upstreams if is_service_name(n))
                nursery.start_soon(self.control.serve)
            if self.link is not None:
                nursery.start_soon(self.link.serve, partial(self._stop, nursery.cancel_scope))
            self.mirror.spawn = nursery.start_soon
            nursery.start_soon(self.exporter.run)
            nursery.start_soon(self._sweep_metrics)
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            log.info("request path: %s", compiled.describe())  # which build runs: a user and the benchmarks can tell
            task_status.started(dict(listeners.addresses))

    async def _sweep_metrics(self) -> None:
        """Idle request series go (MeshConfig metrics.idle_expiry), judged once a minute."""
        while True:
            await trio.sleep(METRICS_SWEEP_INTERVAL)
            gone = self.telemetry.sweep(trio.current_time())
            if gone:
                log.debug("%d idle metric series removed", gone)

    async def _watch_signals(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if self.link is not None:
                    continue  # a worker's supervisor says when to reload and to drain (the group gets signals)
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
                await self._stop(cancel_scope)
                return

    async def _stop(self, cancel_scope: trio.CancelScope) -> None:
        await self.drain()
        cancel_scope.cancel()

    async def drain(self) -> None:
        """Stop gracefully (docs/architecture.md): not ready any more; deregister and keep serving while
        the removal reaches the callers, so nobody is sent here after we stop; then refuse
        new inbound connections, close idle ones, and give the requests in flight until
        ``drain_timeout`` to finish (each inbound response closes its connection). The app's
        outbound calls are served to the end, as Envoy keeps outbound listeners while it
        drains: a request in flight here may need them to finish."""
        self.admin_views.draining = True  # /ready says so from now on
        if self.control is not None:
            await self.control.drain()
            await trio.sleep(DRAIN_PROPAGATION)
        self.stop_accepting.set()
        self.listeners.timeouts["inbound"].drain()
        inflight = self.telemetry.inflight
        tcp_open = self.telemetry.tcp.open  # inbound TCP connections get the same time to end
        with trio.move_on_after(self.options.drain_timeout) as waited:
            while sum(inflight.values()) + tcp_open["inbound"] > 0:  # noqa: ASYNC110 - counted on the request path, not an event
                await trio.sleep(0.05)
        if waited.cancelled_caught:
            log.warning(
                "%d request(s) and %d TCP connection(s) still in flight after %gs: cut",
                sum(inflight.values()),
                tcp_open["inbound"],
                self.options.drain_timeout,
            )
