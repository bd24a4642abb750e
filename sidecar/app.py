"""The composition root: listeners, the request stacks built per config snapshot, admin.

Outbound stack (app → other services), outermost first:
    metrics → errors → source header → routing/balance → forwarder (upstream pool)
Inbound stack (other sidecars → local app):
    metrics → errors → local app → forwarder
(metrics sits outside errors so that the mesh's own error responses are counted.)

A new snapshot rebuilds both stacks; the listeners read the current stack per request,
so a change takes effect on the next request and in-flight ones finish on the old one.
"""

from __future__ import annotations

import logging
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .core.config import Endpoint, MeshSnapshot, empty_snapshot, load_static
from .layers.base import Handler, Request, Response
from .layers.errors import errors_layer
from .layers.inbound import local_app_layer, source_header_layer
from .layers.metrics import metrics_layer
from .layers.routing import routing_layer
from .net.admin import AdminHandler
from .net.downstream import HEADER_TIMEOUT, serve_connection
from .net.upstream import Forwarder, UpstreamPools
from .telemetry import Telemetry, render

log = logging.getLogger("meshlet.sidecar")


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


def build_outbound(
    snapshot: MeshSnapshot, forwarder: Forwarder, telemetry: Telemetry, service: str, fixed_service: str | None = None
) -> Handler:
    handler: Handler = forwarder
    handler = routing_layer(handler, snapshot, fixed_service)
    handler = source_header_layer(handler, service)
    handler = errors_layer(handler)
    return metrics_layer(handler, telemetry, "outbound", service)


def build_inbound(app: Endpoint, forwarder: Forwarder, telemetry: Telemetry, service: str) -> Handler:
    handler: Handler = forwarder
    handler = local_app_layer(handler, app, service)
    handler = errors_layer(handler)
    return metrics_layer(handler, telemetry, "inbound", service)


async def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> trio.SocketListener:
    """A listening socket; ``reuse_port`` lets ``--workers`` processes share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class Sidecar:
    def __init__(self, options: SidecarOptions) -> None:
        self.options = options
        self.telemetry = Telemetry()
        self.pools = UpstreamPools()
        self.telemetry.connection_stats = self.pools.stats
        self.forwarder = Forwarder(self.pools)
        self.app = Endpoint(*options.app)
        self.snapshot = empty_snapshot()
        self.config_ready = False
        self.inbound_handler = build_inbound(self.app, self.forwarder, self.telemetry, options.service)
        self.outbound_handler: Handler = build_outbound(self.snapshot, self.forwarder, self.telemetry, options.service)
        self.upstream_handlers: dict[str, Handler] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self.admin_handler = AdminHandler(
            metrics=lambda: render(lambda: [self.telemetry.snapshot()]),
            ready=self.readiness,
            config_dump=self.config_dump,
            clusters=self.clusters,
            worker_snapshot=lambda: {
                "telemetry": self.telemetry.snapshot(),
                "clusters": self.clusters(),
                "config_dump": self.config_dump(),
            },
        )

    # configuration ------------------------------------------------------------------
    def apply(self, snapshot: MeshSnapshot) -> None:
        """Install a snapshot: the next request runs on stacks built from it."""
        service = self.options.service
        self.outbound_handler = build_outbound(snapshot, self.forwarder, self.telemetry, service)
        self.upstream_handlers = {
            name: build_outbound(snapshot, self.forwarder, self.telemetry, service, fixed_service=name)
            for name in self.options.upstreams
        }
        self.snapshot = snapshot
        self.config_ready = True
        log.info("applied config %s from %s (%d services)", snapshot.version, snapshot.source, len(snapshot.services))

    def load_static(self) -> None:
        path = self.options.static
        assert path is not None
        self.apply(load_static(path.read_text(), str(path)))

    def readiness(self) -> tuple[bool, str]:
        if not self.config_ready:
            return False, "no configuration applied yet"
        return True, ""

    def config_dump(self) -> dict[str, Any]:
        return {
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
                }
            )
        return out

    # serving ------------------------------------------------------------------------
    async def _outbound(self, request: Request) -> Response:
        return await self.outbound_handler(request)

    async def _inbound(self, request: Request) -> Response:
        return await self.inbound_handler(request)

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
        async with trio.open_nursery() as nursery:
            for name, (host, port), handler in wanted:
                listener = await bind_listener(host, port, reuse_port=opts.reuse_port and name != "admin")
                bound = listener.socket.getsockname()
                self.addresses[name] = (host, bound[1])
                nursery.start_soon(self._serve_listener, listener, handler)
            nursery.start_soon(self.pools.serve_expiry)
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            task_status.started(dict(self.addresses))

    async def _serve_listener(self, listener: trio.SocketListener, handler: Handler) -> None:
        header_timeout = self.options.header_timeout

        async def on_connection(stream: trio.SocketStream) -> None:
            await serve_connection(stream, handler, header_timeout=header_timeout)

        await trio.serve_listeners(on_connection, [listener])

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
                cancel_scope.cancel()
                return
