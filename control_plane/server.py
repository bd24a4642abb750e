"""The push channel server: accepts sidecars, registers their instances, keeps their
leases, reads each session's answers and keeps every channel alive.

A session's life: ``hello`` (5 s to arrive) → admitted only if it proves the service it
names (a join token or a certificate: control_plane/joins.py; else ``error`` and close) →
register the instance → ``welcome`` (with the certificate issued for the hello's CSR) →
the first push of every type, full → then pushes as the hub publishes changes, answers
handled as they come (an answer lets the next push of its type go at once). A session
has one task, its reader (plus a flusher while the kernel's buffer is full, see
channel.py); pushes are written by the hub, pings by one keepalive task for all
sessions. Any protocol error ends only that session: an ``error`` frame
is sent when possible, the socket closed, the instance's lease left to expire (a
sidecar that reconnects within the TTL keeps its registration).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
from typing import Any

import trio
from cryptography import x509

from meshlet import wire
from meshlet.identity import spiffe_id
from meshlet.io import Closed, Connection, TLSError, listen_socket, serve_socket, start_tls
from meshlet.wire import ENDPOINTS, POLICIES

from .ca import CAError
from .channel import Channel
from .joins import Joins
from .ownership import Burst, Claims, admin_refusal, session_owner
from .policies import PolicyStore
from .push import ANSWER_TIMEOUT, PING_INTERVAL, Certified, Hub, Session, SessionView
from .push_tls import TLS_HANDSHAKE, PushTLS
from .registry import Instance, Registrar, Registry, UnknownInstance
from .session_age import MAX_SESSION_AGE, MaxAge
from .span_tokens import SpanTokens, new_token

log = logging.getLogger("meshlet.cp.server")

HELLO_TIMEOUT = 5.0  # a connection that has not said hello by then (TLS handshake included) is closed
MAX_CONNECTIONS = 10_000  # push-channel connections at once (--max-connections); past it refused
# What connections that have not said hello yet may make us hold, together. Each may buffer up
# to a hello frame (wire.HELLO_MAX_FRAME); a real hello is a few KiB, so thousands of sidecars
# reconnecting at once fit, while a peer that sends big frames and no hello is refused past it.
PRE_HELLO_BUDGET = 32 * 1024 * 1024
EXPIRY_INTERVAL = 1.0  # how often leases are checked; expiry happens within TTL + this
ENDPOINT_MEMO_MAX = 100_000  # endpoint bodies kept with their canonical bytes
KEEPALIVE_TICK = 0.5  # how often the keepalive looks for sidecars due a ping
CONFLICTS_LOGGED = 32  # distinct store conflicts (sets of policies kept) logged; later ones are only counted


class EndpointsView:
    """What every sidecar should hold of type ``endpoints``: service → (version, body),
    rebuilt only for services whose ready set changed."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cache: dict[str, tuple[str, tuple[str, list[dict[str, Any]]]]] = {}
        # The whole view, shared by every session's push until the registry changes:
        # thousands of sessions push after one change; building it once matters.
        self._view: dict[str, tuple[str, Any]] | None = None
        self._endpoints: dict[tuple[Any, ...], tuple[dict[str, Any], bytes]] = {}

    def invalidate(self) -> None:
        self._view = None

    def _endpoint(self, instance: Instance) -> tuple[dict[str, Any], bytes]:
        """One endpoint's body and canonical bytes, made once per instance content."""
        key = (
            instance.instance_id,
            instance.address,
            tuple(sorted(instance.labels.items())),
            instance.app_port,
            instance.protocol,
        )
        found = self._endpoints.get(key)
        if found is None:
            if len(self._endpoints) >= ENDPOINT_MEMO_MAX:
                self._endpoints.clear()
            # Every registered instance came from a sidecar's hello: its inbound listener speaks mTLS.
            body = wire.endpoint(
                instance.instance_id,
                instance.address,
                instance.labels,
                app_port=instance.app_port,
                mtls=True,
                protocol=instance.protocol,
            )
            found = self._endpoints[key] = (body, wire.canonical_bytes(body))
        return found

    def __call__(self) -> dict[str, tuple[str, Any]]:
        if self._view is not None:
            return self._view
        registry = self.registry
        out: dict[str, tuple[str, Any]] = {}
        for service in registry.services():
            ready = registry.endpoints(service)
            if not ready:
                continue
            key = registry.version(service)
            cached = self._cache.get(service)
            if cached is None or cached[0] != key:
                items = [self._endpoint(i) for i in ready]
                body = [item[0] for item in items]
                version = wire.list_version([item[1] for item in items])
                cached = self._cache[service] = (key, (version, body))
            out[service] = cached[1]
        for gone in set(self._cache) - set(out):
            del self._cache[gone]
        self._view = out
        return out


