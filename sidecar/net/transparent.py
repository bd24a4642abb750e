"""Transparent mode, the socket part: where a redirected connection was going, the
outbound listener's handling of it, and plain TCP passthrough for addresses no service has
(MeshConfig ``outbound_traffic_policy: ALLOW_ANY``, Istio's PassthroughCluster). The rules
are sidecar/core/interception.py's.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from meshlet.io import Closed, Connection, connect

from ..core.interception import (
    ALLOW_ANY,
    LOOP,
    REFUSALS,
    SO_ORIGINAL_DST,
    TO_SERVICE,
    AddressMap,
    parse_original_dst,
    unregistered,
)
from ..layers.base import Handler, Request, Response
from .downstream import Timeouts, serve_connection
from .upstream import OwnConnections

if TYPE_CHECKING:
    from .tcp_proxy import TcpProxy

log = logging.getLogger("meshlet.sidecar")

PASSTHROUGH_CONNECT_TIMEOUT = 10.0  # seconds: what the app would have waited for a SYN answer, roughly


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the app was connecting to before a REDIRECT rule sent it here; None when the
    connection came here on purpose (or the kernel keeps no NAT state for it)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        ip, port = parse_original_dst(raw)
        local = sock.getsockname()
    except (OSError, ValueError):
        return None  # ENOENT: not NATed (conntrack never saw it redirected)
    if (ip, port) == (local[0], local[1]):
        return None
    return ip, port


LOGGED_ADDRESSES = 1000  # refused addresses remembered so that each is logged once; past this, all forgotten


class Interceptor:
    """The outbound listener's connection handler in transparent mode: each connection is
    routed by where the app was connecting to; one made to the listener on purpose is served
    as usual. The outbound stack, the address map and the policy come from the current
    snapshot (:meth:`use`); the decisions are sidecar/core/interception.py's."""

    def __init__(
        self,
        handler: Handler,
        timeouts: Timeouts,
        on_intercepted: Callable[[str, str], None],
        own: OwnConnections | None = None,
    ) -> None:
        self.handler = handler  # the outbound stack
        self.own = own  # the source ports of the pool's mTLS connections
        self.timeouts = timeouts
        self.on_intercepted = on_intercepted  # (outcome, service or "") → counted
        self.addresses = AddressMap()
        self.policy = ALLOW_ANY  # MeshConfig outbound_traffic_policy
        self.passthrough = Passthrough()
        self.opaque: TcpProxy | None = None  # connections to a tcp service are spliced by it
        self._logged: set[tuple[str, int]] = set()

    def use(self, handler: Handler, addresses: AddressMap, policy: str) -> None:
        """A new snapshot's outbound stack, address map and policy: the next connection
        (and the next request on an open one) goes by them."""
        self.handler = handler
        self.addresses = addresses
        self.policy = policy

    async def __call__(self, io: Connection) -> None:
        original = original_destination(io.sock)
        if original is None:
            await serve_connection(io, self._outbound, self.timeouts)
            return
        ip, port = original
        service = self.addresses.service(ip, port)
        if service is not None:
            own = self.own
            if own is not None and own.open and io.sock.getpeername()[1] in own.open:
                # Our own mTLS connection came back (TLS has no Via to show it): the pool
                # that made it answers loop-detected.
                own.looped.add(io.sock.getpeername()[1])
                self.on_intercepted(LOOP, service)
                self._log_once(ip, port, "came back from this sidecar: a loop (see --proxy-uid)")
                io.reset()
                return
            self.on_intercepted(TO_SERVICE, service)
            if self.opaque is not None and self.opaque.is_tcp(service):
                try:
                    await self.opaque.outbound(io, service)
                finally:
                    io.close()
                return

            async def to_service(request: Request) -> Response:
                request.service = service  # the router takes it instead of the Host header
                return await self.handler(request)

            await serve_connection(io, to_service, self.timeouts)
            return
        try:
            outcome = unregistered(self.passthrough.is_own(io.sock.getpeername()[1]), self.policy)
            self.on_intercepted(outcome, "")
            if outcome in REFUSALS:
                self._log_once(ip, port, REFUSALS[outcome])
                io.reset()
                return
            await self.passthrough.relay(io, ip, port)
        except (OSError, trio.TooSlowError):
            io.reset()  # as the app would have seen it: the destination did not answer
        finally:
            io.close()

    async def _outbound(self, request: Request) -> Response:
        return await self.handler(request)

    def _log_once(self, ip: str, port: int, what: str) -> None:
        """One line per address, not per connection (a bounded set)."""
        if (ip, port) in self._logged:
            return
        if len(self._logged) >= LOGGED_ADDRESSES:
            self._logged.clear()
        self._logged.add((ip, port))
        log.warning("outbound connection to %s:%d %s", ip, port, what)


class Passthrough:
    """Copies bytes between a redirected app connection and where it was going.

    The connections this sidecar opens for passthrough are remembered by their source
    port (bound before connecting, so no other socket here can hold it). One that comes
    back to the outbound listener (the iptables rules do not exempt the sidecar's own
    traffic) is then recognised as a loop instead of being passed on again, for ever."""

    def __init__(self) -> None:
        self.sources: set[int] = set()  # source ports of the connections open now

    def is_own(self, peer_port: int) -> bool:
        return peer_port in self.sources

    async def relay(self, downstream: Connection, host: str, port: int) -> None:
        """Until either side is done; half-closes are passed on (one side may finish
        sending and still read the answer). OSError when ``host:port`` cannot be reached."""
        ports: list[int] = []

        def bound(source_port: int) -> None:
            ports.append(source_port)
            self.sources.add(source_port)

        try:
            with trio.fail_after(PASSTHROUGH_CONNECT_TIMEOUT):
                upstream = await connect(host, port, bound=bound)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_copy, downstream, upstream)
                    nursery.start_soon(_copy, upstream, downstream)
            finally:
                upstream.close()
        finally:
            self.sources.difference_update(ports)


async def _copy(source: Connection, sink: Connection) -> None:
    try:
        while data := await source.recv():
            await sink.send_all(data)
    except Closed:
        # One side reset: the other must not wait for bytes that will never come.
        source.reset()
        sink.reset()
        return
    try:
        sink.sock.shutdown(socket.SHUT_WR)  # the peer sees our end of stream, and may still answer
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EBADF):
            raise
