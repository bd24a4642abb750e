"""Upstream side: a pool of persistent HTTP/1.1 connections per endpoint, and the
terminal handler that sends a request over one of them.

Pool rules (Envoy's, mostly): a connection carries one request at a time; it goes back
to the idle list only if the exchange ended cleanly (whole request sent, whole response
read, keep-alive on both sides, no stray bytes after the response); idle connections
expire after ``idle_timeout``; at most ``max_connections`` per endpoint exist at once
and at most ``max_idle`` wait idle. A request that finds all ``max_connections`` busy
waits, first come first served, for one to be released (handed to it directly) or
closed (its slot handed over), but no longer than its connect timeout: then it gets 503
``overloaded`` (Envoy queues such requests as pending and overflows them with a 503;
without a bound, a flood of slow requests to one app held every later one until the
client gave up). An idle connection on which anything arrived (a
response nobody asked for, or the peer's close) is never handed out again: those bytes
would answer the next caller (Envoy closes an idle upstream connection that becomes
readable; we poll it before reuse, unless it was released a moment ago). A reused connection that turns out to have been closed by the peer before it
answered a single byte is replaced by a fresh one, once, when the request is idempotent
and can still be sent again: no body bytes consumed yet, or no more than ``RESEND_LIMIT``
of them, kept until the answer starts (the peer may close just as the request goes out).
"""

from __future__ import annotations

import errno
import logging
import select
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from time import monotonic
from typing import TYPE_CHECKING, Protocol

import trio

from meshlet.headers import ERROR_HEADER
from meshlet.io import Closed, Connection, Deadlines, TLSConnection, TLSError, connect

from ..core import errors
from ..core.errors import MeshError
from ..core.h2_upstream import HTTP2_PROTOCOLS, upstream_version
from ..core.headers import forward_request_headers, forward_response_headers
from ..core.http1 import (
    CHUNKED_END,
    Data,
    EndOfMessage,
    ProtocolError,
    ResponseHead,
    ResponseReader,
    chunk,
    serialize_request_head,
)
from ..core.outcome import IDEMPOTENT
from ..core.services import Endpoint
from ..layers.base import WOULD_BLOCK, BodyPiece, BodySource, Request, Response
from .tls import MeshTLS, PeerIdentityError, check_peer_is

if TYPE_CHECKING:
    from .h2_pool import H2EndpointPool
    from .h2_upstream import H2Forwarder

log = logging.getLogger("meshlet.upstream")

MAX_CONNECTIONS = 1024  # Envoy's max_connections
MAX_IDLE = 256
# Shorter than our inbound listener's idle timeout (300 s), so the sidecar-to-sidecar
# leg closes idle connections from the client side and rarely races a server close.
IDLE_TIMEOUT = 60.0
# Body bytes kept while a request on a reused connection waits for its answer, to send
# again on a fresh connection if the peer turns out to have closed the idle one.
RESEND_LIMIT = 64 * 1024
# An idle connection reused sooner than this after its release is not checked for a
# close first (see _quiet).
RECHECK_AFTER = 0.02

_NETWORK_ERRORS = (Closed, OSError)


# Where a loop comes from, and what fixes it (the routing layer says the same for HTTP loops).
LOOP_HINT = (
    "this sidecar's own connection to {service} was redirected back to it: the iptables rules do not exempt the "
    "sidecar's own traffic (run the sidecar as the --proxy-uid given to meshlet init-iptables, 1337 by default)"
)


class OwnConnections:
    """Transparent mode: the source ports of this sidecar's own mTLS connections, so that one
    the iptables rules send back to its outbound listener (they do not exempt the sidecar's
    uid) is told from an app's connection. HTTP loops are caught by their ``Via``; a TLS
    connection cannot be read, so the outbound listener marks its port ``looped`` and the
    pool answers ``loop-detected`` instead of a failed handshake."""

    __slots__ = ("open", "looped")

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.looped: set[int] = set()


class UpstreamClosed(Exception):
    """The upstream closed the connection before the response was complete."""


