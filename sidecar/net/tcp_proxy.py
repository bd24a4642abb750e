"""Opaque TCP through the mesh: connections to a ``tcp`` service, spliced, never parsed.

Outbound (an ``--upstream NAME=ADDR`` listener whose service is ``tcp`` in the current
snapshot, or a redirected connection to one in transparent mode): pick an endpoint with the
destination's balancer, skipping those the outlier detector ejected; connect within the
connect timeout, with mTLS to a sidecar (the same client context and identity check as the
HTTP pool); on a connect failure try the next endpoint (sidecar/core/tcp.py bounds how
many). The circuit breaker admits each try and counts its failure; an open breaker closes
the app's connection at once.

Inbound (a sidecar whose app is ``tcp``): after the mTLS handshake (or a plaintext
connection, where the mode allows it; sidecar/net/inbound.py), the caller is checked
against the service's AccessPolicy (a connection is allowed only by a rule that names no
path or method), then spliced to the app.

The splice copies one read (``meshlet.io.RECEIVE_SIZE``) at a time each way: a slow reader
slows its writer, nothing else is buffered. An end of file is passed on as a half-close
(over TLS: close_notify, and reading goes on); a reset of either side resets the other. A
pair quiet both ways for the idle timeout is reset (watched by ``Deadlines``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping

import trio

from meshlet.access import AccessTable
from meshlet.io import Closed, Connection, Deadlines, connect

from ..core import errors
from ..core.attempts import pick
from ..core.destination import Destinations
from ..core.services import DEFAULT_CONNECT_TIMEOUT, Endpoint, ServiceConfig
from ..core.tcp import (
    CIRCUIT_OPEN,
    CONNECT_FAILED,
    DENIED,
    DOWN,
    IDLE,
    IDLE_TIMEOUT,
    NO_ENDPOINTS,
    RESET,
    UP,
    ByteKey,
    Splice,
    TcpStats,
    connect_attempts,
)
from .inbound import _Bursts
from .tls import MeshTLS, PeerIdentityError, check_peer_is

log = logging.getLogger("meshlet.tcp")


_Finish = Callable[[], None]


_WHY = {
    CIRCUIT_OPEN: "its circuit breaker is open (connect failures)",
    CONNECT_FAILED: "no endpoint could be connected to",
    NO_ENDPOINTS: "it has no endpoints (or is not known here)",
}


class _ConnectFailed(Exception):
    """One endpoint could not be reached (why, in words)."""


class _Pair:
    """A spliced pair, watched by ``Deadlines``: quiet both ways past its deadline, reset."""

    __slots__ = ("client", "server", "splice", "deadline")

    def __init__(self, client: Connection, server: Connection, deadline: float) -> None:
        self.client = client
        self.server = server
        self.splice = Splice()
        self.deadline = deadline

    def expire(self) -> None:
        self.splice.broken(IDLE)
        self.reset()

    def reset(self) -> None:
        self.client.reset()
        self.server.reset()


class TcpProxy:
    """Splices the ``tcp`` services' connections. ``use`` installs each snapshot's services
    and this sidecar's AccessPolicy; the destinations (breakers, outlier detectors,
    balancers) are the HTTP path's, shared."""

    def __init__(
        self,
        service: str,
        destinations: Destinations,
        deadlines: Deadlines,
        stats: TcpStats,
        tls: MeshTLS | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.service = service  # this sidecar's: the source outbound, the destination inbound
        self.destinations = destinations
        self.deadlines = deadlines
        self.stats = stats
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.services: Mapping[str, ServiceConfig] = {}
        self.access: AccessTable | None = None
        self._failures = _Bursts()  # connect failures and refusals, logged once per burst

    def use(self, services: Mapping[str, ServiceConfig], access: AccessTable | None) -> None:
        self.services = services
        self.access = access

    def is_tcp(self, service: str) -> bool:
        config = self.services.get(service)
        return config is not None and config.protocol == "tcp"

    # outbound ---------------------------------------------------------------------------
    async def outbound(self, client: Connection, service: str) -> None:
        """The app's connection to ``service``, spliced to one of its endpoints (closed by the caller)."""
        stats = self.stats
        destination = stats.name(service)
        server, outcome, finish = await self._connect_service(service)
        if server is None:
            stats.refused("outbound", self.service, destination, outcome)
            self._log(service, "TCP connection to %s refused: %s", service, _WHY[outcome])
            client.reset()  # the app learns at once, as from a refused connect
            return
        try:
            await self._splice("outbound", self.service, destination, client, server)
        finally:
            finish()

    async def _connect_service(self, service: str) -> tuple[Connection | None, str, _Finish]:
        """A connection to an endpoint of ``service``, or None and why (an outcome); and
        what to call when the connection ends (the balancer counts it open until then)."""
        config = self.services.get(service)
        if config is None or not config.endpoints:
            return None, NO_ENDPOINTS, _nothing
        clock = self.deadlines.clock
        destination = self.destinations.get(service, None, clock())
        settings = destination.settings
        timeout = settings.connect_timeout if settings.connect_timeout is not None else config.connect_timeout
        balancer, breaker, outlier = destination.balancer(), destination.breaker, destination.outlier
        tried: list[Endpoint] = []
        for attempt in range(connect_attempts(len(destination.endpoints))):
            now = clock()
            permit = breaker.admit(now)
            if permit is None:
                return None, CIRCUIT_OPEN if attempt == 0 else CONNECT_FAILED, _nothing
            endpoint = pick(destination, balancer, tried, now)
            if endpoint is None:
                breaker.release(permit)
                return None, NO_ENDPOINTS, _nothing
            tried.append(endpoint)
            balancer.started(endpoint)
            outlier.started(endpoint, now)
            began = trio.current_time()
            try:
                server = await self._dial(endpoint, service, timeout)
            except _ConnectFailed as exc:
                elapsed = trio.current_time() - began
                now = clock()
                balancer.finished(endpoint, elapsed, now, True)
                outlier.record(endpoint, now, True)
                breaker.record(now, permit, True, elapsed)
                self._log(
                    f"{service} {endpoint.address}", "connect to %s (%s) failed: %s", endpoint.address, service, exc
                )
                continue
            except BaseException:  # cancelled: no outcome to record
                balancer.finished(endpoint, trio.current_time() - began, clock(), False)
                outlier.release(endpoint)
                breaker.release(permit)
                raise
            elapsed = trio.current_time() - began
            now = clock()
            outlier.record(endpoint, now, False)
            breaker.record(now, permit, False, elapsed)

            def finish(endpoint: Endpoint = endpoint, elapsed: float = elapsed) -> None:
                balancer.finished(endpoint, elapsed, clock(), False)  # open until now: least-request counts it

            return server, "", finish
        return None, CONNECT_FAILED, _nothing

    async def _dial(self, endpoint: Endpoint, service: str, connect_timeout: float) -> Connection:
        """A connection to ``endpoint`` (with mTLS when it is a sidecar's and the mode is not
        off; the identity it proves must be ``service``), within ``connect_timeout``."""
        tls = self.tls
        context = tls.client_context(service) if endpoint.mtls and tls is not None else None
        try:
            with trio.fail_after(connect_timeout):
                io = await connect(endpoint.host, endpoint.port)
                if context is None:
                    return io
                assert tls is not None
                conn = await tls.handshake_client(io, (endpoint.host, endpoint.port), context)
            try:
                check_peer_is(conn, service, tls.trust_domain)
            except PeerIdentityError as exc:
                tls.on_failure("client", errors.PEER_IDENTITY_MISMATCH.name)
                raise _ConnectFailed(f"the peer is not {service!r}: {exc}") from None
            return conn
        except trio.TooSlowError:
            raise _ConnectFailed(f"timed out after {connect_timeout:g}s") from None
        except Closed as exc:  # the TLS handshake failed
            if tls is not None:
                tls.on_failure("client", errors.TLS_HANDSHAKE_FAILED.name)
            raise _ConnectFailed(f"TLS handshake: {exc}") from None
        except OSError as exc:
            raise _ConnectFailed("refused" if exc.errno == errno.ECONNREFUSED else exc.strerror or str(exc)) from None

    # inbound ----------------------------------------------------------------------------
    async def inbound(self, client: Connection, caller: str, app: Endpoint) -> None:
        """A caller's connection (``caller``: its proved identity), spliced to the local app."""
        stats = self.stats
        source = stats.name(caller)
        if self.access is not None:
            verdict = self.access.check_connection(caller)
            if not verdict.allowed:
                stats.refused("inbound", source, self.service, DENIED)
                self._log(
                    caller,
                    "TCP connection from %s (%s) refused: AccessPolicy %r does not let it call %s (%s)",
                    caller,
                    client.peer,
                    self.access.name,
                    self.service,
                    verdict.rule,
                )
                client.reset()
                return
        try:
            with trio.fail_after(DEFAULT_CONNECT_TIMEOUT):
                server = await connect(app.host, app.port)
        except (OSError, trio.TooSlowError) as exc:
            stats.refused("inbound", source, self.service, CONNECT_FAILED)
            self._log("app", "connect to the app at %s failed: %s", app.address, getattr(exc, "strerror", "") or exc)
            client.reset()
            return
        await self._splice("inbound", source, self.service, client, server)

    # the splice -------------------------------------------------------------------------
    async def _splice(
        self, direction: str, source: str, destination: str, client: Connection, server: Connection
    ) -> None:
        stats, deadlines = self.stats, self.deadlines
        received, sent = stats.byte_keys(direction, source, destination)
        pair = _Pair(client, server, deadlines.now + self.idle_timeout)
        stats.opened(direction)
        started = trio.current_time()
        deadlines.watch(pair)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, pair, client, server, UP, received)
                nursery.start_soon(self._pump, pair, server, client, DOWN, sent)
        except BaseException:
            pair.splice.broken(RESET)  # cancelled (the sidecar stops): both sides are cut
            pair.reset()
            raise
        finally:
            deadlines.forget(pair)
            server.close()
            stats.closed(direction, source, destination, pair.splice.outcome, trio.current_time() - started)

    async def _pump(self, pair: _Pair, source: Connection, sink: Connection, way: int, key: ByteKey) -> None:
        """One way, one read at a time, until its end of file (passed on) or a reset (both reset)."""
        counts, deadlines, idle = self.stats.bytes, self.deadlines, self.idle_timeout
        try:
            while data := await source.recv():
                pair.deadline = deadlines.now + idle
                await sink.send_all(data)
                counts[key] += len(data)
            await sink.shutdown_write()
            pair.splice.end_of_file(way)
        except Closed:
            pair.splice.broken(RESET)
            pair.reset()

    def _log(self, key: str, message: str, *args: object) -> None:
        since = self._failures.due(key, trio.current_time())
        if since is not None:
            log.warning(message + (f" ({since} more since the last report)" if since else ""), *args)


def _nothing() -> None:
    pass
