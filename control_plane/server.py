"""The push channel server: accepts sidecars, registers their instances, keeps their
leases, and runs each session's reader, sender and keepalive.

A session's life: ``hello`` (5 s to arrive) → register the instance → ``welcome`` →
the first push of every type, full → then pushes as the hub marks changes, answers
handled as they come. Any protocol error ends only that session: an ``error`` frame
is sent when possible, the socket closed, the instance's lease left to expire (a
sidecar that reconnects within the TTL keeps its registration).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from . import wire
from .push import ANSWER_TIMEOUT, PING_INTERVAL, Hub, Session, SessionView, build_push
from .registry import Instance, Registry, UnknownInstance
from .wire import ENDPOINTS

log = logging.getLogger("meshlet.cp.server")

HELLO_TIMEOUT = 5.0
EXPIRY_INTERVAL = 1.0  # how often leases are checked; expiry happens within TTL + this


class EndpointsView:
    """What every sidecar should hold of type ``endpoints``: service → (version, body),
    rebuilt only for services whose ready set changed."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cache: dict[str, tuple[str, tuple[str, list[dict[str, Any]]]]] = {}
        # The whole view, shared by every session's push until the registry changes:
        # thousands of sessions push after one change; building it once matters.
        self._view: dict[str, tuple[str, Any]] | None = None

    def invalidate(self) -> None:
        self._view = None

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
                body = [wire.endpoint(i.instance_id, i.address, i.labels) for i in ready]
                cached = self._cache[service] = (key, (wire.content_version(body), body))
            out[service] = cached[1]
        for gone in set(self._cache) - set(out):
            del self._cache[gone]
        self._view = out
        return out