class PushServer:
    def __init__(
        self,
        registry: Registry,
        server_id: str = "meshlet-cp",
        policies: PolicyStore | None = None,
        max_connections: int = MAX_CONNECTIONS,
        store_id: str = "",
        joins: Joins | None = None,
        tls: PushTLS | None = None,
        registrar: Registrar | None = None,
        max_session_age: float = MAX_SESSION_AGE,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry  # what sidecars are pushed, status and the API read: every replica's instances
        # Where this server's sessions register: the registry itself, or with replicas
        # (control_plane/replicas/) a registry of this replica's sessions written through to etcd.
        self.registrar: Registrar = registry if registrar is None else registrar
        # Sessions end after this age (0: never), so sidecars spread again over the replicas.
        self.max_age = MaxAge(max_session_age, rng or random.Random())
        self.store_id = store_id  # told in welcome; sidecars keep policies from another store
        self._conflicts_logged: set[tuple[str, ...]] = set()  # the store conflicts logged, by policies kept
        self.tls = tls  # None: plaintext only
        # Who may join, and their certificates. None: nobody can prove who they are, so no
        # hello is accepted (a push server is never open by default).
        self.joins = joins
        self.max_connections = max_connections
        self.connections = 0  # open push-channel connections, hello or not
        self.pre_hello_bytes = 0  # received by connections still waiting for their hello
        self.pre_hello_budget = PRE_HELLO_BUDGET
        self.refused = {"max-connections": 0, "pre-hello-budget": 0}  # connections refused, by cap
        self._refusal_logged = False
        self.policies = policies
        self.server_id = server_id
        self.api_port = 0  # the HTTP API's port, told to sidecars in welcome (where to send spans)
        self.api_tls = False  # and whether it speaks https
        self.endpoints = EndpointsView(registry)
        self.hub = Hub(self.wanted)
        self.protocol_errors = 0
        self.claims = Claims()  # the instance ids and nodes of live sessions (control_plane/ownership.py)
        self.admin_refused = Burst()  # registrations whose admin address is not fetched
        self.hello_timeouts = Burst()  # connections closed without a hello in time
        self.span_tokens = SpanTokens()  # what each session's spans carry (control_plane/span_tokens.py)
        self._pings = 0
        self._policies_view: tuple[str, dict[str, tuple[str, Any]]] | None = None
        self._nursery: trio.Nursery | None = None  # where flushers run (set by serve)

    def wanted(self, type: str) -> dict[str, tuple[str, Any]]:
        if type == ENDPOINTS:
            return self.endpoints()
        if type == POLICIES and self.policies is not None:
            if self._policies_view is None or self._policies_view[0] != self.policies.version:
                self._policies_view = (self.policies.version, self.policies.resources())
            return self._policies_view[1]
        return {}

    def policies_changed(self, before: dict[str, tuple[str, Any]]) -> None:
        """After an apply: push the policies that were added, changed or removed."""
        after = self.wanted(POLICIES)
        names = {n for n in set(before) | set(after) if before.get(n, ("",))[0] != after.get(n, ("",))[0]}
        self.hub.changed(POLICIES, names)

    def changed(self, services: set[str]) -> None:
        """Every registry change that alters what sidecars see comes through here."""
        if services:
            self.endpoints.invalidate()
            self.hub.changed(ENDPOINTS, services)

    # serving --------------------------------------------------------------------------
    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = listen_socket(host, port, backlog=4096)
        try:
            async with trio.open_nursery() as nursery:
                self.hub.warm_until = trio.current_time() + self.registry.ttl
                log.info(
                    "warming up for %.0f s: sidecars reconnect and re-register; until then no push removes "
                    "what a sidecar holds",
                    self.registry.ttl,
                )
                nursery.start_soon(self.hub.end_warm_up)
                nursery.start_soon(self._expire_leases)
                nursery.start_soon(self.hub.serve_debounce)
                nursery.start_soon(self._keepalive)
                self._nursery = nursery
                task_status.started(listener.getsockname()[1])
                await serve_socket(listener, self._session, nursery)
        finally:
            listener.close()

    async def _expire_leases(self) -> None:
        preserving = False
        while True:
            await trio.sleep(EXPIRY_INTERVAL)
            result = self.registrar.expire(trio.current_time())
            if result.removed:
                log.info("leases expired: %s", ", ".join(result.removed))
            if result.self_preservation != preserving:
                preserving = result.self_preservation
                if preserving:
                    log.warning("self-preservation ON: %s", self.registrar.self_preservation_reason)
                else:
                    log.warning("self-preservation OFF: lease expiry resumes")
            self.changed(set(result.changed))

    async def _session(self, io: Connection) -> None:
        """One sidecar's channel, from hello to close. One task reads (answers are
        handled as they come); the channel's flusher runs only when the kernel's buffer
        was full; pushes are written by the hub, pings by the keepalive."""
        assert self._nursery is not None
        channel = Channel(io, self._nursery.start_soon)
        if (cap := self._over_cap()) is not None:
            self._refuse(channel, io.peer, *cap)
            return
        self.connections += 1
        conn = wire.ServerConnection(self.server_id, api_port=self.api_port, api_tls=self.api_tls, store=self.store_id)
        session: Session | None = None
        try:
            certified: tuple[str | None, str] = (None, "")  # the client certificate's service; why it is refused
            secured = None
            hello_by = trio.current_time() + HELLO_TIMEOUT  # the TLS handshake and the hello, together
            with trio.move_on_at(hello_by) as handshake:
                secured = await self._secure(io)
            if secured is None:
                if handshake.cancelled_caught:
                    self._hello_timed_out(io.peer)
                return  # closed, a failed handshake, or none in time
            io, certified = secured
            channel = Channel(io, self._nursery.start_soon)
            early: list[wire.Message] = []
            held = 0  # counted against the pre-hello budget until the hello is in
            try:
                with trio.move_on_at(hello_by):
                    while conn.hello is None:
                        data = await channel.recv()
                        if not data:
                            return
                        held += len(data)
                        self.pre_hello_bytes += len(data)
                        if self.pre_hello_bytes > self.pre_hello_budget:
                            why = f"connections without a hello hold {self.pre_hello_budget} bytes"
                            self._refuse(channel, io.peer, "pre-hello-budget", why)
                            return
                        early = conn.receive_data(data)
            finally:
                self.pre_hello_bytes -= held
            if conn.hello is None:
                self._hello_timed_out(io.peer)
                return
            conn.choose_version()  # an unknown protocol version is refused first (WireError)
            if not self._admitted(conn.hello, channel, io.peer, certified):
                return  # refused: nothing registered, nothing pushed
            span_token = new_token()  # worth nothing until the session opens
            # The certificate is issued before the instance is registered, but only sent (in
            # welcome) once the registration is accepted.
            welcome, issued = self._welcome(conn, span_token)  # refuses a bad CSR before registering anything
            session = self._open(conn, channel, io.peer, span_token)  # ValueError, InstanceInUse
            session.certified = self._certified(issued, session.service)
            channel.write(welcome)
            self.hub.push_first(session)
            for message in early[1:]:
                self._handle(session, message)
            await self._read(session, channel)
        except wire.WireError as exc:
            self.protocol_errors += 1
            log.warning("sidecar at %s: protocol error: %s", io.peer, exc)
            _send_error(channel, exc.reason, exc.detail)
        except Closed:
            pass
        except InstanceInUse as exc:
            self._refuse_claim(channel, io.peer, str(exc))
        except CAError as exc:  # a CSR the CA refuses (its reason holds no key material)
            self.protocol_errors += 1
            log.warning("sidecar at %s: certificate request refused: %s", io.peer, exc.reason)
            _send_error(channel, "bad-csr", exc.reason)
        except ValueError as exc:  # an instance the registry refuses
            self.protocol_errors += 1
            log.warning("sidecar at %s: instance refused: %s", io.peer, exc)
            _send_error(channel, "bad-instance", str(exc))
        except Exception:  # a bug of ours: this session ends, the others go on
            log.exception("session with %s failed", io.peer)
        finally:
            self.connections -= 1
            channel.close()
            if session is not None:
                self._close(session)

    def _hello_timed_out(self, peer: str) -> None:
        if self.hello_timeouts.starts(trio.current_time()):
            log.warning(
                "connection from %s closed: no hello within %g s (later ones are only counted: "
                "meshlet_cp_hello_timeouts_total)",
                peer,
                HELLO_TIMEOUT,
            )

    def _refuse_claim(self, channel: Channel, peer: str, why: str) -> None:
        """A hello for an instance id or node another session holds: refused, the holder
        untouched. Counted; the first of a burst logged."""
        if self.claims.refused.starts(trio.current_time()):
            log.warning(
                "sidecar at %s refused: %s (counted in meshlet_cp_claims_refused_total, "
                "not logged again in this burst)",
                peer,
                why,
            )
        _send_error(channel, "instance-in-use", why)

    def _check_admin(self, instance: Instance, now: float) -> None:
        """A registration whose admin address is not on the session's host is accepted, its
        admin never fetched (control_plane/scraper.py). Counted; the first of a burst logged."""
        why = admin_refusal(instance.admin, instance.owner)
        if why is not None and self.admin_refused.starts(now):
            log.warning(
                "sidecar %s (%s): admin %s refused, %s (it came from %s); not scraped (counted in "
                "meshlet_cp_admin_refused_total, not logged again in this burst)",
                instance.node,
                instance.instance_id,
                instance.admin,
                why,
                instance.owner.host if instance.owner else "unknown",
            )

    async def _secure(self, io: Connection) -> tuple[Connection, tuple[str | None, str]] | None:
        """TLS when the sidecar starts a handshake (its first byte says so): the TLS connection
        and what its client certificate proves; plaintext otherwise (a join token over it is
        still accepted: docs/security.md). None when the connection ended or the handshake failed."""
        if self.tls is None:
            return io, (None, "")
        first = await _peek(io)
        if first is None:
            return None
        if first != TLS_HANDSHAKE:
            return io, (None, "")
        tls = start_tls(io, self.tls.context(), server_side=True)
        try:
            await tls.handshake()
        except TLSError as exc:  # most often a client certificate that does not verify
            tls.close()
            if self.joins is not None:
                self.joins.refuse_handshake(io.peer, str(exc), trio.current_time())
            return None
        except Closed:
            tls.close()
            return None
        except BaseException:  # the hello timeout: the TLS socket is ours to close
            tls.close()
            raise
        return tls, self.tls.peer_service(tls)

    def _admitted(
        self, hello: wire.Hello, channel: Channel, peer: str, certified: tuple[str | None, str] = (None, "")
    ) -> bool:
        """Whether the hello proves the service it names (control_plane/joins.py); if not, the
        sidecar is told why and what to do, and the connection is closed."""
        if self.joins is None:
            _send_error(channel, "join-refused", "this control plane admits no sidecar (it has no CA)")
            return False
        service, why = certified
        admission = self.joins.admit(
            hello, peer, trio.current_time(), certificate_service=service, certificate_error=why
        )
        if not admission.ok:
            _send_error(channel, "join-refused", self.joins.refusal(admission))
        return admission.ok

    def _welcome(self, conn: wire.ServerConnection, span_token: str) -> tuple[bytes, wire.Issued | None]:
        """``welcome``, with the certificate issued for the hello's CSR: for the service the
        hello proved, whatever names the CSR asks for; and that certificate."""
        hello = conn.hello
        assert hello is not None and self.joins is not None
        issued = self.joins.issue(hello.csr, hello.service) if hello.csr else None
        return conn.accept(issued, span_token), issued

    def _certified(self, issued: wire.Issued | None, service: str) -> Certified | None:
        """What ``meshlet check`` is told of a certificate issued to a session (None: none was)."""
        if issued is None or self.joins is None:
            return None
        leaf = x509.load_pem_x509_certificate(issued.chain)  # ours, just signed: the leaf comes first
        return Certified(
            spiffe_id(self.joins.trust_domain, service),
            leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp(),
        )

    def bundle_changed(self) -> None:
        """The trust bundle changed (a CA rotation): every session that speaks identities hears it."""
        if self.joins is None:
            return
        frame = wire.encode(wire.Bundle(self.joins.bundle()))
        for session in list(self.hub.sessions.values()):
            if session.conn.speaks_identity and not session.closed:
                session.write(frame)

    def _over_cap(self) -> tuple[str, str] | None:
        if self.connections >= self.max_connections:
            return "max-connections", f"{self.max_connections} push-channel connections are open (--max-connections)"
        return None

    def _refuse(self, channel: Channel, peer: str, cap: str, why: str) -> None:
        """Close a connection over a cap at once, with an error the sidecar logs before it
        retries (with its backoff). Counted; logged the first time only (a flood would
        otherwise flood the log too)."""
        self.refused[cap] += 1
        if not self._refusal_logged:
            self._refusal_logged = True
            log.warning(
                "refusing push-channel connections: %s (first from %s; counted in "
                "meshlet_cp_connections_refused_total, not logged again)",
                why,
                peer,
            )
        _send_error(channel, "overloaded", f"the control plane refuses new connections: {why}; retry later")
        channel.close()

    def _open(self, conn: wire.ServerConnection, channel: Channel, peer: str, span_token: str) -> Session:
        hello = conn.hello
        assert hello is not None
        owner = session_owner(hello.service, peer)  # admitted (joins.py): the service the session proved
        instance = dataclasses.replace(instance_from_hello(hello), owner=owner)
        refusal = self.claims.refusal(
            owner, instance.instance_id, hello.node, self.registry.owner(instance.instance_id)
        )
        if refusal is not None:
            raise InstanceInUse(refusal)
        now = trio.current_time()
        self._check_admin(instance, now)
        self.changed(self.registrar.register(instance, now))
        watches = conn.watches()
        session = Session(
            node=hello.node,
            service=hello.service,
            instance_id=instance.instance_id,
            conn=conn,
            views={t: SessionView.from_hello(dict(hello.have.get(t, {})), watches[t]) for t in wire.RESOURCE_TYPES},
            connected_at=now,
            last_seen=now,
            channel=channel,
            ready=instance.ready,
            next_ping=now + PING_INTERVAL,
            instance=instance,
            store=hello.store,
        )
        session.views[POLICIES].foreign(hello.store, self.store_id, self.wanted(POLICIES))
        self.hub.add(session)
        self.max_age.track(session, now)
        self.claims.hold(session, instance.instance_id, hello.node)
        self.span_tokens.grant(session, span_token, hello.service)
        log.info("sidecar %s (%s/%s) connected from %s", hello.node, hello.service, instance.instance_id, peer)
        self._log_conflict(session)
        return session

    def store_conflicts(self) -> int:
        """Connected sidecars that keep policies this control plane's store lacks."""
        return sum(1 for session in self.hub.sessions.values() if session.store_conflict() is not None)

    def _log_conflict(self, session: Session) -> None:
        """Once per set of policies kept (a restart on an empty store puts every sidecar in
        conflict over the same policies: one line, not one per sidecar), at most
        ``CONFLICTS_LOGGED`` sets; ``meshlet status`` and the metric have every sidecar."""
        conflict = session.store_conflict()
        if conflict is None:
            return
        kept = tuple(conflict["kept"])
        if kept in self._conflicts_logged or len(self._conflicts_logged) >= CONFLICTS_LOGGED:
            return
        self._conflicts_logged.add(kept)
        log.warning(
            "sidecar %s keeps %s from store %s, which this control plane's store %s lacks (other sidecars "
            "keeping the same are not logged: see meshlet status, meshlet_cp_store_conflicts): %s",
            session.node,
            ", ".join(kept),
            session.store or "(unknown)",
            self.store_id,
            conflict["hint"],
        )

    def _nacked(self, session: Session, nack: wire.Nack) -> None:
        """Names the push carried were rejected (not sent again at that version); names it did
        not carry, in a store-conflict NACK, are policies the sidecar keeps (never re-removed)."""
        push = session.in_flight.get(nack.type)
        if push is None:
            return
        view = session.views.setdefault(nack.type, SessionView())
        view.nacked([n for n in nack.names if n in push.attempted], push.previous, push.attempted)
        if nack.type == POLICIES and nack.message.startswith(wire.STORE_CONFLICT):
            before = set(view.kept)
            view.refused_removal([n for n in nack.names if n not in push.attempted], push.previous)
            if view.kept != before:
                self._log_conflict(session)

    def _close(self, session: Session) -> None:
        self.claims.release(session, session.instance_id, session.node)
        self.span_tokens.revoke(session, trio.current_time())
        if session.closed and self.hub.sessions.get(session.node) is not session:
            return  # said bye: deregistered already
        session.closed = True
        self.hub.remove(session)
        try:
            self.changed(self.registrar.disconnected(session.instance_id, trio.current_time()))
        except UnknownInstance:
            pass  # said bye, or already expired

    async def _read(self, session: Session, channel: Channel) -> None:
        while not session.closed:
            data = await channel.recv()
            if not data:
                return
            session.last_seen = trio.current_time()
            for message in session.conn.receive_data(data):
                self._handle(session, message)

    def _handle(self, session: Session, message: wire.Message) -> None:
        if session.closed:
            return  # what followed a bye in the same read: the sidecar is gone
        now = trio.current_time()
        self._renew(session, now)
        if isinstance(message, wire.Ack):
            if message.type == POLICIES and not session.views[POLICIES].unvouched:
                session.store = self.store_id  # it has every policy from this store: it took it as theirs
            session.last_answer[message.type] = "ack"
            self.hub.answered(session, message.type, now)
        elif isinstance(message, wire.Nack):
            self._nacked(session, message)
            session.last_nack = message
            session.last_answer[message.type] = "nack"
            self.hub.nacks_total += 1
            log.warning(
                "sidecar %s rejected %s %s: %s", session.node, message.type, list(message.names), message.message
            )
            self.hub.answered(session, message.type, now)
        elif isinstance(message, wire.Ping):
            session.write(wire.encode(wire.Pong(message.id)))
        elif isinstance(message, wire.Watch):
            if message.type not in wire.RESOURCE_TYPES:
                raise wire.WireError("bad-message", f"watch: unknown resource type {message.type!r}")
            self.hub.subscribe(session, message.type, message.add, message.remove, now)
        elif isinstance(message, wire.Csr):
            # A renewal: issued for the session's proven service (session.service), never a name the CSR asks for.
            assert self.joins is not None  # a session exists only once joins admitted it
            try:
                issued = self.joins.issue(message.csr, session.service)
            except CAError as exc:
                raise wire.WireError("bad-csr", exc.reason) from None
            session.certified = self._certified(issued, session.service)
            session.write(wire.encode(wire.Cert(issued)))
        elif isinstance(message, wire.Health):
            session.ready = message.ready
            self.changed(self.registrar.set_ready(session.instance_id, message.ready, now))
        elif isinstance(message, wire.Bye):
            log.info("sidecar %s says bye (%s): deregistered", session.node, message.reason)
            self.changed(self.registrar.deregister(session.instance_id))
            session.closed = True
            self.hub.remove(session)
            session.channel.close()

    def _renew(self, session: Session, now: float) -> None:
        """Any message renews the lease. If it ran out while the channel stayed up (the sidecar
        was paused past the TTL: a long GC, CPU throttling, a stopped VM; the keepalive allows a
        longer silence), the sidecar is alive again: put its hello's registration back now, not at
        its next reconnect."""
        try:
            self.registrar.renew(session.instance_id, now)
            return
        except UnknownInstance:
            pass
        if session.instance is None:
            return
        instance = dataclasses.replace(session.instance, ready=session.ready)
        self.changed(self.registrar.restore(instance, now))
        log.warning(
            "sidecar %s (%s/%s): its lease ran out while its channel stayed up (paused?); registration restored",
            session.node,
            session.service,
            session.instance_id,
        )

    async def _keepalive(self) -> None:
        """One task pings every sidecar every ``PING_INTERVAL`` (each on its own phase)
        and closes those that are silent, do not answer a push, or stopped reading."""
        judged_from = trio.current_time()  # nothing before this counts against a sidecar
        last = judged_from
        while True:
            await trio.sleep(KEEPALIVE_TICK)
            now = trio.current_time()
            if now - last > 2 * PING_INTERVAL:
                # We woke up late: the control plane itself stalled (a burst of work), so
                # the silence may be ours, not the sidecars'. Judge afresh from now.
                judged_from = now
            last = now
            ping = b""
            for session in list(self.hub.sessions.values()):
                if session.next_ping > now or session.closed:
                    continue
                session.next_ping = now + PING_INTERVAL
                why = _unhealthy(session, now, judged_from)
                if why:
                    log.warning("sidecar %s %s: closing", session.node, why)
                    session.channel.close()
                    continue
                if not ping:  # one ping frame per sweep, the same for every sidecar
                    self._pings += 1
                    ping = wire.encode(wire.Ping(self._pings))
                session.write(ping)
            self._end_aged(now)

    def _end_aged(self, now: float) -> None:
        """Tell a few sessions past their maximum age to go (the sidecar closes, then reconnects);
        close those told a while ago that have not. Not a failure: logged at INFO, the
        registration left to its lease."""
        for session in self.max_age.overstayed(now):
            session.channel.close()
        ended = self.max_age.due(now, len(self.hub.sessions))
        if not ended:
            return
        frame = wire.encode(wire.Error(wire.SESSION_AGE, "the session reached its maximum age: reconnect"))
        for session in ended:
            log.info("sidecar %s: session ended after its maximum age; it reconnects", session.node)
            session.write(frame)


def _unhealthy(session: Session, now: float, judged_from: float) -> str:
    if now - max(session.last_seen, judged_from) > 3 * PING_INTERVAL:
        return f"silent for {now - session.last_seen:.0f} s"
    stuck = [t for t, push in session.in_flight.items() if now - max(push.sent_at, judged_from) > ANSWER_TIMEOUT]
    if stuck:
        return f"did not answer {stuck}"
    blocked = session.channel.blocked_since
    if blocked is not None and now - max(blocked, judged_from) > PING_INTERVAL:
        return "is not reading"
    return ""


class InstanceInUse(Exception):
    """A hello claims an instance id or node that belongs to another session."""


def instance_from_hello(hello: wire.Hello) -> Instance:
    """The instance a hello registers. Field types are the wire's business (WireError, like any
    malformed message); values the registry's (ValueError from :class:`Instance`)."""
    raw = hello.instance

    def text(key: str) -> str:
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise wire.WireError("bad-message", f"hello.instance.{key} must be a string, not {type(value).__name__}")
        return value

    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise wire.WireError("bad-message", "hello.instance.labels must be a map of strings to strings")
    app_port = raw.get("app_port", 0)
    if not isinstance(app_port, int) or isinstance(app_port, bool):
        raise wire.WireError(
            "bad-message", f"hello.instance.app_port must be an integer, not {type(app_port).__name__}"
        )
    protocol = raw.get("protocol", "")  # its value is the registry's to check (Instance)
    if not isinstance(protocol, str):
        raise wire.WireError("bad-message", f"hello.instance.protocol must be a string, not {type(protocol).__name__}")
    ready = raw.get("ready", False)
    if not isinstance(ready, bool):
        raise wire.WireError("bad-message", f"hello.instance.ready must be a boolean, not {type(ready).__name__}")
    return Instance(
        service=hello.service,
        instance_id=text("instance_id"),
        address=text("address"),
        admin=text("admin"),
        labels=labels,
        node=hello.node,
        app_port=app_port,
        protocol=protocol,
        ready=ready,
    )


async def _peek(io: Connection) -> int | None:
    """The first byte the peer sent, left in the socket; None if it closed first."""
    while True:
        try:
            first = io.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            try:
                await trio.lowlevel.wait_readable(io.sock)
            except (trio.ClosedResourceError, OSError):
                return None
            continue
        except OSError:
            return None
        return first[0] if first else None


def _send_error(channel: Channel, reason: str, message: str) -> None:
    channel.write(wire.encode(wire.Error(reason, message)))
