"""Transparent mode, the socket part: where a redirected connection was going, and plain
TCP passthrough for addresses no service has (MeshConfig ``outbound_traffic_policy:
ALLOW_ANY``, Istio's PassthroughCluster). The rules are sidecar/core/interception.py's.
"""

from __future__ import annotations

import errno
import socket

import trio

from meshlet.io import Closed, Connection, connect

from ..core.interception import SO_ORIGINAL_DST, parse_original_dst

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
