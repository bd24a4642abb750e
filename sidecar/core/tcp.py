"""Opaque TCP through the mesh, the pure part: how many endpoints a connection may try,
the state of a spliced pair and the counts it leaves (who may connect: meshlet/access.py).

A ``tcp`` service's connections are never parsed: the sidecar picks an endpoint (the
balancer and outlier detector of sidecar/core/destination.py), connects (the next endpoint
on a connect failure, at most :data:`MAX_CONNECT_ATTEMPTS` tries, Envoy's
``max_connect_attempts``), then copies bytes both ways (sidecar/net/tcp_proxy.py). Each
way ends on its own: one side's end of file becomes a half-close of the other; the pair is
done when both ways are, or at once when either side resets.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# docs/limits.md
MAX_CONNECT_ATTEMPTS = 3  # endpoints tried for one connection (never more than there are)
IDLE_TIMEOUT = 3600.0  # seconds without a byte either way: closed (Envoy tcp_proxy's default)
MAX_SOURCE_LABELS = 200  # distinct callers counted by name; past it, "other"

# What became of a connection (meshlet_tcp_connections_total's ``outcome``): a bounded set.
OK = "ok"  # both ways ended with an end of file
RESET = "reset"  # either side reset (or went away): the other was reset too
IDLE = "idle-timeout"
CONNECT_FAILED = "connect-failed"  # every endpoint tried failed (or the app did not answer)
CIRCUIT_OPEN = "circuit-open"  # refused at once: the destination's breaker is open
NO_ENDPOINTS = "no-endpoints"  # the service has none (or is unknown)
DENIED = "denied"  # an AccessPolicy does not let the caller in
OUTCOMES = (OK, RESET, IDLE, CONNECT_FAILED, CIRCUIT_OPEN, NO_ENDPOINTS, DENIED)

# Connection lifetimes: 10 ms to an hour (the idle timeout's default).
DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0)

ByteKey = tuple[str, str, str, str]  # (direction, source, destination, way)
UP, DOWN = 0, 1  # the ways: from the client to the server, and back


def connect_attempts(endpoints: int) -> int:
    """How many endpoints one connection may try: a dead one is skipped, within a bound."""
    return max(1, min(MAX_CONNECT_ATTEMPTS, endpoints))


class Splice:
    """One spliced pair: which ways have ended and what ended them."""

    __slots__ = ("ended", "outcome")

    def __init__(self) -> None:
        self.ended = [False, False]
        self.outcome = OK

    def end_of_file(self, way: int) -> bool:
        """``way`` carried its end of file across; whether the pair is done."""
        self.ended[way] = True
        return self.ended[UP] and self.ended[DOWN]

    def broken(self, outcome: str) -> None:
        """A reset or the idle timeout: the pair ends now, both sides reset (the first cause kept)."""
        if self.outcome == OK:
            self.outcome = outcome


class TcpStats:
    """The counts behind the ``meshlet_tcp_*`` metrics; plain dicts of labels → numbers.
    Labels: direction (outbound, inbound), source and destination services (bounded:
    callers past :data:`MAX_SOURCE_LABELS` names are "other"), outcome, way."""

    def __init__(self, max_sources: int = MAX_SOURCE_LABELS) -> None:
        self.connections: dict[tuple[str, str, str, str], int] = {}  # (direction, source, destination, outcome)
        # (direction, source, destination, way): received from the client, sent to it
        self.bytes: dict[tuple[str, str, str, str], int] = {}
        self.durations: dict[tuple[str, str, str], list[float]] = {}  # buckets..., +Inf, sum
        self.open: dict[str, int] = {"outbound": 0, "inbound": 0}
        self.max_sources = max_sources
        self._names: set[str] = set()

    def name(self, service: str) -> str:
        """``service`` as a label value, within the bound."""
        names = self._names
        if service in names:
            return service
        if len(names) >= self.max_sources:
            return "other"
        names.add(service)
        return service

    def opened(self, direction: str) -> None:
        self.open[direction] += 1

    def byte_keys(self, direction: str, source: str, destination: str) -> tuple[ByteKey, ByteKey]:
        """The keys of the two byte counters of a connection (received, sent), made once."""
        received = (direction, source, destination, "received")
        sent = (direction, source, destination, "sent")
        self.bytes.setdefault(received, 0)
        self.bytes.setdefault(sent, 0)
        return received, sent

    def closed(self, direction: str, source: str, destination: str, outcome: str, seconds: float) -> None:
        self.open[direction] -= 1
        key = (direction, source, destination, outcome)
        self.connections[key] = self.connections.get(key, 0) + 1
        labels = (direction, source, destination)
        histogram = self.durations.get(labels)
        if histogram is None:
            histogram = self.durations[labels] = [0.0] * (len(DURATION_BUCKETS) + 2)
        histogram[bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram[-1] += seconds

    def refused(self, direction: str, source: str, destination: str, outcome: str) -> None:
        """A connection closed before it was spliced (never opened as far as the gauge goes)."""
        self.open[direction] += 1
        self.closed(direction, source, destination, outcome, 0.0)

    def snapshot(self) -> dict[str, Any]:
        return {
            "tcp_connections": [[*k, v] for k, v in self.connections.items()],
            "tcp_bytes": [[*k, v] for k, v in self.bytes.items()],
            "tcp_durations": [[*k, v] for k, v in self.durations.items()],
            "tcp_open": [[k, v] for k, v in self.open.items()],
        }


__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONNECT_ATTEMPTS",
    "OUTCOMES",
    "Splice",
    "TcpStats",
    "connect_attempts",
]
