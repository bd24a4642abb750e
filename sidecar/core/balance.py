"""Endpoint choice. Pure: state lives in the balancer object, randomness is passed in."""

from __future__ import annotations

from collections.abc import Sequence

from .config import Endpoint


class RoundRobin:
    """Weighted round robin: an endpoint of weight w gets w turns per cycle."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._ring: tuple[Endpoint, ...] = tuple(e for e in endpoints for _ in range(e.weight))
        self._next = 0

    def pick(self, exclude: frozenset[Endpoint] = frozenset()) -> Endpoint | None:
        ring = self._ring
        n = len(ring)
        for _ in range(n):
            endpoint = ring[self._next % n]
            self._next = (self._next + 1) % n
            if not exclude or endpoint not in exclude:
                return endpoint
        return None
