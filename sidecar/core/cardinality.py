"""Bounds on the label values of the sidecar's metrics (docs/observability.md). Pure: no clock, no I/O.

The failure Istio and Linkerd users know: one label fed from request data (a caller's
claimed name, a Host header nobody routes) and every new value is a new series, until
Prometheus falls over. Three bounds, on by default:

* **An allow-list of labels** (MeshConfig ``metrics.labels``). A label left out is written
  empty on every series (Prometheus reads an empty label as absent), so the series it
  would have split are one.
* **A cap on the distinct values of a label** (``metrics.max_label_values``, default 200).
  Past it, a new value is written ``other``, and the fold is counted (per label) so an
  operator sees the cap bite. Labels whose values the sidecar itself bounds (``direction``,
  ``code``, ``grpc_status``) are not capped.
* **Idle series expire** (``metrics.idle_expiry``, default 10 min): a series that did not
  move for that long is removed (a counter that comes back starts again from 0, which
  Prometheus reads as a reset), and its values stop counting against the cap.

:class:`SeriesLimits` maps the labels of a new series to the labels to record. The
telemetry asks it only for a label tuple it has not seen since the last sweep (it keeps
the answers), so a request pays one dict lookup. :class:`IdleSeries` tells, at each
sweep, which series have not moved for the expiry.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

OTHER = "other"
DEFAULT_MAX_VALUES = 200
DEFAULT_IDLE_EXPIRY = 600.0  # seconds
Series = TypeVar("Series", bound=Hashable)  # how a caller keys a series, e.g. its label values
UNCAPPED = frozenset({"direction", "code", "grpc_status"})


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """MeshConfig's ``metrics`` as a sidecar uses it."""

    labels: tuple[str, ...] = ("direction", "source", "destination", "route", "code", "reason", "grpc_status")
    max_label_values: int = 200
    max_series: int = 10_000
    idle_expiry: float = 600.0


class SeriesLimits:
    def __init__(
        self,
        names: tuple[str, ...],
        allowed: Iterable[str] | None = None,
        max_values: int = DEFAULT_MAX_VALUES,
        uncapped: frozenset[str] = UNCAPPED,
    ) -> None:
        allowed_set = set(names if allowed is None else allowed)
        self.names = names
        self.max_values = max_values
        self._keep = tuple(name in allowed_set for name in names)
        self._capped = tuple(keep and name not in uncapped for name, keep in zip(names, self._keep, strict=True))
        self._values: list[set[str]] = [set() for _ in names]
        self.folded: dict[str, int] = {}  # label → new series written with ``other`` for it

    def admit(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """The labels to record a new series under: allow-list applied, values capped."""
        out = []
        for i, value in enumerate(labels):
            if not self._keep[i]:
                value = ""
            elif self._capped[i]:
                seen = self._values[i]
                if value not in seen:
                    if len(seen) >= self.max_values:
                        name = self.names[i]
                        self.folded[name] = self.folded.get(name, 0) + 1
                        value = OTHER
                    else:
                        seen.add(value)
            out.append(value)
        return tuple(out)

    def fold(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """``labels`` with every capped label ``other``: where a new series goes once a
        metric holds ``max_series`` (counted as a fold of each label changed)."""
        out = []
        for i, value in enumerate(labels):
            if self._capped[i] and value != OTHER:
                name = self.names[i]
                self.folded[name] = self.folded.get(name, 0) + 1
                value = OTHER
            out.append(value)
        return tuple(out)

    def rebuild(self, live: Iterable[tuple[str, ...]]) -> None:
        """After series expired: only the values still in use count against the cap."""
        values: list[set[str]] = [set() for _ in self.names]
        for labels in live:
            for i, value in enumerate(labels):
                if self._capped[i] and value != OTHER:
                    values[i].add(value)
        self._values = values

    def distinct(self) -> dict[str, int]:
        """Distinct values per capped label, as counted against the cap."""
        return {
            name: len(values)
            for name, values, capped in zip(self.names, self._values, self._capped, strict=True)
            if capped
        }


class IdleSeries(Generic[Series]):
    """Which series have not moved for ``expiry`` seconds, judged at each :meth:`sweep`
    (the request path never reads a clock for this)."""

    def __init__(self, expiry: float = DEFAULT_IDLE_EXPIRY) -> None:
        self.expiry = expiry
        self._last: dict[Series, tuple[float, float]] = {}  # series → (its count, when it last moved)

    def sweep(self, counts: Mapping[Series, float], now: float) -> list[Series]:
        """The series of ``counts`` (series → a number that grows while it is used) idle for
        the expiry; they are forgotten here, and the caller removes them."""
        last = self._last
        idle = []
        for key, count in counts.items():
            seen = last.get(key)
            if seen is None or seen[0] != count:
                last[key] = (count, now)
            elif now - seen[1] >= self.expiry:
                idle.append(key)
        for key in idle:
            del last[key]
        if len(last) > len(counts):
            for key in [key for key in last if key not in counts]:
                del last[key]
        return idle


__all__ = ["DEFAULT_IDLE_EXPIRY", "DEFAULT_MAX_VALUES", "OTHER", "IdleSeries", "MetricsSettings", "SeriesLimits"]
