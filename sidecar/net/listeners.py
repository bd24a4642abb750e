"""The sidecar's listeners: serving HTTP/1.1 on a port, and each kind's bookkeeping.

Three kinds of listener, each with its own timeouts and connection limit: ``inbound``
(other sidecars → the local app), ``outbound`` (the app's calls, with the ``--upstream``
listeners) and ``admin``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from meshlet.io import (
    BACKLOG,
    Connection,
    ConnectionLimit,
    Deadlines,
    derived_connection_limits,
    listen_socket,
    raise_open_files_limit,
    serve_socket,
)

from ..layers.base import Handler
from ..telemetry import Http2Stats, ListenerStats
from .downstream import Timeouts, serve_connection

log = logging.getLogger("meshlet.sidecar")


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    timeouts: Timeouts,
    *,
    reuse_port: bool = False,
    stop_accepting: trio.Event | None = None,
    accept: Callable[[Connection], Awaitable[None]] | None = None,
    listen_after: trio.Event | None = None,
    limit: ConnectionLimit | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (port 0: any) and serve HTTP/1.1 with ``handler``; reports the
    bound port through ``task_status``. Once ``stop_accepting`` is set, the listener closes
    (new connections are refused) and this returns when the open connections are done.
    ``accept``: serves each connection instead (it may look at the socket first).
    ``listen_after``: the port is bound at once but refuses connections until it is set.
    ``limit``: the connections it may hold at once (shared with other listeners if given to them)."""
    listener = listen_socket(host, port, reuse_port=reuse_port, listen=listen_after is None)
    try:
        async with trio.open_nursery() as nursery:

            async def on_connection(io: Connection) -> None:
                await serve_connection(io, handler, timeouts)

            task_status.started(listener.getsockname()[1])
            with trio.CancelScope() as accepting:
                if stop_accepting is not None:
                    nursery.start_soon(_cancel_when_set, stop_accepting, accepting)
                if listen_after is not None:
                    await listen_after.wait()
                    listener.listen(BACKLOG)
                await serve_socket(listener, accept or on_connection, nursery, limit)
            listener.close()
    finally:
        listener.close()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def kind_of(listener: str) -> str:
    """``inbound``, ``outbound``, ``admin``, or ``upstream:NAME``: those serve the app's
    calls, so they are outbound ones."""
    return listener if listener in ("inbound", "admin") else "outbound"


class Listeners:
    """Per kind of listener: its timeouts and its connection limit; per listener: the
    address it is bound to (port 0 → the port it got)."""

    def __init__(self, deadlines: Deadlines, header_timeout: float) -> None:
        self.timeouts = {
            "inbound": Timeouts(deadlines, header=header_timeout),  # drained when the sidecar stops
            # The app's own calls (outbound, --upstream ports) are served until the sidecar exits:
            # its requests in flight may still need to call other services to finish.
            "outbound": Timeouts(deadlines, header=header_timeout),
            "admin": Timeouts(deadlines),  # keeps serving while draining
        }
        self.limits: dict[str, ConnectionLimit] = {}  # set by limit()
        self.addresses: dict[str, tuple[str, int]] = {}  # by listener, as bound

    def limit(self, inbound: int | None, outbound: int | None, admin: int | None) -> None:
        """Raise the open files limit as far as allowed, then one limit per listener kind: the
        one given, else derived from the open files limit so that full data listeners still
        leave descriptors for the admin listener, upstream connections and the push channel."""
        open_files = raise_open_files_limit()
        derived = derived_connection_limits(open_files)
        chosen = {
            "inbound": inbound or derived.inbound,
            "outbound": outbound or derived.outbound,
            "admin": admin or derived.admin,
        }
        log.info(
            "connection limits: inbound %d, outbound %d, admin %d (open files limit %d)",
            chosen["inbound"],
            chosen["outbound"],
            chosen["admin"],
            open_files,
        )
        self.limits = {kind: ConnectionLimit(kind, n) for kind, n in chosen.items()}

    def stats(self) -> list[ListenerStats]:
        """For /metrics: (listener kind, open connections, limit, closed at once, timed out by
        phase, requests answered by the listener itself by code)."""
        timeouts = self.timeouts
        return [
            (kind, limit.open, limit.limit, limit.rejected, timeouts[kind].expired, timeouts[kind].rejected)
            for kind, limit in self.limits.items()
        ]

    def http2_stats(self) -> list[Http2Stats]:
        """For /metrics: per listener kind, its HTTP/2 connections and streams."""
        rows = []
        for kind, timeouts in self.timeouts.items():
            h2 = timeouts.http2
            rows.append((kind, h2.connections, h2.streams, h2.served, h2.closed, h2.resets))
        return rows