class PushServer:
    def __init__(self, registry: Registry, server_id: str = "meshlet-cp") -> None:
        self.registry = registry
        self.server_id = server_id
        self.endpoints = EndpointsView(registry)
        self.hub = Hub(self.wanted)
        self.protocol_errors = 0

    def wanted(self, type: str) -> dict[str, tuple[str, Any]]:
        if type == ENDPOINTS:
            return self.endpoints()
        return {}

    def changed(self, services: set[str]) -> None:
        """Every registry change that alters what sidecars see comes through here."""
        if services:
            self.endpoints.invalidate()
            self.hub.changed(ENDPOINTS, services)

    # serving --------------------------------------------------------------------------
    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_leases)
            nursery.start_soon(self.hub.serve_debounce)
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self._session, listeners)

    async def _expire_leases(self) -> None:
        preserving = False
        while True:
            await trio.sleep(EXPIRY_INTERVAL)
            result = self.registry.expire(trio.current_time())
            if result.removed:
                log.info("leases expired: %s", ", ".join(result.removed))
            if result.self_preservation != preserving:
                preserving = result.self_preservation
                if preserving:
                    log.warning("self-preservation ON: %s", self.registry.self_preservation_reason)
                else:
                    log.warning("self-preservation OFF: lease expiry resumes")
            self.changed(set(result.changed))

    async def _session(self, io: trio.SocketStream) -> None:
        conn = wire.ServerConnection(self.server_id)
        session: Session | None = None
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                while conn.hello is None:
                    data = await io.receive_some(65536)
                    if not data:
                        return
                    early = conn.receive_data(data)
            welcome = conn.accept()  # refuses an unknown protocol version before registering anything
            session = self._open(conn, io)
            await session.send(io, welcome)
            for message in early[1:]:
                await self._handle(session, io, message)
            await self._run(session, io)
        except wire.WireError as exc:
            self.protocol_errors += 1
            log.warning("sidecar at %s: protocol error: %s", _peer(io), exc)
            await _send_error(io, exc.reason, exc.detail)
        except (*_GONE, trio.TooSlowError):
            pass
        except ValueError as exc:  # an instance the registry refuses
            await _send_error(io, "bad-instance", str(exc))
        except Exception:  # a bug of ours: this session ends, the others go on
            log.exception("session with %s failed", _peer(io))
        finally:
            io.socket.close()
            if session is not None:
                self._close(session)

    def _open(self, conn: wire.ServerConnection, io: trio.SocketStream) -> Session:
        hello = conn.hello
        assert hello is not None
        raw = hello.instance
        instance = Instance(
            service=hello.service,
            instance_id=str(raw.get("instance_id", "")),
            address=str(raw.get("address", "")),
            admin=str(raw.get("admin", "")),
            labels={str(k): str(v) for k, v in dict(raw.get("labels", {})).items()},
            node=hello.node,
            ready=bool(raw.get("ready", False)),
        )
        now = trio.current_time()
        self.changed(self.registry.register(instance, now))
        old = self.hub.sessions.get(hello.node)
        if old is not None:
            old.closed = True
            old.wakeup.set()
        session = Session(
            node=hello.node,
            service=hello.service,
            instance_id=instance.instance_id,
            conn=conn,
            views={ENDPOINTS: SessionView.from_hello(dict(hello.have.get(ENDPOINTS, {})))},
            connected_at=now,
            last_seen=now,
            ready=instance.ready,
        )
        self.hub.sessions[hello.node] = session
        log.info("sidecar %s (%s/%s) connected from %s", hello.node, hello.service, instance.instance_id, _peer(io))
        return session

    def _close(self, session: Session) -> None:
        session.closed = True
        if self.hub.sessions.get(session.node) is session:
            del self.hub.sessions[session.node]
            try:
                self.changed(self.registry.disconnected(session.instance_id, trio.current_time()))
            except UnknownInstance:
                pass  # said bye, or already expired

    async def _run(self, session: Session, io: trio.SocketStream) -> None:
        for type in wire.RESOURCE_TYPES:  # the first push of each type is full
            built = build_push(session, type, self.wanted(type), full=True)
            if built is not None:
                self.hub.pushes_total += 1
                await session.send(io, built[1])
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(self._until_gone, self._read(session, io), scope)
            nursery.start_soon(self._until_gone, self._send(session, io), scope)
            nursery.start_soon(self._until_gone, self._keepalive(session, io), scope)

    async def _until_gone(self, work: Any, scope: trio.CancelScope) -> None:
        """Run one of a session's tasks; whichever ends first (peer gone, protocol
        error, bye, silence) ends the session's other tasks too."""
        try:
            await work
        except _GONE:
            pass
        except wire.WireError as exc:
            self.protocol_errors += 1
            log.warning("session protocol error: %s", exc)
        finally:
            scope.cancel()

    async def _read(self, session: Session, io: trio.SocketStream) -> None:
        while not session.closed:
            data = await io.receive_some(65536)
            if not data:
                return
            session.last_seen = trio.current_time()
            try:
                messages = session.conn.receive_data(data)
            except wire.WireError as exc:
                await _send_error(io, exc.reason, exc.detail)
                raise
            for message in messages:
                await self._handle(session, io, message)

    async def _handle(self, session: Session, io: trio.SocketStream, message: wire.Message) -> None:
        now = trio.current_time()
        try:
            self.registry.renew(session.instance_id, now)
        except UnknownInstance:  # expired while connected (e.g. self-preservation off, long stall)
            pass
        if isinstance(message, wire.Ack):
            started, _, _ = session.in_flight.pop(message.type, (now, {}, {}))
            self.hub.observe_convergence(now - started)
            session.wakeup.set()
        elif isinstance(message, wire.Nack):
            _, previous, attempted = session.in_flight.pop(message.type, (now, {}, {}))
            session.views.setdefault(message.type, SessionView()).nacked(message.names, previous, attempted)
            session.last_nack = message
            self.hub.nacks_total += 1
            log.warning(
                "sidecar %s rejected %s %s: %s", session.node, message.type, list(message.names), message.message
            )
            session.wakeup.set()
        elif isinstance(message, wire.Ping):
            await session.send(io, wire.encode(wire.Pong(message.id)))
        elif isinstance(message, wire.Health):
            session.ready = message.ready
            self.changed(self.registry.set_ready(session.instance_id, message.ready, now))
        elif isinstance(message, wire.Bye):
            log.info("sidecar %s says bye (%s): deregistered", session.node, message.reason)
            self.changed(self.registry.deregister(session.instance_id))
            session.closed = True
            session.wakeup.set()

    async def _send(self, session: Session, io: trio.SocketStream) -> None:
        while not session.closed:
            session.wakeup = trio.Event()
            for type in session.due():
                built = build_push(session, type, self.wanted(type), full=False)
                if built is not None:
                    self.hub.pushes_total += 1
                    await session.send(io, built[1])
            await session.wakeup.wait()  # a debounced batch, an answer, or the end

    async def _keepalive(self, session: Session, io: trio.SocketStream) -> None:
        ping = 0
        judged_from = trio.current_time()  # nothing before this counts against the sidecar
        while not session.closed:
            asleep_at = trio.current_time()
            await trio.sleep(PING_INTERVAL)
            now = trio.current_time()
            if now - asleep_at > 2 * PING_INTERVAL:
                # We woke up late: the control plane itself stalled (a burst of work), so
                # the silence may be ours, not the sidecar's. Judge it afresh from now.
                judged_from = now
                continue
            if now - max(session.last_seen, judged_from) > 3 * PING_INTERVAL:
                log.warning("sidecar %s silent for %.0f s: closing", session.node, now - session.last_seen)
                break
            stuck = [
                t
                for t, (started, _, _) in session.in_flight.items()
                if now - max(started, judged_from) > ANSWER_TIMEOUT
            ]
            if stuck:
                log.warning("sidecar %s did not answer %s: closing", session.node, stuck)
                break
            ping += 1
            with trio.move_on_after(PING_INTERVAL) as blocked:
                await session.send(io, wire.encode(wire.Ping(ping)))
            if blocked.cancelled_caught:  # its buffers are full: it stopped reading
                log.warning("sidecar %s is not reading: closing", session.node)
                break


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


def _peer(io: trio.SocketStream) -> str:
    try:
        host, port = io.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def _send_error(io: trio.SocketStream, reason: str, message: str) -> None:
    try:
        with trio.move_on_after(1):
            await io.send_all(wire.encode(wire.Error(reason, message)))
    except _GONE:
        pass
