"""The sidecar's end of the push channel: register, receive endpoints, stay fail-static.

A latest-value cell in linkerd's manner: the request path only reads the snapshot the
sidecar applied; this task updates it. While the control plane is away the sidecar
keeps serving its last good configuration and reconnects with jittered exponential
backoff (0.5 s → 30 s, reset once a push arrives). Every applied configuration is
persisted, so a sidecar restarted while the control plane is down serves from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from meshlet import wire

from ..core import errors
from ..core.config import Endpoint, MeshSnapshot, ServiceConfig, is_service_name, make_snapshot, parse_address
from ..core.errors import MeshError
from ..core.policies import PolicyCache

log = logging.getLogger("meshlet.control")

BACKOFF_FIRST = 0.5  # docs/protocol.md: 0.5 s doubling to 30 s
BACKOFF_MAX = 30.0
PING_INTERVAL = 5.0  # the control plane's too: a silent peer is dead after 3 of them
HEALTH_INTERVAL = 5.0  # how often the app's health is probed
HEALTH_TIMEOUT = 2.0
DISCOVERY_TIMEOUT = 5.0  # how long a first request to a new service waits for the control plane


@dataclass
class InstanceInfo:
    service: str
    instance_id: str
    address: str  # this sidecar's inbound listener, as others reach it
    admin: str
    labels: dict[str, str] = field(default_factory=dict)
    node: str = ""
    app_port: int = 0  # the app's port on the inbound host: what transparent-mode callers dial


class DiscoveredState:
    """Endpoints received from the control plane: name → (version, body); the services
    this sidecar watches (subscribed to on first use) and those the control plane said
    do not exist. Pure."""

    def __init__(self) -> None:
        self.endpoints: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        self.watched: set[str] = set()
        self.missing: set[str] = set()
        self.rejected: dict[str, str] = {}  # name → why its last pushed version was refused

    def apply(self, push: wire.Push) -> tuple[list[str], str]:
        """Apply what is valid; return the rejected names and why (empty: all applied)."""
        rejected: list[str] = []
        reasons: list[str] = []
        staged = dict(self.endpoints)
        for resource in push.resources:
            if resource.missing:  # a watched service that does not exist (now)
                staged.pop(resource.name, None)
                self.missing.add(resource.name)
                continue
            self.missing.discard(resource.name)
            try:
                staged[resource.name] = (resource.version, self._body(staged, resource))
                self.rejected.pop(resource.name, None)
            except (wire.WireError, ValueError) as exc:
                rejected.append(resource.name)
                reasons.append(f"{resource.name}: {exc}")
                self.rejected[resource.name] = str(exc)
                if resource.name not in self.endpoints:
                    staged.pop(resource.name, None)
        for name in push.removed:
            staged.pop(name, None)
            if name in self.watched:
                self.missing.add(name)
        self.endpoints = staged
        return rejected, "; ".join(reasons)

    @staticmethod
    def _body(staged: dict[str, tuple[str, list[dict[str, Any]]]], resource: wire.Resource) -> list[dict[str, Any]]:
        if resource.is_delta:
            have = staged.get(resource.name)
            if have is None or have[0] != resource.base:
                raise wire.WireError(
                    "delta-base", f"have {have[0] if have else 'nothing'}, delta is against {resource.base}"
                )
            body = wire.apply_endpoint_delta(have[1], resource)
        else:
            if not isinstance(resource.body, list):
                raise ValueError("an endpoints body must be a list")
            body = resource.body
        for item in body:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise ValueError("each endpoint needs an id")
            parse_address(str(item.get("address")))
            weight = item.get("weight", 1)
            if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
                raise ValueError(f"endpoint {item['id']}: weight must be 1..1000")
            app_port = item.get("app_port", 0)
            if not isinstance(app_port, int) or isinstance(app_port, bool) or not 0 <= app_port <= 65535:
                raise ValueError(f"endpoint {item['id']}: app_port must be 0..65535")
        return body

    def versions(self) -> dict[str, str]:
        return {name: version for name, (version, _) in self.endpoints.items()}

    def services(self) -> dict[str, ServiceConfig]:
        out = {}
        for name, (_, body) in self.endpoints.items():
            endpoints = tuple(
                Endpoint(
                    *parse_address(e["address"]),
                    labels=dict(e.get("labels", {})),
                    weight=e.get("weight", 1),
                    app_port=e.get("app_port", 0),
                )
                for e in body
            )
            out[name] = ServiceConfig(name, endpoints)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoints": {name: {"ver": v, "body": b} for name, (v, b) in self.endpoints.items()},
            "watched": sorted(self.watched),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DiscoveredState:
        state = cls()
        for name, item in dict(raw.get("endpoints", {})).items():
            state.endpoints[str(name)] = (str(item["ver"]), list(item["body"]))
        # A restarted sidecar watches again what its app called before.
        state.watched = {str(name) for name in raw.get("watched", [])} | set(state.endpoints)
        return state


class ControlPlaneClient:
    """Keeps a sidecar connected to its control plane(s)."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        instance: InstanceInfo,
        apply: Callable[[MeshSnapshot], None],
        *,
        static: Callable[[], dict[str, ServiceConfig]] = dict,
        app_health_url: str | None = None,
        state_file: Path | None = None,
        rng: random.Random | None = None,
        watch_all: bool = False,
    ) -> None:
        self.addresses = addresses
        self.watch_all = watch_all  # every service's endpoints, not only those called (transparent mode)
        self.instance = instance
        self._apply = apply
        self._static = static
        self.app_health_url = app_health_url
        self.state_file = state_file
        self.rng = rng or random.Random()
        self.state = DiscoveredState()
        self.policies = PolicyCache()
        self.connected = False
        self.ready = False  # the app's health, as last probed
        self._told_ready: bool | None = None  # the readiness the control plane last heard
        self.pushes_applied = 0
        self.nacks_sent = 0
        self.last_error = ""
        self.has_config = False
        self._stream: trio.SocketStream | None = None
        self._conn: wire.ClientConnection | None = None
        self._waiting: dict[str, trio.Event] = {}  # services looked up, until an answer or the end
        self._draining = False
        self._got_push = False
        self.acked_versions: dict[str, str] = {}  # type → the last version this sidecar accepted
        self.span_collector: str | None = None  # the control plane's trace store, once welcome said where
        # The reader (acks, pongs), the pinger and the health prober share one socket.
        self._send_lock = trio.StrictFIFOLock()

    # persistence ------------------------------------------------------------------------
    def load_persisted(self) -> bool:
        """Serve from the last persisted config (fail-static across restarts)."""
        if self.state_file is None or not self.state_file.exists():
            return False
        try:
            raw = json.loads(self.state_file.read_text())
            self.state = DiscoveredState.from_json(raw)
            self.policies = PolicyCache.from_json(raw.get("policies", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ignoring unreadable persisted config %s: %s", self.state_file, exc)
            return False
        self._install("persisted")
        log.info("serving persisted config from %s until the control plane answers", self.state_file)
        return True

    def _persist(self) -> None:
        """Write the last good config (atomically: a temporary file renamed over it).
        Instances of one service on one host share the file (any one's config serves the
        next to start), so each writes its own temporary file. Best effort: a failure is
        logged, and the running config is unaffected."""
        if self.state_file is None:
            return
        data = json.dumps({**self.state.to_json(), "policies": self.policies.to_json()})
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=f".{self.state_file.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as file:
                    file.write(data)
                os.replace(tmp, self.state_file)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("could not persist the last good config to %s: %s", self.state_file, exc)

    def reinstall(self, source: str) -> None:
        """Rebuild the snapshot after the static part changed (keeps what was pushed)."""
        self._install(source)

    def _install(self, source: str) -> None:
        services = dict(self._static())
        services.update(self.policies.services())  # Service documents: services without a sidecar
        services.update(self.state.services())  # registered instances win over a document of the same name
        policies = self.policies
        snapshot = make_snapshot(
            services,
            source,
            policy_version=policies.version(),
            routes=policies.routes(),
            shadow_routes=policies.routes("shadow"),
            access=policies.access(),
            shadow_access=policies.access("shadow"),
            destinations=policies.destinations(),
            shadow_destinations=policies.destinations("shadow"),
            tracing=policies.tracing(),
            metrics=policies.metrics(),
            outbound_traffic_policy=policies.outbound_traffic_policy(),
        )
        self._apply(snapshot)
        self.has_config = True

    # the channel ------------------------------------------------------------------------
    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.app_health_url:
                nursery.start_soon(self._probe_health)
            nursery.start_soon(self._connect_forever)

    async def _connect_forever(self) -> None:
        delay = BACKOFF_FIRST
        attempt = 0
        while not self._draining:
            host, port = self.addresses[attempt % len(self.addresses)]
            attempt += 1
            self._got_push = False
            try:
                await self._session(host, port)
            except Exception as exc:  # noqa: BLE001 - whatever ended the session: reconnect
                self.last_error = f"{host}:{port}: {_describe(exc)}"
                log.warning("control plane %s:%d: %s", host, port, _describe(exc))
            finally:
                self.connected = False
                self._stream = None
            if self._got_push:
                delay = BACKOFF_FIRST  # gRFC A57: a stream that delivered is not a failure
            # Full jitter: spread reconnects of many sidecars after a control-plane restart.
            await trio.sleep(self.rng.uniform(0, delay))
            delay = min(BACKOFF_MAX, delay * 2)

    async def _session(self, host: str, port: int) -> None:
        info = self.instance
        hello = wire.Hello(
            wire.PROTOCOL_VERSIONS,
            info.node or info.instance_id,
            info.service,
            {
                "instance_id": info.instance_id,
                "address": info.address,
                "admin": info.admin,
                "labels": info.labels,
                "ready": self.reported_ready,
                **({"app_port": info.app_port} if info.app_port else {}),
            },
            {wire.ENDPOINTS: self.state.versions(), wire.POLICIES: self.policies.versions()},
            # Transparent mode: any address the app dials may be a service's, so every
            # service is pushed (a hello that scopes nothing); otherwise those it called.
            {} if self.watch_all else {wire.ENDPOINTS: tuple(sorted(self.state.watched))},
        )
        conn = wire.ClientConnection(hello)
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
        try:
            self._stream = stream
            self._conn = conn
            await self._send(stream, conn.hello())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pinger, stream)
                while True:
                    with trio.move_on_after(3 * PING_INTERVAL) as silent:
                        data = await stream.receive_some(65536)
                    if silent.cancelled_caught:
                        raise wire.WireError("silent", f"nothing from the control plane for {3 * PING_INTERVAL:g}s")
                    if not data:
                        break
                    for message in conn.receive_data(data):
                        if isinstance(message, wire.Welcome):
                            self.connected = True
                            if message.api_port:  # its trace store takes our spans (docs/tracing.md)
                                where = f"[{host}]" if ":" in host else host
                                self.span_collector = f"http://{where}:{message.api_port}/api/v2/spans"
                            log.info("connected to control plane %s:%d (%s)", host, port, message.server)
                            # The probe may have changed its mind since hello was built,
                            # and the app may have called new services.
                            self._told_ready = None  # a new session: say it again
                            await self._report_readiness()
                            late = self.state.watched - set(hello.watch.get(wire.ENDPOINTS, self.state.watched))
                            if late and conn.can_watch:
                                await self._send(stream, conn.watch(wire.ENDPOINTS, tuple(sorted(late))))
                        elif isinstance(message, wire.Push):
                            self._got_push = True
                            await self._send(stream, self._on_push(conn, message))
                            await self._report_readiness()  # ready with its first configuration
                        elif isinstance(message, wire.Ping):
                            await self._send(stream, wire.encode(wire.Pong(message.id)))
                        elif isinstance(message, wire.Error):
                            raise wire.WireError(message.reason, message.message)
                nursery.cancel_scope.cancel()
        finally:
            self._conn = None
            self._answer_all()  # lookups in flight fail now rather than at their timeout
            await stream.aclose()

    def _on_push(self, conn: wire.ClientConnection, push: wire.Push) -> bytes:
        previous = self.acked_versions.get(push.type, "")  # xDS: a NACK names the last accepted version
        if push.type == wire.ENDPOINTS:
            rejected, why = self.state.apply(push)
        elif push.type == wire.POLICIES:
            rejected, why = self.policies.apply(push)
        else:
            return conn.ack(push)  # a type this build does not know: nothing to apply
        self._install("control-plane")
        self._persist()
        self.pushes_applied += 1
        state = self.state
        for name in [n for n in self._waiting if n in state.endpoints or n in state.missing or n in state.rejected]:
            self._waiting.pop(name).set()  # answered: the lookup resumes on the new snapshot
        if rejected:
            self.nacks_sent += 1
            log.warning("rejected %s from the control plane: %s", rejected, why)
            return conn.nack(push, previous, why, tuple(rejected))
        self.acked_versions[push.type] = push.version
        return conn.ack(push)

    # on-demand discovery ---------------------------------------------------------------
    async def discover(self, service: str) -> None:
        """Return once ``service`` is in the installed snapshot, subscribing to it first
        if this sidecar never asked; MeshError when it does not exist (404 no-route) or
        the control plane cannot be asked in time (503 no-healthy-endpoints)."""
        state = self.state
        if service in state.endpoints:
            return  # installed while this request was on its way
        conn, stream = self._conn, self._stream
        absent = MeshError(errors.NO_ROUTE, f"no service named {service!r} in the mesh")
        if not is_service_name(service) or service in state.missing:
            raise absent
        if service in state.rejected:
            raise MeshError(
                errors.NO_ROUTE, f"service {service!r}: its configuration was rejected: {state.rejected[service]}"
            )
        if len(state.watched) >= wire.MAX_WATCHED and service not in state.watched:
            raise MeshError(errors.NO_ROUTE, f"{service!r}: this sidecar already watches {wire.MAX_WATCHED} services")
        if conn is None or stream is None or not self.connected:
            state.watched.add(service)  # named in the next hello: it arrives once connected
            raise MeshError(
                errors.NO_HEALTHY_ENDPOINTS,
                f"service {service!r} is not known here and the control plane is unreachable to look it up",
            )
        if not conn.can_watch or self.watch_all:
            raise absent  # protocol version 1, or watching all: the control plane sends every service
        event = self._waiting.get(service)
        if event is None:
            event = self._waiting[service] = trio.Event()
            state.watched.add(service)
            log.info("looking up service %s", service)
            try:
                await self._send(stream, conn.watch(wire.ENDPOINTS, (service,)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reconnect's hello names it; the lookup below times out or ends
        with trio.move_on_after(DISCOVERY_TIMEOUT):
            await event.wait()
        if service in self.state.endpoints:
            return
        if service in self.state.missing:
            raise absent
        if service in self.state.rejected:
            raise MeshError(
                errors.NO_ROUTE, f"service {service!r}: its configuration was rejected: {self.state.rejected[service]}"
            )
        raise MeshError(
            errors.NO_HEALTHY_ENDPOINTS, f"service {service!r}: no answer from the control plane to the lookup"
        )

    def _answer_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for event in waiting.values():
            event.set()

    async def _send(self, stream: trio.SocketStream, data: bytes) -> None:
        async with self._send_lock:
            await stream.send_all(data)

    async def _pinger(self, stream: trio.SocketStream) -> None:
        ping = 0
        while True:
            await trio.sleep(PING_INTERVAL)
            ping += 1
            try:
                await self._send(stream, wire.encode(wire.Ping(ping)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader sees the end too

    async def _probe_health(self) -> None:
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT) as client:
            while not self._draining:
                try:
                    response = await client.get(self.app_health_url)  # type: ignore[arg-type]
                    ready = response.status_code < 500
                except httpx.HTTPError:
                    ready = False
                if ready != self.ready:
                    self.ready = ready
                    log.info("local app is %s", "ready" if ready else "not ready")
                    await self._report_readiness()
                await trio.sleep(HEALTH_INTERVAL)

    @property
    def reported_ready(self) -> bool:
        """What the registry hears: the app is healthy and this sidecar has a configuration
        (its inbound listener refuses until then), so nobody is sent here before it can serve."""
        return self.ready and self.has_config

    async def _report_readiness(self) -> None:
        ready = self.reported_ready
        if ready != self._told_ready:
            self._told_ready = ready
            await self._send_quietly(wire.Health(ready))

    async def _send_quietly(self, message: wire.Message) -> None:
        stream = self._stream
        if stream is not None and self.connected:
            try:
                await self._send(stream, wire.encode(message))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def drain(self) -> None:
        """Deregister before the sidecar stops accepting (docs/architecture.md)."""
        self._draining = True
        with trio.move_on_after(2):
            await self._send_quietly(wire.Bye("draining"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, wire.WireError) else str(exc)