class UpstreamConnection:
    __slots__ = (
        "io",
        "reader",
        "pool",
        "idle_since",
        "released_at",
        "bytes_received",
        "epoch",
        "new_session",
        "source_port",
    )

    def __init__(self, io: Connection, pool: EndpointPool, epoch: int = 0, source_port: int = 0) -> None:
        self.io = io
        self.reader = ResponseReader()
        self.pool = pool
        self.idle_since = 0.0
        self.released_at = 0.0  # time.monotonic() when it last went back to the pool
        self.bytes_received = 0  # during the current exchange
        self.epoch = epoch  # MeshTLS.epoch() when it was made
        self.new_session = io.tls  # its TLS session is to be kept once it carried an exchange
        self.source_port = source_port  # in OwnConnections.open while it lives (transparent mode), else 0

    async def next_event(self, *, wait_first: bool = False) -> object:
        events = self.reader.events
        while not events:
            data = await self.io.recv(wait_first=wait_first)
            if not data:
                self.reader.feed_eof()
                if not events:
                    raise UpstreamClosed
                break
            self.bytes_received += len(data)
            self.reader.feed(data)
        return events.popleft()

    def close(self) -> None:
        self.io.close()
        if self.source_port:
            own = self.pool.own
            assert own is not None
            own.open.discard(self.source_port)
            self.source_port = 0


