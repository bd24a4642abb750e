"""Passive outlier detection per endpoint (docs/policy.md): Envoy's consecutive-failure ejection,
with Linkerd's probation on the way back. Pure: no I/O, no clock; ``now`` (monotonic
seconds) is passed in, so the same calls always give the same answers.

The caller decides what a failure is (5xx and gateway failures: connect failure, reset,
timeout) and tells the detector about every request: :meth:`OutlierDetector.started` when
it begins, then :meth:`~OutlierDetector.record` with its outcome, or
:meth:`~OutlierDetector.release` when it ended with none (cancelled).

* **Ejection** (Envoy's ``consecutive_5xx``): an endpoint is ejected on its
  ``consecutive_failures``-th failure in a row; a success resets the count. Ejection ``k``
  (``times_ejected`` = k) lasts ``base_ejection × k`` seconds, capped at ``max_ejection``:
  30, 60, 90 … 300 with the defaults. ``on_eject(endpoint, seconds)`` is called for each.
* **The cap**: at most ``floor(max_ejected_percent × n / 100)`` of the ``n`` endpoints are
  ejected at once (the product is taken first, so whole percentages are exact: 50 % of 3
  is 1, of 4 is 2, of 1 is 0). An ejection that would exceed it does not happen and nothing
  changes but the count, which keeps growing: each further failure tries again, so the
  endpoint is ejected on its first failure after room frees up. Not on the freeing itself:
  a success in between resets the count, and the evidence that counts is a recent failure.
  Envoy once ejected one host whatever the percentage ("if no hosts have been ejected,
  eject immediately"), then made that opt-in (``always_eject_one_host``); here there is
  no such exception: with one endpoint and 50 %, nothing is ever ejected. That is
  intended: ejecting the only endpoint would only trade its errors for panic.
* **Probation** (Linkerd): when its ejection time is over an endpoint is offered again,
  but to one request at a time: from :meth:`~OutlierDetector.started` until that request's
  outcome or release, it is left out of :meth:`~OutlierDetector.available`. The first
  outcome recorded while in probation is the verdict: a success makes it healthy (count
  reset), a failure ejects it again at once, for longer (``times_ejected + 1``), room
  permitting; without room it stays in probation, one request at a time, and its next
  failure tries again. Ejected endpoints move to probation lazily, when ``now`` is read.
* **Decay**: ``times_ejected`` is kept when an endpoint comes back, so an endpoint that
  keeps failing is ejected for longer and longer; once it has been healthy for a whole
  ``max_ejection`` period it starts over from 0 (Envoy instead takes one off at every
  interval sweep; a single reset needs no timer).
* **Outcomes while ejected** (requests begun before the ejection, or sent in panic) are
  ignored: the endpoint is judged afresh in probation.
* **Panic** (Envoy's panic threshold, at its limit): when no endpoint is left to offer,
  :meth:`~OutlierDetector.available` returns all of them and says so: traffic keeps
  flowing to endpoints that may fail rather than certainly failing here.
* **Membership**: :meth:`~OutlierDetector.update` keeps the state of the endpoints still
  present (an endpoint is its address), drops the rest; outcomes for dropped endpoints are
  ignored. If the smaller set leaves more ejected than the cap allows, those whose
  ejection ends soonest move to probation now.

Cost per request: :meth:`~OutlierDetector.record`, :meth:`~OutlierDetector.started` and
:meth:`~OutlierDetector.release` are one dict look-up; :meth:`~OutlierDetector.available`
returns a cached result (the same tuple object, nothing allocated) until an endpoint
changes state or an ejection ends, and when nothing is ejected it is always the very tuple
of all endpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .services import Endpoint

HEALTHY = "healthy"
EJECTED = "ejected"
PROBATION = "probation"
STATES = (HEALTHY, EJECTED, PROBATION)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_failures: int = 5
    base_ejection: float = 30.0  # seconds, times the number of ejections so far
    max_ejection: float = 300.0  # seconds: the cap on one ejection, and the decay period
    max_ejected_percent: float = 50.0  # of the endpoints, ejected at once (rounded down)

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        if not (self.base_ejection > 0 and self.max_ejection > 0):
            raise ValueError("base_ejection and max_ejection must be positive")
        if not 0 <= self.max_ejected_percent <= 100:
            raise ValueError("max_ejected_percent must be within [0, 100]")

    def ejection(self, times_ejected: int) -> float:
        """How long ejection number ``times_ejected`` (1, 2, ...) lasts."""
        return min(self.base_ejection * times_ejected, self.max_ejection)

    def max_ejected(self, endpoints: int) -> int:
        """``floor(max_ejected_percent × endpoints / 100)``."""
        return math.floor(self.max_ejected_percent * endpoints / 100)


class _Host:
    """One endpoint's state."""

    __slots__ = ("busy", "consecutive", "endpoint", "healthy_since", "state", "times_ejected", "until")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.state = HEALTHY
        self.consecutive = 0  # failures since the last success (outcomes while ejected ignored)
        self.times_ejected = 0
        self.until = 0.0  # when the ejection ends (state EJECTED)
        self.busy = False  # a probation request is in flight (state PROBATION)
        self.healthy_since = 0.0  # when it last came back from probation (for the decay)


