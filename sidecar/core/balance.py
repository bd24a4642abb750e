"""Endpoint choice: the load balancers of docs/policy.md. Pure: state lives in the balancer
objects, randomness comes from the ``random.Random`` each is given, and time only from the
``now`` passed to :meth:`finished` / :meth:`scores` (no clock is read here).

Every balancer has one interface (:class:`Balancer`): ``Kind(endpoints, rng, *, states=None)``
builds it, ``pick(exclude=())`` chooses, ``started`` / ``finished`` report a request's life,
``update`` takes a new snapshot's endpoint set, ``scores`` is what ``explain`` shows.

* ``ewma`` (the default), :class:`PeakEwma`: Finagle's peak-EWMA with the power of two
  choices, as Linkerd (tower's ``PeakEwma``) uses it. Each endpoint has a cost, a latency
  estimate in seconds. A response slower than the cost replaces it (the peak); a faster one
  pulls it down, ``w = exp(-(now - last) / decay)``, ``cost = cost * w + rtt * (1 - w)``, so a
  slow spell is believed at once and a fast one over ``decay`` seconds. Until its first
  response an endpoint is scored as a typical success here (an EWMA of every endpoint's
  successful rtts), or ``default_rtt`` before there is any: with a fixed 30 ms prior a new
  endpoint among 1 ms ones would lose every draw at low load and never be measured (our
  change to Linkerd's rule). The first response replaces the prior. A failed request
  is observed as ``max(rtt, failure_penalty)``: a fast failure must not attract traffic.
  Observed rtts are floored at ``min_rtt`` (1 ms): below it, differences are noise and the
  in-flight count decides. Score = ``cost * (in_flight + 1) / weight``, lower is better.
  When scoring, the cost is decayed towards 0 since the endpoint's last response (Finagle's
  ``observe(0)`` and tower's load-time decay), so an endpoint that lost every draw is tried
  again after a while instead of never; the time used is the latest ``now`` any ``finished``
  reported (the balancers' clock: it moves with the traffic).
* ``least_request``, :class:`LeastRequest`: Envoy's least request with the power of two
  choices and ``active_request_bias`` 1: score = ``(in_flight + 1) / weight`` (Envoy prefers
  the higher ``weight / (active + 1)``). Envoy switches to an EDF schedule when the weights
  differ; here the same two choices serve both cases, the weight dividing the score.
* ``round_robin``, :class:`RoundRobin`: an endpoint of weight w gets w turns in a row per
  cycle, in the configured order; excluded ones are skipped and the rotation goes on.
* ``random``, :class:`RandomBalancer`: an endpoint with probability ``weight / total``. With
  an exclude set, up to three draws are tried, then one weighted draw over the endpoints
  left (exact: both steps draw from the same distribution restricted to what is allowed).

The power of two choices: two distinct endpoints are drawn uniformly (the weight is in the
score already) and the lower score wins; a tie goes to the first drawn. With one candidate
it is chosen; with none (empty, or every endpoint excluded) ``pick`` returns None. Without
an exclude set a pick allocates nothing; with one (a retry) it filters a tuple first.

Endpoints are matched by address (``Endpoint`` equality): ``update`` keeps the state (cost,
in-flight count) of the endpoints still there, takes their new weight and labels, and drops
the others'. An address listed twice counts once, the first. A weight below 1 (configs
allow 1-1000: meshlet/endpoints.py) is never picked. ``finished`` for an endpoint the
balancer no longer has is ignored, and in-flight counts never go below 0 (a request that
started before an update that dropped its endpoint).

Zone preference, :class:`ZoneAware`: the endpoints whose ``zone`` label is the local zone
are preferred outright; only when none of them can be picked (none there, or all excluded)
does the choice fail over to all endpoints (Istio's locality failover; not Envoy's
proportional zone-aware routing). Both inner balancers share one :class:`EndpointStates`,
so an endpoint has one in-flight count and one cost whichever of them picked it.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Container, Iterable, Sequence
from itertools import accumulate
from typing import Protocol

from .services import Endpoint

KINDS = ("ewma", "least_request", "round_robin", "random")
DEFAULT_KIND = "ewma"
ZONE_LABEL = "zone"

DEFAULT_RTT = 0.03  # seconds: the cost of an endpoint no response came from yet (Linkerd's 30 ms)
DEFAULT_DECAY = 10.0  # seconds (Linkerd's and Finagle's)
DEFAULT_FAILURE_PENALTY = 5.0  # seconds: how a failed request is observed at least
MIN_RTT = 0.001  # seconds: observed rtts and decayed costs are floored here

_REDRAWS = 3  # RandomBalancer: draws tried before the scan, when there is an exclude set


class Balancer(Protocol):
    @property
    def states(self) -> EndpointStates:
        """The per-endpoint state (in-flight counts, costs) this balancer reads."""
        ...

    def pick(self, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        """An endpoint not in ``exclude``, or None when there is none."""
        ...

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """A new endpoint set: the state of the endpoints still there (by address) is kept."""
        ...

    def started(self, endpoint: Endpoint) -> None:
        """A request to ``endpoint`` began."""
        ...

    def finished(self, endpoint: Endpoint, rtt: float, now: float, failed: bool = False) -> None:
        """It ended; ``rtt``: seconds to the response head; ``now``: when (seconds)."""
        ...

    def scores(self, now: float) -> list[tuple[str, float]]:
        """(address, score) in the configured order; lower is better (round_robin and
        random: (address, weight))."""
        ...


class _EndpointState:
    """What is known of one endpoint; one object per address, shared by the balancers over it."""

    __slots__ = ("endpoint", "weight", "in_flight", "cost", "stamp")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint  # the latest snapshot's (its weight and labels)
        self.weight = endpoint.weight
        self.in_flight = 0
        self.cost = 0.0  # PeakEwma's estimate (seconds), once stamp is set
        self.stamp: float | None = None  # when the last response was observed; None: never


class EndpointStates:
    """The per-endpoint state of one endpoint set, by address, and the balancers' clock.
    Owned by one balancer (or a :class:`ZoneAware`), which alone drops states on update."""

    __slots__ = ("_by", "now")

    def __init__(self) -> None:
        self._by: dict[Endpoint, _EndpointState] = {}
        self.now = -math.inf  # the latest ``now`` a finished request reported

    def __len__(self) -> int:
        return len(self._by)

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self._by

    def in_flight(self, endpoint: Endpoint) -> int:
        state = self._by.get(endpoint)
        return state.in_flight if state is not None else 0

    def retain(self, endpoints: Iterable[Endpoint]) -> None:
        """Drop the state of every endpoint not in ``endpoints``."""
        keep = set(endpoints)
        for endpoint in [e for e in self._by if e not in keep]:
            del self._by[endpoint]

    def track(self, endpoints: Iterable[Endpoint]) -> tuple[_EndpointState, ...]:
        """The states of ``endpoints`` in order (one per address, the first listed), made
        for new addresses; kept ones take the new weight and labels."""
        by = self._by
        seen: dict[Endpoint, _EndpointState] = {}
        for endpoint in endpoints:
            if endpoint in seen:
                continue
            state = by.get(endpoint)
            if state is None:
                state = by[endpoint] = _EndpointState(endpoint)
            else:
                state.endpoint = endpoint
                state.weight = endpoint.weight
            seen[endpoint] = state
        return tuple(seen.values())

    def started(self, endpoint: Endpoint) -> None:
        state = self._by.get(endpoint)
        if state is not None:
            state.in_flight += 1

    def finished(self, endpoint: Endpoint, now: float) -> _EndpointState | None:
        if now > self.now:
            self.now = now
        state = self._by.get(endpoint)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1
        return state


class _Base:
    """What every balancer shares: the states, in-flight accounting, update."""

    __slots__ = ("states", "_own", "_rng", "_candidates")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None, states: EndpointStates | None) -> None:
        self._own = states is None
        self.states = EndpointStates() if states is None else states
        self._rng = rng
        self._candidates: tuple[_EndpointState, ...] = ()
        self.update(endpoints)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        if self._own:
            self.states.retain(endpoints)
        self._candidates = tuple(s for s in self.states.track(endpoints) if s.weight > 0)
        self._rebuild(endpoints)

    def _rebuild(self, endpoints: Sequence[Endpoint]) -> None:
        pass

    def started(self, endpoint: Endpoint) -> None:
        self.states.started(endpoint)

    def finished(self, endpoint: Endpoint, rtt: float, now: float, failed: bool = False) -> None:
        self.states.finished(endpoint, now)

    def scores(self, now: float) -> list[tuple[str, float]]:
        return [(s.endpoint.address, float(s.weight)) for s in self._candidates]


class _PowerOfTwo(_Base):
    """Two distinct candidates drawn uniformly; the lower ``_score`` wins (ties: the first)."""

    __slots__ = ()

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random, states: EndpointStates | None) -> None:
        super().__init__(endpoints, rng, states)

    def _score(self, state: _EndpointState, now: float) -> float:
        raise NotImplementedError

    def pick(self, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        candidates = self._candidates
        if exclude:
            candidates = tuple(s for s in candidates if s.endpoint not in exclude)
        n = len(candidates)
        if n < 2:
            return candidates[0].endpoint if n else None
        rng = self._rng
        assert rng is not None
        i = int(rng.random() * n)  # < n for every float random() returns
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        first, second = candidates[i], candidates[j]
        now = self.states.now
        return second.endpoint if self._score(second, now) < self._score(first, now) else first.endpoint

    def scores(self, now: float) -> list[tuple[str, float]]:
        at = max(now, self.states.now)
        return [(s.endpoint.address, self._score(s, at)) for s in self._candidates]


class PeakEwma(_PowerOfTwo):
    """``ewma``: peak-EWMA latency times (in-flight + 1), over the weight; two choices."""

    __slots__ = ("_default_rtt", "_decay", "_penalty", "_min_rtt", "_typical")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        rng: random.Random,
        *,
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_DECAY,
        failure_penalty: float = DEFAULT_FAILURE_PENALTY,
        min_rtt: float = MIN_RTT,
        states: EndpointStates | None = None,
    ) -> None:
        if not decay > 0:
            raise ValueError("decay must be greater than 0")
        self._default_rtt = max(default_rtt, min_rtt)
        self._decay = decay
        self._penalty = failure_penalty
        self._min_rtt = min_rtt
        # What a success usually takes here (an EWMA over every endpoint's). An endpoint
        # not measured yet is scored with it, not with default_rtt: with fast endpoints a
        # new one at a fixed 30 ms would never win a comparison at low load, so it would
        # get no traffic (and no measurement) until the others were busy.
        self._typical: float | None = None
        super().__init__(endpoints, rng, states)

    def finished(self, endpoint: Endpoint, rtt: float, now: float, failed: bool = False) -> None:
        state = self.states.finished(endpoint, now)
        if state is None:
            return
        if failed and rtt < self._penalty:
            rtt = self._penalty
        if rtt < self._min_rtt:
            rtt = self._min_rtt
        if not failed:
            typical = self._typical
            self._typical = rtt if typical is None else typical * 0.9 + rtt * 0.1
        stamp = state.stamp
        if stamp is None or rtt > state.cost:
            state.cost = rtt
        else:
            elapsed = now - stamp
            w = math.exp(-elapsed / self._decay) if elapsed > 0 else 1.0
            state.cost = state.cost * w + rtt * (1.0 - w)
        if stamp is None or now > stamp:
            state.stamp = now

    def _score(self, state: _EndpointState, now: float) -> float:
        stamp = state.stamp
        if stamp is None:
            cost = self._default_rtt if self._typical is None else self._typical
        else:
            cost = state.cost
            if now > stamp:
                cost *= math.exp((stamp - now) / self._decay)
                if cost < self._min_rtt:
                    cost = self._min_rtt
        return cost * (state.in_flight + 1) / state.weight


class LeastRequest(_PowerOfTwo):
    """``least_request``: (in-flight + 1) over the weight; two choices."""

    __slots__ = ()

    def __init__(
        self, endpoints: Sequence[Endpoint], rng: random.Random, *, states: EndpointStates | None = None
    ) -> None:
        super().__init__(endpoints, rng, states)

    def _score(self, state: _EndpointState, now: float) -> float:
        return (state.in_flight + 1) / state.weight


class RoundRobin(_Base):
    """Weighted round robin: an endpoint of weight w gets w turns per cycle.
    ``rng`` is not used (accepted for the common signature)."""

    __slots__ = ("_ring", "_next")

    def __init__(
        self, endpoints: Sequence[Endpoint], rng: random.Random | None = None, *, states: EndpointStates | None = None
    ) -> None:
        self._ring: tuple[Endpoint, ...] = ()
        self._next = 0
        super().__init__(endpoints, rng, states)

    def _rebuild(self, endpoints: Sequence[Endpoint]) -> None:
        # The ring keeps the configured list as it is (an address listed twice gets both turns).
        self._ring = tuple(e for e in endpoints for _ in range(e.weight))
        self._next = self._next % len(self._ring) if self._ring else 0

    def pick(self, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        ring = self._ring
        n = len(ring)
        for _ in range(n):
            endpoint = ring[self._next % n]
            self._next = (self._next + 1) % n
            if not exclude or endpoint not in exclude:
                return endpoint
        return None


class RandomBalancer(_Base):
    """``random``: an endpoint with probability weight / total."""

    __slots__ = ("_cumulative", "_total")

    def __init__(
        self, endpoints: Sequence[Endpoint], rng: random.Random, *, states: EndpointStates | None = None
    ) -> None:
        self._cumulative: tuple[int, ...] = ()
        self._total = 0
        super().__init__(endpoints, rng, states)

    def _rebuild(self, endpoints: Sequence[Endpoint]) -> None:
        self._cumulative = tuple(accumulate(s.weight for s in self._candidates))
        self._total = self._cumulative[-1] if self._cumulative else 0

    def pick(self, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        candidates = self._candidates
        if not candidates:
            return None
        rng = self._rng
        assert rng is not None
        cumulative, total = self._cumulative, self._total
        for _ in range(_REDRAWS if exclude else 1):
            endpoint = candidates[bisect_right(cumulative, rng.random() * total)].endpoint
            if not exclude or endpoint not in exclude:
                return endpoint
        allowed = 0
        for s in candidates:
            if s.endpoint not in exclude:
                allowed += s.weight
        if not allowed:
            return None
        r = rng.random() * allowed
        last = None
        for s in candidates:
            if s.endpoint not in exclude:
                last = s.endpoint
                r -= s.weight
                if r < 0:
                    return last
        return last  # not reached: r < allowed


def make_balancer(
    kind: str,
    endpoints: Sequence[Endpoint],
    rng: random.Random,
    *,
    default_rtt: float = DEFAULT_RTT,
    decay: float = DEFAULT_DECAY,
    failure_penalty: float = DEFAULT_FAILURE_PENALTY,
    states: EndpointStates | None = None,
) -> Balancer:
    """The balancer a DestinationPolicy's ``load_balancer`` names (one of :data:`KINDS`)."""
    if kind == "ewma":
        return PeakEwma(
            endpoints, rng, default_rtt=default_rtt, decay=decay, failure_penalty=failure_penalty, states=states
        )
    if kind == "least_request":
        return LeastRequest(endpoints, rng, states=states)
    if kind == "round_robin":
        return RoundRobin(endpoints, rng, states=states)
    if kind == "random":
        return RandomBalancer(endpoints, rng, states=states)
    raise ValueError(f"load balancer {kind!r} is not one of {', '.join(KINDS)}")