class EndpointPool:
    def __init__(
        self,
        endpoint: Endpoint,
        max_connections: int = MAX_CONNECTIONS,
        max_idle: int = MAX_IDLE,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = trio.current_time,
        service: str = "",
        tls: MeshTLS | None = None,
        own: OwnConnections | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.own = own
        self.service = service  # the identity an mTLS endpoint must prove
        self.tls = tls
        self.clock = clock  # a coarse clock is fine: idle expiry is not precise work
        self.idle: deque[UpstreamConnection] = deque()
        self.active = 0
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.open = 0  # connections that exist or are being made: active, idle, connecting
        # Requests waiting for a connection, oldest first (trio's ParkingLot, with a value):
        # each is woken with, in its list, a released connection, or None for a slot.
        self._waiters: OrderedDict[trio.lowlevel.Task, list[UpstreamConnection | None]] = OrderedDict()
        self.requests = 0
        self.errors = 0
        self.connects = 0
        self.overflows = 0  # requests answered overloaded: no connection came free in time
        self.failing = False  # the last connect failed (logged once until one succeeds)
        self.tls_refused_logged = False  # the peer refused our certificate (logged once until an exchange succeeds)

    def __repr__(self) -> str:
        return f"<EndpointPool {self.endpoint.address} [{self.active} active, {len(self.idle)} idle]>"

    async def acquire(self, connect_timeout: float, *, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange, and whether it was reused from the idle list.
        With every connection busy, waits up to ``connect_timeout`` for one, then raises
        MeshError ``overloaded``."""
        self.requests += 1
        if not fresh:
            now = self.clock()
            epoch = 0 if self.tls is None else self.tls.epoch()
            idle = self.idle
            while idle:
                conn = idle.pop()  # most recently used first: the least likely to be stale
                if now - conn.idle_since < self.idle_timeout and conn.epoch == epoch and _quiet(conn):
                    self.active += 1
                    conn.bytes_received = 0
                    return conn, True
                conn.close()
                self._slot_freed()
        if self.open < self.max_connections:
            self.open += 1
        else:
            released = await self._wait(connect_timeout)
            if released is not None:
                if not fresh and _quiet(released):
                    self.active += 1
                    released.bytes_received = 0
                    return released, True
                released.close()  # its slot is ours: connect in it
        return await self._connect(connect_timeout), False

    async def _wait(self, connect_timeout: float) -> UpstreamConnection | None:
        """Every connection is busy: wait in line for a released connection, or None (a
        slot to connect in), at most ``connect_timeout``."""
        task = trio.lowlevel.current_task()
        waiters = self._waiters

        def abort(_: object) -> trio.lowlevel.Abort:
            del waiters[task]
            return trio.lowlevel.Abort.SUCCEEDED

        handed: list[UpstreamConnection | None] = []
        with trio.move_on_after(connect_timeout):
            waiters[task] = handed
            await trio.lowlevel.wait_task_rescheduled(abort)
            return handed[0]
        self.overflows += 1
        raise MeshError(
            errors.OVERLOADED,
            f"all {self.max_connections} connections to the upstream stayed busy for {connect_timeout:g}s",
        )

    def _hand_over(self, conn: UpstreamConnection | None) -> bool:
        """Give a released connection (or, with None, a freed slot) to the oldest waiting
        request; False when nobody waits."""
        if not self._waiters:
            return False
        task, handed = self._waiters.popitem(last=False)
        handed.append(conn)
        trio.lowlevel.reschedule(task)
        return True

    def _slot_freed(self) -> None:
        if not self._hand_over(None):
            self.open -= 1

    async def _connect(self, connect_timeout: float) -> UpstreamConnection:
        """A new connection in a slot already taken (given back if it fails); with mTLS
        when the endpoint is a sidecar's and the destination's mode is not off (the
        connect timeout covers the handshake too)."""
        endpoint, tls = self.endpoint, self.tls
        context = tls.client_context(self.service) if endpoint.mtls and tls is not None else None
        epoch = 0 if tls is None else tls.epoch()
        own = self.own if context is not None else None
        source_ports: list[int] = []  # ours, while own watches for it coming back (transparent mode)

        def bound(port: int) -> None:
            source_ports.append(port)
            own.open.add(port)  # type: ignore[union-attr]

        phase = "connect"
        try:
            with trio.fail_after(connect_timeout):
                io = await connect(endpoint.host, endpoint.port, bound=None if own is None else bound)
                if context is not None:
                    assert tls is not None
                    phase = "handshake"
                    io = await tls.handshake_client(io, (endpoint.host, endpoint.port), context)
                    self._check_identity(io)
            phase = "done"
        except trio.TooSlowError:
            if phase == "handshake":
                raise self._handshake_failed(f"no TLS handshake within {connect_timeout:g}s") from None
            self._connect_failed(f"timed out after {connect_timeout:g}s")
            raise MeshError(
                errors.CONNECT_FAILED, f"could not connect to the upstream within {connect_timeout:g}s"
            ) from None
        except Closed as exc:  # the handshake failed (meshlet.io.TLSError, or a reset)
            if own is not None and source_ports and source_ports[0] in own.looped:
                own.looped.discard(source_ports[0])
                self._slot_freed()
                raise MeshError(errors.LOOP_DETECTED, LOOP_HINT.format(service=self.service)) from None
            raise self._handshake_failed(str(exc)) from None
        except PeerIdentityError as exc:
            assert tls is not None
            tls.on_failure("client", errors.PEER_IDENTITY_MISMATCH.name)
            self._connect_failed(f"peer identity: {exc}")
            raise MeshError(errors.PEER_IDENTITY_MISMATCH, f"the upstream is not {self.service!r}: {exc}") from None
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            self._connect_failed(why)
            cause = "refused" if exc.errno == errno.ECONNREFUSED else ""
            raise MeshError(errors.CONNECT_FAILED, f"could not connect to the upstream: {why}", cause=cause) from None
        except BaseException:
            self._slot_freed()  # cancelled while connecting
            raise
        finally:
            if own is not None and source_ports and phase != "done":
                own.open.discard(source_ports[0])
        self.failing = False
        self.connects += 1
        self.active += 1
        return UpstreamConnection(io, self, epoch, source_ports[0] if source_ports else 0)

    def _check_identity(self, io: Connection) -> None:
        """The endpoint proved the destination's identity, or PeerIdentityError (and it is closed)."""
        assert isinstance(io, TLSConnection) and self.tls is not None
        check_peer_is(io, self.service, self.tls.trust_domain)

    def tls_refused(self, why: str) -> None:
        """The peer refused the handshake after ours completed: a handshake failure too."""
        assert self.tls is not None
        self.tls.on_failure("client", errors.TLS_HANDSHAKE_FAILED.name)
        if not self.tls_refused_logged:
            self.tls_refused_logged = True
            log.warning("TLS to %s refused by the peer: %s (logged again after a success)", self.endpoint.address, why)
        raise MeshError(errors.TLS_HANDSHAKE_FAILED, f"the upstream refused the TLS handshake: {why}")

    def _handshake_failed(self, why: str) -> MeshError:
        assert self.tls is not None
        self.tls.on_failure("client", errors.TLS_HANDSHAKE_FAILED.name)
        self._connect_failed(f"TLS handshake: {why}")
        return MeshError(errors.TLS_HANDSHAKE_FAILED, f"TLS handshake with the upstream failed: {why}")

    def _connect_failed(self, why: str) -> None:
        """Count it; log the address once per failing streak. The caller's answer names
        no address: an inbound sidecar's app address is nobody else's business."""
        self._slot_freed()
        self.errors += 1
        if not self.failing:
            self.failing = True
            log.warning(
                "connect to %s failed: %s (logged again after a connection succeeds)", self.endpoint.address, why
            )

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.active -= 1
        if reusable:
            if conn.new_session:  # once per TLS connection: its tickets came with the first response
                conn.new_session = False
                self.tls_refused_logged = False
                assert self.tls is not None and isinstance(conn.io, TLSConnection)
                self.tls.keep_session((self.endpoint.host, self.endpoint.port), conn.io)
            conn.reader.events.clear()
            conn.released_at = monotonic()
            if self._waiters:
                self._hand_over(conn)
                return
            if len(self.idle) < self.max_idle:
                conn.idle_since = self.clock()
                self.idle.append(conn)
                return
        conn.close()
        self._slot_freed()

    def expire_idle(self, now: float) -> int:
        """Close idle connections past their idle timeout; returns how many."""
        expired = 0
        while self.idle and now - self.idle[0].idle_since >= self.idle_timeout:
            self.idle.popleft().close()
            self._slot_freed()
            expired += 1
        return expired

    def close_all(self) -> None:
        while self.idle:
            self.idle.pop().close()
            self._slot_freed()


# One poll set for the check below: registering a descriptor in it costs no syscall.
_IDLE_CHECK = select.poll()


def _quiet(conn: UpstreamConnection) -> bool:
    """Nothing arrived on an idle connection since its last response: one ``poll`` with no
    wait (cheaper than a peek, which raises when there is nothing). Readable means bytes, a
    response to no request of ours, or the peer's close (or reset); either way the connection
    is done. Over TLS, bytes OpenSSL holds decrypted count too (a TLS 1.3 ticket or key
    update arriving while idle also makes it readable: then a good connection is given up,
    never a bad one kept).

    A connection released less than ``RECHECK_AFTER`` ago skips the poll: under load that
    is every reuse, and the syscall was a sixth of the request's. What it could miss is a
    peer that closes a kept-alive connection within milliseconds of answering without
    saying ``Connection: close``; such a close races the reuse with or without the poll,
    and the request is sent again on a fresh connection when it is idempotent."""
    io = conn.io
    if io.tls and io.pending():
        return False
    if monotonic() - conn.released_at < RECHECK_AFTER:
        return True
    fd = io.sock.fileno()
    check = _IDLE_CHECK
    check.register(fd, select.POLLIN)
    ready = check.poll(0)
    check.unregister(fd)
    return not ready


class UpstreamPools:
    """Every endpoint's pool, keyed by address (a pool outlives config snapshots)."""

    def __init__(
        self,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = trio.current_time,
        *,
        max_connections: int = MAX_CONNECTIONS,
        tls: MeshTLS | None = None,
        own: OwnConnections | None = None,
    ) -> None:
        self.tls = tls  # mTLS to endpoints that are sidecars (Endpoint.mtls)
        self.own = own  # transparent mode: our connections' source ports
        self.pools: dict[tuple[str, int], EndpointPool] = {}
        self.clock = clock
        # endpoint address → service name, for labels
        self.services: dict[tuple[str, int], str] = {}
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections  # per endpoint (and as many HTTP/2 ones)
        # HTTP/2 pools (net/h2_upstream.py), made on first use; their connections' reader and
        # writer tasks run in ``nursery``, which the sidecar gives (sidecar/app.py).
        self.h2_pools: dict[tuple[str, int], H2EndpointPool] = {}
        self.nursery: trio.Nursery | None = None

    def get(self, endpoint: Endpoint, service: str) -> EndpointPool:
        key = (endpoint.host, endpoint.port)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = EndpointPool(
                endpoint,
                self.max_connections,
                idle_timeout=self.idle_timeout,
                clock=self.clock,
                service=service,
                tls=self.tls,
                own=self.own,
            )
            self.services[key] = service
        elif pool.endpoint.mtls is not endpoint.mtls:
            pool.endpoint = endpoint  # now registered by a sidecar (or no longer): dialled accordingly
        return pool

    def stats(self) -> Iterator[tuple[str, str, str, int]]:
        for key, pool in self.pools.items():
            service = self.services.get(key, "")
            address = pool.endpoint.address
            yield service, address, "active", pool.active
            yield service, address, "idle", len(pool.idle)
        for key, h2_pool in self.h2_pools.items():
            service = self.services.get(key, "")
            for state, count in h2_pool.stats():
                yield service, h2_pool.endpoint.address, state, count

    def h2_stream_stats(self) -> Iterator[tuple[str, str, int]]:
        """(destination, endpoint, streams open) per HTTP/2 pool."""
        for key, pool in self.h2_pools.items():
            yield self.services.get(key, ""), pool.endpoint.address, sum(len(c.streams) for c in pool.conns)

    def h2_close_stats(self) -> Iterator[tuple[str, str, str, int]]:
        """(destination, endpoint, reason, HTTP/2 connections ended for it)."""
        for key, pool in self.h2_pools.items():
            for reason, count in pool.closes.items():
                yield self.services.get(key, ""), pool.endpoint.address, reason, count

    def h2_reset_stats(self) -> Iterator[tuple[str, str, str, int]]:
        """(destination, endpoint, error code, RST_STREAMs received with it)."""
        for key, pool in self.h2_pools.items():
            for code, count in pool.resets.items():
                yield self.services.get(key, ""), pool.endpoint.address, code, count

    def overflow_stats(self) -> Iterator[tuple[str, str, int]]:
        for key, pool in self.pools.items():
            yield self.services.get(key, ""), pool.endpoint.address, pool.overflows
        for key, h2_pool in self.h2_pools.items():
            yield self.services.get(key, ""), h2_pool.endpoint.address, h2_pool.overflows

    async def serve_expiry(self, interval: float = 5.0) -> None:
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for pool in self.pools.values():
                pool.expire_idle(now)
            for h2_pool in self.h2_pools.values():
                h2_pool.expire_idle(now)


class _Exchange:
    """One request on one upstream connection, and the response body as the downstream
    loop pulls it. Watched by :class:`Deadlines` until it ends: past its deadline,
    ``expire`` closes the upstream connection, and the task waiting on it turns that
    into a 504 (or cuts a response already under way)."""

    __slots__ = (
        "conn",
        "head",
        "body_started",
        "request_sent",
        "client_error",
        "deadline",
        "timed_out",
        "client_slow",
        "complete",
        "abandoned",
        "waiting",
        "sent",
        "sent_bytes",
        "resend",
        "__weakref__",
    )

    def __init__(self, conn: UpstreamConnection, deadline: float, sent: list[bytes] | None = None) -> None:
        self.conn = conn
        self.head: ResponseHead | None = None
        self.body_started = False
        self.request_sent = False
        self.client_error: BaseException | None = None
        self.deadline = deadline
        self.timed_out = False
        self.client_slow = False  # timed out while the body pump waited for the client
        self.complete = False  # the response body was read to its end
        self.abandoned = False
        # While the body's pump (Forwarder._pump) waits for the client's body: its scope.
        self.waiting: trio.CancelScope | None = None
        # On a reused connection: the body pieces sent, while they fit RESEND_LIMIT (None:
        # not kept, so a reset after the body started is final).
        self.sent = sent
        self.sent_bytes = 0
        self.resend: list[bytes] | tuple[()] = ()  # what a stale try sent: to send first

    def abandon(self) -> None:
        """Given up on a stale connection: its pump stops now (it may be waiting for the
        client's body), so that the next attempt's pump, after sending what this one
        sent (``sent``), reads the rest of the body."""
        self.abandoned = True
        if self.waiting is not None:
            self.waiting.cancel()

    def expire(self) -> None:
        self.timed_out = True
        self.client_slow = self.waiting is not None and not self.abandoned
        self.conn.close()

    def read_nowait(self) -> BodyPiece:
        events = self.conn.reader.events
        if not events:
            return WOULD_BLOCK
        return self._piece(events.popleft())

    async def read(self) -> bytes | None:
        conn = self.conn
        if conn.reader.events:
            event = conn.reader.events.popleft()
        else:
            try:
                event = await conn.next_event()
            except (UpstreamClosed, *_NETWORK_ERRORS) as exc:
                if self.timed_out:
                    raise UpstreamBodyError("request timeout while reading the response body") from exc
                raise UpstreamBodyError("upstream reset mid-body") from exc
        return self._piece(event)

    def _piece(self, event: object) -> bytes | None:
        if type(event) is Data:
            return event.data
        if type(event) is EndOfMessage:
            self.complete = True
            return None
        raise UpstreamBodyError(f"malformed response body: {event}")


class UpstreamBodyError(Exception):
    """The response body could not be read whole: the downstream must be cut."""


class _Tunnel:
    __slots__ = ("conn", "first_bytes")

    def __init__(self, conn: UpstreamConnection, first_bytes: bytes) -> None:
        self.conn = conn
        self.first_bytes = first_bytes

    async def send_all(self, data: bytes) -> None:
        await self.conn.io.send_all(data)

    async def receive_some(self) -> bytes:
        return await self.conn.io.recv()

    def close(self) -> None:
        self.conn.pool.release(self.conn, False)


class Forwarder:
    """The terminal handler: sends ``request`` to ``request.endpoint`` and returns the
    response with its body still streaming from the upstream connection."""

    def __init__(self, pools: UpstreamPools, deadlines: Deadlines, *, allow_upgrades: bool = True) -> None:
        self.pools = pools
        self.deadlines = deadlines
        self.allow_upgrades = allow_upgrades
        self.h2: H2Forwarder | None = None  # made for the first request that goes in HTTP/2

    def _h2_forwarder(self) -> H2Forwarder:
        if self.h2 is None:
            from .h2_upstream import H2Forwarder

            self.h2 = H2Forwarder(self.pools, self.deadlines)
        return self.h2

    def _head_bytes(self, request: Request, upgrade: bytes | None) -> bytes:
        head = request.head
        headers = forward_request_headers(head.headers, request.peer_ip, connection=head.connection)
        authority = request.authority
        if authority is None:  # HTTP/1.0 without Host: we speak HTTP/1.1, which needs one
            authority = request.service.encode() or request.endpoint.address.encode()  # type: ignore[union-attr]
        if authority != head.host:
            headers = [(n, v) for n, v in headers if n.lower() != b"host"]
            headers.insert(0, (b"host", authority))
        if head.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        elif head.content_length is not None:
            headers.append((b"content-length", b"%d" % head.content_length))
        if upgrade is not None:
            headers.append((b"connection", b"upgrade"))
            headers.append((b"upgrade", upgrade))
        return serialize_request_head(head.method, request.target, headers)

    async def __call__(self, request: Request) -> Response:
        endpoint = request.endpoint
        assert endpoint is not None, "the balancer layer sets the endpoint"
        version = request.head.http_version
        if (version == "2" or endpoint.protocol in HTTP2_PROTOCOLS) and upstream_version(
            version, endpoint.protocol, endpoint.mtls
        ) == "2":
            return await self._h2_forwarder()(request)
        pool = self.pools.get(endpoint, request.service)
        upgrade = request.head.upgrade
        if upgrade is not None and (not self.allow_upgrades or upgrade.lower().startswith(b"h2c")):
            upgrade = None  # h2c upgrades would smuggle HTTP/2 past us: never forwarded
        if request.target[:1] != b"/" and request.target != b"*":
            request.target = _origin_form(request)
        head_bytes = self._head_bytes(request, upgrade)
        deadline = self.deadlines.now + request.timeout
        deadlines = self.deadlines
        resend: list[bytes] | tuple[()] = ()
        # A reused connection closed without a byte of answer was most likely closed while
        # idle, but the app may also have read the request and died: only a request that
        # may be applied twice is sent again (RFC 9112 §9.3.1; Go's transport does the
        # same). Others get 502 upstream-reset, which the retry policy may retry.
        replayable = request.head.method in IDEMPOTENT
        for attempt in (0, 1):
            conn, reused = await pool.acquire(request.connect_timeout, fresh=upgrade is not None)
            exchange = _Exchange(conn, deadline, [] if reused and request.body is not None else None)
            exchange.resend = resend
            deadlines.watch(exchange)
            try:
                response = await self._exchange(request, exchange, head_bytes)
            except _Stale:
                deadlines.forget(exchange)
                exchange.abandon()  # before the fresh try starts its own pump on the same body
                pool.release(conn, False)
                if reused and attempt == 0 and replayable:
                    resend = exchange.sent if exchange.sent is not None else resend  # a late piece may join it
                    continue  # the peer closed an idle connection: one fresh try
                pool.errors += 1
                raise MeshError(errors.UPSTREAM_RESET, "the upstream closed the connection") from None
            except BaseException:
                deadlines.forget(exchange)
                pool.errors += 1
                pool.release(conn, False)
                raise
            if response.upgrade is not None:
                deadlines.forget(exchange)  # a tunnel lives as long as its two ends do
            return response
        raise AssertionError("unreachable")

    async def _exchange(self, request: Request, exchange: _Exchange, head_bytes: bytes) -> Response:
        conn = exchange.conn
        conn.reader.expect(request.head.method)
        body = request.body
        try:
            await conn.io.send_all(head_bytes)
            if body is None:
                exchange.request_sent = True
            else:
                assert request.nursery is not None, "the downstream loop opens a nursery for bodies"
                request.nursery.start_soon(self._pump, request, exchange)
            event = await conn.next_event(wait_first=True)
            if type(event) is not ResponseHead:
                if isinstance(event, ProtocolError):
                    raise MeshError(errors.UPSTREAM_PROTOCOL_ERROR, f"malformed response: {event}")
                raise MeshError(errors.UPSTREAM_PROTOCOL_ERROR, "response without a head")  # pragma: no cover
        except (UpstreamClosed, *_NETWORK_ERRORS) as exc:
            if exchange.timed_out:
                if exchange.client_slow:
                    raise MeshError(
                        errors.REQUEST_TIMEOUT, f"the request body did not arrive within {request.timeout:g}s"
                    ) from None
                raise MeshError(errors.TIMEOUT, f"no response from the upstream within {request.timeout:g}s") from None
            if exchange.client_error is not None:
                raise MeshError(errors.BAD_REQUEST, str(exchange.client_error)) from None
            if isinstance(exc, TLSError) and conn.new_session and conn.bytes_received == 0:
                # TLS 1.3: the server judges our certificate after our side of the handshake
                # is done; its refusal (an alert) arrives in place of the first response.
                conn.pool.tls_refused(str(exc))
            if conn.bytes_received == 0 and (not exchange.body_started or exchange.sent is not None):
                raise _Stale from exc
            raise MeshError(errors.UPSTREAM_RESET, "the upstream reset the connection before the response") from None
        exchange.head = event
        if request.deadline > exchange.deadline:
            exchange.deadline = request.deadline  # a per-try timeout ends at the head; the body has the rest
        return self._response(request, exchange, event)

    def _response(self, request: Request, exchange: _Exchange, head: ResponseHead) -> Response:
        conn = exchange.conn
        if head.status == 101:
            response = Response(101, head.reason, forward_response_headers(head.headers, head.connection))
            rest = conn.reader.take_upgrade_rest()
            response.headers += [(b"connection", b"upgrade"), (b"upgrade", request.head.upgrade or b"")]
            response.upgrade = _Tunnel(conn, rest)
            response.keep_alive = False
            return response
        response = Response(head.status, head.reason, forward_response_headers(head.headers, head.connection))
        if head.status >= 400:
            # An error made by the next sidecar keeps its reason in this hop's metrics.
            for name, value in head.headers:
                if name.lower() == ERROR_HEADER:
                    response.mesh_error = value.decode("ascii", "replace")
        if head.no_body:
            response.framing = "none"
            if head.content_length is not None and head.status != 204:
                response.headers.append((b"content-length", b"%d" % head.content_length))
        elif head.content_length is not None:
            response.framing = "length"
            response.content_length = head.content_length
        else:
            response.framing = "chunked"
        body = exchange
        if head.no_body:
            # llhttp ends a bodiless message together with its head: take the end now.
            events = conn.reader.events
            if events and type(events[0]) is EndOfMessage:
                events.popleft()
                body.complete = True
        else:
            response.body = body
        pool = conn.pool

        deadlines = self.deadlines

        def finish(complete: bool) -> None:
            deadlines.forget(exchange)
            reusable = (
                complete
                and body.complete
                and head.keep_alive
                and exchange.request_sent
                and not conn.reader.dirty
                and not conn.reader.failed
                and not conn.reader.events
            )
            if not complete:
                pool.errors += 1
            pool.release(conn, reusable)

        response.on_finish = finish
        return response

    async def _pump(self, request: Request, exchange: _Exchange) -> None:
        """Streams the request body upstream, concurrently with the response; until the
        exchange is abandoned (a stale connection: the body goes to a fresh one instead)."""
        if exchange.abandoned:
            return  # abandoned before it ran: not a byte of the body taken
        body = request.body
        assert body is not None
        chunked = request.head.chunked
        send_all = exchange.conn.io.send_all
        try:
            if exchange.resend:
                exchange.body_started = True
                for taken in exchange.resend:  # what a stale connection took, first
                    await send_all(chunk(taken) if chunked else taken)
            while True:
                try:
                    piece = body.read_nowait()
                    if piece is WOULD_BLOCK:
                        piece = await wait_for_piece(body, exchange)
                        if piece is WOULD_BLOCK:
                            return  # the try was given up
                except Exception as exc:  # the client sent a bad body or went away
                    exchange.client_error = exc
                    exchange.conn.close()
                    return
                if piece is None:
                    break
                exchange.body_started = True
                keep_for_resend(exchange, piece)
                await send_all(chunk(piece) if chunked else piece)
            if chunked:
                await send_all(CHUNKED_END)
            exchange.request_sent = True
        except _NETWORK_ERRORS:
            return  # the upstream stopped reading; the response side sees it too


class BodyPump(Protocol):
    """What an exchange keeps for its request body's pump (HTTP/1.1 and HTTP/2 alike)."""

    abandoned: bool  # the try was given up: its pump stops
    waiting: trio.CancelScope | None  # the pump's wait for the client's body, which abandoning cancels
    sent: list[bytes] | None  # the pieces sent, while they fit RESEND_LIMIT (None: past it, or not kept)
    sent_bytes: int


async def wait_for_piece(body: BodySource, exchange: BodyPump) -> BodyPiece:
    """The client's next body piece, waited for in the scope that abandoning the try cancels:
    WOULD_BLOCK when the try was given up (a piece read just then is kept in ``sent``, for the
    next try to send). Only a wait runs in a scope (each one entered costs): a body already
    buffered goes without one."""
    with trio.CancelScope() as exchange.waiting:
        piece: BodyPiece = await body.read()
    exchange.waiting = None
    # Only abandoning cancels the wait, so piece is still WOULD_BLOCK only then.
    if exchange.abandoned or piece is WOULD_BLOCK:
        if isinstance(piece, bytes) and exchange.sent is not None:
            exchange.sent.append(piece)  # read as the try was given up: the next sends it
        return WOULD_BLOCK
    return piece


def keep_for_resend(exchange: BodyPump, piece: bytes) -> None:
    """Keep a piece about to be sent, while the pieces fit RESEND_LIMIT: a try that must be
    made again (a stale connection, an unprocessed stream) sends them first."""
    sent = exchange.sent
    if sent is not None:
        exchange.sent_bytes += len(piece)
        if exchange.sent_bytes <= RESEND_LIMIT:
            sent.append(piece)
        else:
            exchange.sent = None  # too much to send again


def _origin_form(request: Request) -> bytes:
    """The origin-form target of an absolute-form one that did not come through routing
    (the inbound listener, an ``--upstream`` port, transparent mode). Its authority must
    be the Host the client sent (HAProxy's rule): the app must never see a target and a
    Host that disagree, nor be reached through a name it would not answer to."""
    target = request.target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise MeshError(errors.BAD_REQUEST, "the request target is neither a path nor an http:// URL")
    cut = len(rest)
    for end in (b"/", b"?"):
        found = rest.find(end)
        if found != -1 and found < cut:
            cut = found
    authority, path = rest[:cut], rest[cut:]
    host = request.head.host
    if not authority or host is None or authority.lower() != host.strip().lower():
        raise MeshError(errors.BAD_REQUEST, "the absolute-form target and the Host header name different hosts")
    return path if path.startswith(b"/") else b"/" + path


class _Stale(Exception):
    """A reused connection was closed by the peer before it answered."""
