"""The sidecar's end of the push channel: register, receive pushes, look services up.

A latest-value cell in linkerd's manner: the request path only reads the snapshot the
sidecar applied; this task updates it. While the control plane is away the sidecar
keeps serving its last good configuration and reconnects with jittered exponential
backoff (0.5 s → 30 s, reset once a push arrives), to the next of its addresses each
time. A session the control plane ends after its maximum age (``session-age``) is no
failure: the sidecar reconnects at once, to the next address (replicas rebalance so).
Every applied configuration is persisted, so a sidecar restarted while the control
plane is down serves from it.

This module is the session only: hello, acks and nacks, pings, the readiness the
registry hears, and lookups of services on first use. What the pushes build is pure
(sidecar/core/discovered.py); the copy on disk is sidecar/net/persist.py; the app's
health probe, sidecar/net/health.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from meshlet import wire

from ..core import errors, store_conflict
from ..core.config import MeshSnapshot
from ..core.discovered import PushedConfig
from ..core.errors import MeshError
from ..core.services import ServiceConfig
from .control_tls import ControlPlaneTLS
from .exporter import Collector
from .health import HEALTH_INTERVAL, AppHealth
from .identity import IdentityError, SidecarIdentity
from .persist import read_last_good, write_last_good

log = logging.getLogger("meshlet.control")

BACKOFF_FIRST = 0.5  # docs/protocol.md: 0.5 s doubling to 30 s
BACKOFF_MAX = 30.0
AGED_RECONNECT_JITTER = 0.1  # after a session-age ending: the control plane spreads those already
PING_INTERVAL = 5.0  # the control plane's too: a silent peer is dead after 3 of them
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
    protocol: str = ""  # --app-protocol: what the app speaks, pushed to callers with this endpoint


class ControlPlaneClient:
    """Keeps a sidecar connected to its control plane(s)."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        instance: InstanceInfo,
        apply: Callable[[MeshSnapshot], None],
        *,
        static: Callable[[], Mapping[str, ServiceConfig]] = dict,
        app_health_url: str | None = None,
        state_file: Path | None = None,
        rng: random.Random | None = None,
        watch_all: bool = False,
        identity: SidecarIdentity | None = None,
        tls: ControlPlaneTLS | None = None,
        settle: Callable[[], Awaitable[str]] | None = None,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        self.addresses = addresses
        # --workers: awaited after a push is installed, before its answer: "" once every worker
        # applied it, else why not (sent as a NACK); and whether every worker serves (readiness).
        self.settle = settle
        self.serving = serving
        self.identity = identity  # the join token, the key and the certificates (net/identity.py)
        self.tls = tls  # None: plaintext (tests of the session alone)
        self.watch_all = watch_all  # every service's endpoints, not only those called (transparent mode)
        self.instance = instance
        self._apply = apply
        self._static = static
        self.health = AppHealth(app_health_url) if app_health_url else None
        self.state_file = state_file
        self.rng = rng or random.Random()
        self.config = PushedConfig()
        self.connected = False
        self._told_ready: bool | None = None  # the readiness the control plane last heard
        self.pushes_applied = 0
        self.nacks_sent = 0
        self.last_error = ""
        self.has_config = False
        self._stream: trio.abc.Stream | None = None
        self._conn: wire.ClientConnection | None = None
        self._waiting: dict[str, trio.Event] = {}  # services looked up, until an answer or the end
        self._draining = False
        # Set while the sidecar reconnects after a session-age ending (a planned gap of a moment):
        # a lookup waits for the next session rather than fail. Set when it is up, or failed.
        self._rejoining: trio.Event | None = None
        self._got_push = False
        self.acked_versions: dict[str, str] = {}  # type → the last version this sidecar accepted
        # The control plane's trace store, once welcome said where (with this session's span token).
        self.span_collector: Collector | None = None
        self.session_store = ""  # the store of the control plane this session talks to (welcome)
        self.unvouched: frozenset[str] = frozenset()  # held policies its store has not listed yet
        self.store_conflict: tuple[str, ...] = ()  # the policies kept against that store (logged once)
        # The reader (acks, pongs), the pinger and the health prober share one socket.
        self._send_lock = trio.StrictFIFOLock()

    # the configuration served ---------------------------------------------------------
    def load_persisted(self) -> bool:
        """Serve from the last persisted config (fail-static across restarts)."""
        config = None if self.state_file is None else read_last_good(self.state_file)
        if config is None:
            return False
        self.config = config
        self._install("persisted")
        log.info("serving persisted config from %s until the control plane answers", self.state_file)
        return True

    def reinstall(self, source: str) -> None:
        """Rebuild the snapshot after the static part changed (keeps what was pushed)."""
        self._install(source)

    def _install(self, source: str) -> None:
        self._apply(self.config.snapshot(self._static(), source))
        self.has_config = True

    # the channel ------------------------------------------------------------------------
    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.health is not None:
                nursery.start_soon(self.health.serve, self._report_readiness)
            if self.identity is not None:
                nursery.start_soon(self._report_expiry)
            nursery.start_soon(self._connect_forever)

    async def _report_expiry(self) -> None:
        """A certificate that expires makes this sidecar not ready (peers would refuse it)
        while no probe answer changes: the registry hears it within a probe interval.
        _report_readiness sends only a change, so the loop costs nothing otherwise."""
        while True:
            await trio.sleep(HEALTH_INTERVAL)
            await self._report_readiness()

    async def _connect_forever(self) -> None:
        delay = BACKOFF_FIRST
        attempt = 0
        while not self._draining:
            host, port = self.addresses[attempt % len(self.addresses)]
            attempt += 1
            self._got_push = False
            aged = False
            try:
                await self._session(host, port)
            except Exception as exc:  # noqa: BLE001 - whatever ended the session: reconnect
                # Only a session that delivered counts as aged: a control plane cannot make a
                # sidecar reconnect in a loop without backoff.
                aged = _reason(exc) == wire.SESSION_AGE and self._got_push
                if aged:
                    after = self.addresses[attempt % len(self.addresses)]
                    log.info(
                        "control plane %s:%d ended the session after its maximum age; reconnecting to %s:%d",
                        host,
                        port,
                        *after,
                    )
                else:
                    self.last_error = f"{host}:{port}: {_describe(exc)}"
                    # A refused join is the operator's to fix: say it loudly (the message says how).
                    level = logging.ERROR if _join_refused(exc) else logging.WARNING
                    log.log(level, "control plane %s:%d: %s", host, port, _describe(exc))
            finally:
                self.connected = False
                self._stream = None
                if not aged:
                    self._rejoined()  # a reconnect after an ending for age failed (or ended since)
            if aged:
                delay = BACKOFF_FIRST
                await trio.sleep(self.rng.uniform(0, AGED_RECONNECT_JITTER))
                continue
            if self._got_push:
                delay = BACKOFF_FIRST  # gRFC A57: a stream that delivered is not a failure
            # Full jitter: spread reconnects of many sidecars after a control-plane restart.
            await trio.sleep(self.rng.uniform(0, delay))
            delay = min(BACKOFF_MAX, delay * 2)

    def _hello(self) -> wire.Hello:
        info = self.instance
        return wire.Hello(
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
                **({"protocol": info.protocol} if info.protocol else {}),
            },
            self.config.versions(),
            # Transparent mode: any address the app dials may be a service's, so every
            # service is pushed (a hello that scopes nothing); otherwise those it called.
            {} if self.watch_all else {wire.ENDPOINTS: tuple(sorted(self.config.discovered.watched))},
            self.config.store,
            token=self.identity.join_token if self.identity is not None else "",
            csr=self.identity.csr() if self.identity is not None else b"",
        )

    async def _session(self, host: str, port: int) -> None:
        hello = self._hello()
        conn = wire.ClientConnection(hello)
        with trio.fail_after(5):
            plain = await trio.open_tcp_stream(host, port)
            try:
                stream: trio.abc.Stream = plain if self.tls is None else await self.tls.wrap(plain)
            except BaseException:
                await plain.aclose()
                raise
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
                    for message in conn.receive_data(bytes(data)):
                        if isinstance(message, wire.Welcome):
                            self.connected = True
                            self._rejoined()
                            if message.api_port:  # its trace store takes our spans (docs/tracing.md)
                                where = f"[{host}]" if ":" in host else host
                                scheme = "https" if message.api_tls else "http"
                                url = f"{scheme}://{where}:{message.api_port}/api/v2/spans"
                                self.span_collector = Collector(url, message.span_token)
                            log.info("connected to control plane %s:%d (%s)", host, port, message.server)
                            self._start_session(message.store)
                            self._welcomed(message, nursery, stream, conn)
                            # The probe may have changed its mind since hello was built,
                            # and the app may have called new services.
                            self._told_ready = None  # a new session: say it again
                            await self._report_readiness()
                            watched = self.config.discovered.watched
                            late = watched - set(hello.watch.get(wire.ENDPOINTS, watched))
                            if late and conn.can_watch:
                                await self._send(stream, conn.watch(wire.ENDPOINTS, tuple(sorted(late))))
                        elif isinstance(message, wire.Push):
                            self._got_push = True
                            await self._send(stream, await self._answer_push(conn, message))
                            await self._report_readiness()  # ready with its first configuration
                        elif isinstance(message, wire.Ping):
                            await self._send(stream, wire.encode(wire.Pong(message.id)))
                        elif isinstance(message, wire.Cert):
                            self._install_certificate(message.issued)
                        elif isinstance(message, wire.Bundle) and self.identity is not None:
                            self.identity.install_bundle(message.bundle)
                        elif isinstance(message, wire.Error):
                            if message.reason == wire.SESSION_AGE and self._got_push and self._rejoining is None:
                                self._rejoining = trio.Event()  # from now: lookups wait for the next session
                            raise wire.WireError(message.reason, message.message)
                nursery.cancel_scope.cancel()
        finally:
            self._conn = None
            self._answer_all()  # lookups in flight fail now rather than at their timeout
            await stream.aclose()

    def _start_session(self, store: str) -> None:
        """Welcome named the control plane's store: which held policies it must list before
        this sidecar takes it as their store (sidecar/core/store_conflict.py)."""
        self.session_store = store
        self.unvouched = store_conflict.unvouched(self.config.store, store, self.config.policies.held)

    def _welcomed(
        self, welcome: wire.Welcome, nursery: trio.Nursery, stream: trio.abc.Stream, conn: wire.ClientConnection
    ) -> None:
        """Install the certificate issued for the hello's CSR, and renew it on this session."""
        if self.identity is None:
            return
        if welcome.issued is not None:
            self._install_certificate(welcome.issued)
            if self.tls is not None:
                self.tls.check_issuer()
        if conn.protocol_version is not None and conn.protocol_version >= wire.IDENTITY_VERSION:

            async def request(csr: bytes) -> None:
                await self._send(stream, conn.csr(csr))

            nursery.start_soon(self.identity.renew, request)

    def _install_certificate(self, issued: wire.Issued) -> None:
        if self.identity is None:
            return
        try:
            self.identity.install(issued)
        except IdentityError as exc:  # the control plane sent what we cannot use: reconnect
            raise wire.WireError("bad-certificate", f"the certificate issued is refused: {exc}") from None

    def _on_push(self, conn: wire.ClientConnection, push: wire.Push) -> bytes:
        """Apply ``push``, serve and persist the result; the ACK or NACK to send."""
        previous = self.acked_versions.get(push.type, "")  # xDS: a NACK names the last accepted version
        kept: tuple[str, ...] = ()
        if push.type == wire.POLICIES:
            decision = store_conflict.decide(push, self.unvouched)
            push, kept, self.unvouched = decision.push, decision.kept, decision.unvouched
            self._store_conflict(kept)
            if decision.adopt and self.config.store != self.session_store:
                log.info("policies now from store %s (was %s)", self.session_store, self.config.store or "none")
                self.config.store = self.session_store
        refused = self.config.apply(push)
        if refused is None:
            return conn.ack(push)  # a type this build does not know: nothing to apply
        self._install("control-plane")
        if self.state_file is not None:
            write_last_good(self.state_file, self.config)
        self.pushes_applied += 1
        discovered = self.config.discovered
        for name in [n for n in self._waiting if discovered.has_answered(n)]:
            self._waiting.pop(name).set()  # answered: the lookup resumes on the new snapshot
        if refused or kept:
            why = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
            if kept:
                conflict = store_conflict.conflict_message(kept, self.config.store, self.session_store)
                why = f"{conflict}; {why}" if why else conflict
            self.nacks_sent += 1
            if refused:
                log.warning("rejected %s from the control plane: %s", list(refused), why)
            return conn.nack(push, previous, why, (*kept, *refused))
        self.acked_versions[push.type] = push.version
        return conn.ack(push)

    async def _answer_push(self, conn: wire.ClientConnection, push: wire.Push) -> bytes:
        """The push's ACK or NACK, once what it changed is served (by every worker, with --workers)."""
        previous = self.acked_versions.get(push.type)
        answer = self._on_push(conn, push)
        if self.settle is None or (why := await self.settle()) == "":
            return answer
        if previous is None:
            self.acked_versions.pop(push.type, None)
        else:
            self.acked_versions[push.type] = previous
        self.nacks_sent += 1
        log.warning("%s %s not applied by every worker: %s", push.type, push.version, why)
        return conn.nack(push, previous or "", why, ())

    def _store_conflict(self, kept: tuple[str, ...]) -> None:
        """Log a conflict once (again only when the policies kept change), and its end."""
        if kept == self.store_conflict:
            return
        if kept:
            log.error(
                "%s: keeping %s: they came from store %s, and the control plane's store %s does not have them "
                "(an empty or foreign store: a lost or different --data-dir?); removing them could let in callers "
                "they refuse. To resolve: re-apply them to this control plane (from git, or `meshlet get policies "
                "-o yaml` against a copy of the old data dir); this sidecar then takes its store; then delete "
                "there what you no longer want",
                store_conflict.STORE_CONFLICT,
                ", ".join(kept),
                self.config.store or "(unknown)",
                self.session_store or "(unnamed)",
            )
        else:
            log.info("store conflict resolved: the control plane's store has every policy this sidecar held")
        self.store_conflict = kept

    # on-demand discovery ---------------------------------------------------------------
    async def discover(self, service: str) -> None:
        """Return once ``service`` is in the installed snapshot, subscribing to it first
        if this sidecar never asked; MeshError when it does not exist (404 no-route) or
        the control plane cannot be asked in time (503 no-healthy-endpoints)."""
        state = self.config.discovered
        if service in state.endpoints:
            return  # installed while this request was on its way
        conn, stream = self._conn, self._stream
        refusal = state.refusal(service)
        if refusal is not None:
            raise refusal
        if not state.can_watch(service):
            raise MeshError(errors.NO_ROUTE, f"{service!r}: this sidecar already watches {wire.MAX_WATCHED} services")
        if (conn is None or stream is None or not self.connected) and self._rejoining is not None:
            with trio.move_on_after(DISCOVERY_TIMEOUT):
                await self._rejoining.wait()  # reconnecting after an ending for age: a moment
            conn, stream = self._conn, self._stream
        if conn is None or stream is None or not self.connected:
            state.watched.add(service)  # named in the next hello: it arrives once connected
            raise MeshError(
                errors.NO_HEALTHY_ENDPOINTS,
                f"service {service!r} is not known here and the control plane is unreachable to look it up",
            )
        if not conn.can_watch or self.watch_all:
            # protocol version 1, or watching all: the control plane sends every service
            raise MeshError(errors.NO_ROUTE, f"no service named {service!r} in the mesh")
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
        state = self.config.discovered
        if service in state.endpoints:
            return
        raise state.refusal(service) or MeshError(
            errors.NO_HEALTHY_ENDPOINTS, f"service {service!r}: no answer from the control plane to the lookup"
        )

    def _rejoined(self) -> None:
        if self._rejoining is not None:
            self._rejoining.set()
            self._rejoining = None

    def _answer_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for event in waiting.values():
            event.set()

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        async with self._send_lock:
            await stream.send_all(data)

    async def _pinger(self, stream: trio.abc.Stream) -> None:
        ping = 0
        while True:
            await trio.sleep(PING_INTERVAL)
            ping += 1
            try:
                await self._send(stream, wire.encode(wire.Ping(ping)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader sees the end too

    # readiness --------------------------------------------------------------------------
    @property
    def reported_ready(self) -> bool:
        """What the registry hears: the app is healthy and this sidecar has a configuration
        (its inbound listener refuses until then), so nobody is sent here before it can serve."""
        if self.identity is not None and self.identity.not_ready():
            return False  # no certificate (yet, or any more): peers would refuse us
        if self.serving is not None and not self.serving():
            return False  # a worker is not serving yet (starting, or restarted)
        return self.health is not None and self.health.ready and self.has_config

    async def report_readiness(self) -> None:
        """Tell the control plane if the readiness it heard changed (a worker started or died)."""
        await self._report_readiness()

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
        self._rejoined()  # no next session: lookups waiting for one go on now
        if self.health is not None:
            self.health.stop()
        with trio.move_on_after(2):
            await self._send_quietly(wire.Bye("draining"))


def _join_refused(exc: BaseException) -> bool:
    return _reason(exc) == "join-refused"


def _reason(exc: BaseException) -> str:
    """The reason of the protocol error (or the control plane's ``error``) that ended a session; "" for others."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _reason(exc.exceptions[0])
    return exc.reason if isinstance(exc, wire.WireError) else ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, wire.WireError) else str(exc)