class ZoneAware:
    """The local zone's endpoints first, all of them when none of those can be picked.
    ``local_zone`` None, or no endpoint labelled with it: a plain balancer over all."""

    __slots__ = ("_kind", "_zone", "_rng", "_options", "states", "_all", "_local")

    def __init__(
        self,
        kind: str,
        endpoints: Sequence[Endpoint],
        local_zone: str | None,
        rng: random.Random,
        *,
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_DECAY,
        failure_penalty: float = DEFAULT_FAILURE_PENALTY,
    ) -> None:
        self._kind = kind
        self._zone = local_zone
        self._rng = rng
        self._options = (default_rtt, decay, failure_penalty)
        self.states = EndpointStates()
        self._all = self._make(endpoints)
        self._local: Balancer | None = None
        self._update_local(endpoints)

    def _make(self, endpoints: Sequence[Endpoint]) -> Balancer:
        default_rtt, decay, failure_penalty = self._options
        return make_balancer(
            self._kind,
            endpoints,
            self._rng,
            default_rtt=default_rtt,
            decay=decay,
            failure_penalty=failure_penalty,
            states=self.states,
        )

    def _update_local(self, endpoints: Sequence[Endpoint]) -> None:
        zone = self._zone
        local = [e for e in endpoints if e.labels.get(ZONE_LABEL) == zone] if zone is not None else []
        if not local:
            self._local = None
        elif self._local is None:
            self._local = self._make(local)
        else:
            self._local.update(local)

    def pick(self, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        if self._local is not None:
            endpoint = self._local.pick(exclude)
            if endpoint is not None:
                return endpoint
        return self._all.pick(exclude)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self.states.retain(endpoints)
        self._all.update(endpoints)
        self._update_local(endpoints)

    def started(self, endpoint: Endpoint) -> None:
        self._all.started(endpoint)

    def finished(self, endpoint: Endpoint, rtt: float, now: float, failed: bool = False) -> None:
        self._all.finished(endpoint, rtt, now, failed)

    def scores(self, now: float) -> list[tuple[str, float]]:
        return self._all.scores(now)