class OutlierDetector:
    """The outlier state of one service's endpoints (one detector per destination)."""

    def __init__(
        self,
        config: OutlierConfig,
        endpoints: Sequence[Endpoint],
        on_eject: Callable[[Endpoint, float], None] | None = None,
    ) -> None:
        self.config = config
        self._on_eject = on_eject
        self._hosts: dict[Endpoint, _Host] = {}
        self._ejected: dict[Endpoint, _Host] = {}
        self._probation: dict[Endpoint, _Host] = {}
        self._all: tuple[Endpoint, ...] = ()
        self._everyone: tuple[tuple[Endpoint, ...], bool] = ((), False)
        self._cached: tuple[tuple[Endpoint, ...], bool] = self._everyone
        self._valid_until = math.inf  # the cache holds until an ejection ends ...
        self._dirty = True  # ... or an endpoint changes state
        self.max_ejected = 0
        self.update(endpoints)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """A new set of endpoints (a config snapshot): the state of those still present is kept."""
        old = self._hosts
        hosts: dict[Endpoint, _Host] = {}
        for endpoint in endpoints:
            if endpoint in hosts:
                continue
            host = old.get(endpoint)
            if host is None:
                host = _Host(endpoint)
            host.endpoint = endpoint  # the same address, maybe new labels or weight
            hosts[endpoint] = host
        self._hosts = hosts
        self._ejected = {e: h for e, h in hosts.items() if h.state == EJECTED}
        self._probation = {e: h for e, h in hosts.items() if h.state == PROBATION}
        self._all = tuple(endpoints)
        self._everyone = (self._all, False)
        self.max_ejected = self.config.max_ejected(len(hosts))
        excess = len(self._ejected) - self.max_ejected
        if excess > 0:
            for host in sorted(self._ejected.values(), key=lambda h: h.until)[:excess]:
                self._to_probation(host)
        self._dirty = True

    def available(self, now: float) -> tuple[tuple[Endpoint, ...], bool]:
        """``(endpoints to balance over, panic)``; when nothing is ejected or in probation,
        always the same object, the endpoints as given."""
        if not self._dirty and now < self._valid_until:
            return self._cached
        self._expire(now)
        if not self._ejected and not self._probation:
            result = self._everyone
        else:
            hosts = self._hosts
            offered = tuple(e for e in self._all if _offered(hosts[e]))
            result = (offered, False) if offered else (self._all, True)
        self._cached = result
        self._valid_until = min((h.until for h in self._ejected.values()), default=math.inf)
        self._dirty = False
        return result

    def started(self, endpoint: Endpoint, now: float) -> None:
        """A request to ``endpoint`` began: in probation, no other is offered it until it ends."""
        host = self._hosts.get(endpoint)
        if host is None or host.state == HEALTHY:
            return
        if host.state == EJECTED and now >= host.until:
            self._to_probation(host)
        if host.state == PROBATION and not host.busy:
            host.busy = True
            self._dirty = True

    def record(self, endpoint: Endpoint, now: float, failed: bool) -> None:
        """The outcome of a request to ``endpoint``."""
        host = self._hosts.get(endpoint)
        if host is None:
            return  # dropped by an update while the request was in flight
        if host.state == HEALTHY:
            if not failed:
                host.consecutive = 0
                return
            host.consecutive += 1
            if host.consecutive >= self.config.consecutive_failures:
                self._eject(host, now)
            return
        if host.state == EJECTED:
            if now < host.until:
                return
            self._to_probation(host)
        # In probation: this outcome is the verdict.
        if host.busy:
            host.busy = False
            self._dirty = True
        if failed:
            host.consecutive += 1
            self._eject(host, now)
        else:
            host.consecutive = 0
            host.state = HEALTHY
            host.healthy_since = now
            del self._probation[host.endpoint]
            self._dirty = True

    def release(self, endpoint: Endpoint) -> None:
        """A request to ``endpoint`` ended with no outcome (cancelled): frees a probation slot."""
        host = self._hosts.get(endpoint)
        if host is not None and host.busy:
            host.busy = False
            self._dirty = True

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Each endpoint's state, for ``meshlet explain``."""
        self._expire(now)
        rows: list[dict[str, Any]] = []
        for host in self._hosts.values():
            self._decay(host, now)
            rows.append(
                {
                    "address": host.endpoint.address,
                    "state": host.state,
                    "consecutive_failures": host.consecutive,
                    "times_ejected": host.times_ejected,
                    "ejected_for_s": round(host.until - now, 3) if host.state == EJECTED else 0.0,
                }
            )
        return rows

    def counts(self, now: float) -> dict[str, int]:
        """How many endpoints are in each state (``meshlet_endpoints{state}``)."""
        self._expire(now)
        ejected, probation = len(self._ejected), len(self._probation)
        return {HEALTHY: len(self._hosts) - ejected - probation, EJECTED: ejected, PROBATION: probation}

    def _eject(self, host: _Host, now: float) -> None:
        self._decay(host, now)
        self._expire(now)  # ejections over do not take room
        if len(self._ejected) >= self.max_ejected:
            return  # no room: the count stays, the next failure tries again
        if host.state == PROBATION:
            del self._probation[host.endpoint]
        host.times_ejected += 1
        seconds = self.config.ejection(host.times_ejected)
        host.state = EJECTED
        host.until = now + seconds
        host.busy = False
        self._ejected[host.endpoint] = host
        self._dirty = True
        if self._on_eject is not None:
            self._on_eject(host.endpoint, seconds)

    def _decay(self, host: _Host, now: float) -> None:
        if host.state == HEALTHY and host.times_ejected and now - host.healthy_since >= self.config.max_ejection:
            host.times_ejected = 0

    def _expire(self, now: float) -> None:
        """Ejections that are over become probation."""
        if self._ejected:
            for host in [h for h in self._ejected.values() if now >= h.until]:
                self._to_probation(host)

    def _to_probation(self, host: _Host) -> None:
        del self._ejected[host.endpoint]
        host.state = PROBATION
        host.busy = False
        self._probation[host.endpoint] = host
        self._dirty = True


def _offered(host: _Host) -> bool:
    return host.state == HEALTHY or (host.state == PROBATION and not host.busy)


__all__ = ["EJECTED", "HEALTHY", "PROBATION", "STATES", "OutlierConfig", "OutlierDetector"]
