"""How calls to a destination are made, and what the sidecar remembers about it. Pure.

:class:`Settings` is a ``DestinationPolicy`` (meshlet/schema.py) compiled for the
request path, or the defaults of docs/policy.md when a service has none. A
:class:`Destination` holds the state that must outlive config snapshots (the endpoints
change on every registration): the circuit breaker, the retry budget, the outlier
detector, a balancer per subset, the rate limit's bucket and the in-flight count.
:class:`Destinations` keeps one per (service, rule) and hands the right one to each
request: a policy written for one Route rule (``rule: ROUTE/RULE``) has its own breaker
and budget, others share the service's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .balance import Balancer, ZoneAware, make_balancer
from .breaker import BreakerConfig, CircuitBreaker, State
from .outcome import RetryOn
from .outlier import OutlierConfig, OutlierDetector
from .ratelimit import TokenBucket
from .retry import RetryBudget
from .services import Endpoint, ServiceConfig

if TYPE_CHECKING:
    from meshlet.schema import DestinationPolicy

DEFAULT_RETRY_ON = ("connect-failure", "reset", "refused", "unavailable")


@dataclass(frozen=True, slots=True)
class Fallback:
    """What an OPEN circuit answers instead of 503 ``circuit-open``."""

    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    service: str | None = None  # or: send the request to this service instead


@dataclass(frozen=True, slots=True)
class Settings:
    name: str = ""  # the DestinationPolicy's name; "" for the defaults
    mode: str = "enforce"
    load_balancer: str = "ewma"
    connect_timeout: float | None = None  # None: the service's (Service document, or 1 s)
    timeout: float | None = None  # None: the service's (15 s); covers every attempt
    per_try_timeout: float | None = None
    attempts: int = 2  # retries after the first try
    retry_on: RetryOn = field(default_factory=lambda: RetryOn(DEFAULT_RETRY_ON))
    non_idempotent: bool = False
    replay_limit: int = 64 * 1024  # bytes of request body kept to send again
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget_ratio: float = 0.2
    budget_min_per_second: float = 10.0
    budget_window: float = 10.0
    breaker: BreakerConfig = BreakerConfig()
    outlier: OutlierConfig = OutlierConfig()
    max_inflight: int = 1024
    max_pending: int = 1024
    fallback: Fallback | None = None
    rate_limit: tuple[float, int] | None = None  # (requests a second, burst)
    hedge_delay: float | str | None = None  # None: no hedging; seconds, or "p95" of observed latency
    hedge_min_delay: float = 0.005

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"


DEFAULTS = Settings()


def settings(policy: DestinationPolicy) -> Settings:
    retries, breaker, outlier = policy.retries, policy.circuit_breaker, policy.outlier_detection
    fallback = None
    if policy.fallback is not None:
        f = policy.fallback
        fallback = Fallback(
            f.status,
            tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in f.headers.items()),
            f.body.encode(),
            f.service,
        )
    return Settings(
        name=policy.name,
        mode=policy.mode,
        load_balancer=policy.load_balancer,
        connect_timeout=policy.connect_timeout,
        timeout=policy.timeout,
        per_try_timeout=policy.per_try_timeout,
        attempts=retries.attempts,
        retry_on=RetryOn(retries.retry_on, retries.retriable_status_codes),
        non_idempotent=retries.non_idempotent,
        replay_limit=retries.buffer_bytes,
        backoff_base=retries.backoff.base,
        backoff_max=retries.backoff.max,
        budget_ratio=retries.budget.ratio,
        budget_min_per_second=retries.budget.min_per_second,
        budget_window=retries.budget.window,
        breaker=BreakerConfig(
            window=breaker.window,
            min_requests=breaker.min_requests,
            failure_ratio=breaker.failure_ratio,
            open_for=breaker.open_for,
            half_open_requests=breaker.half_open_requests,
            slow_threshold=breaker.slow_call.threshold if breaker.slow_call else None,
            slow_ratio=breaker.slow_call.ratio if breaker.slow_call else 1.0,
            force=breaker.force,
        ),
        outlier=OutlierConfig(
            consecutive_failures=outlier.consecutive_failures,
            base_ejection=outlier.base_ejection,
            max_ejection=outlier.max_ejection,
            max_ejected_percent=outlier.max_ejected_percent,
        ),
        max_inflight=policy.limits.max_inflight,
        max_pending=policy.limits.max_pending,
        fallback=fallback,
        rate_limit=(policy.rate_limit.requests_per_second, policy.rate_limit.burst) if policy.rate_limit else None,
        hedge_delay=policy.hedging.delay if policy.hedging else None,
        hedge_min_delay=policy.hedging.min_delay if policy.hedging else 0.005,
    )


# Transition and ejection hooks, for the metrics: (service, new state) and (service, endpoint).
OnTransition = Callable[[str, State], None]
OnEject = Callable[[str, Endpoint], None]


class Destination:
    """One destination's settings and state. ``key``: the service, or "service rule"."""

    def __init__(
        self,
        service: str,
        settings: Settings,
        endpoints: tuple[Endpoint, ...],
        now: float,
        rng: random.Random,
        on_transition: OnTransition | None = None,
        on_eject: OnEject | None = None,
        local_zone: str | None = None,
    ) -> None:
        self.service = service
        self.local_zone = local_zone
        self.rng = rng
        self.endpoints = endpoints
        self.inflight = 0
        self.latencies = LatencySample()
        self._on_transition = on_transition
        self._on_eject = on_eject
        self._balancers: dict[tuple[tuple[str, str], ...], Balancer] = {}
        self.settings = settings
        self.breaker = self._breaker(now)
        self.budget = self._budget(now)
        self.bucket = self._bucket(now)
        self.outlier = self._outlier(endpoints)

    def _breaker(self, now: float) -> CircuitBreaker:
        hook = self._on_transition
        service = self.service
        return CircuitBreaker(
            self.settings.breaker, now, (lambda _old, new: hook(service, new)) if hook is not None else None
        )

    def _outlier(self, endpoints: tuple[Endpoint, ...]) -> OutlierDetector:
        hook, service = self._on_eject, self.service
        return OutlierDetector(
            self.settings.outlier, endpoints, (lambda e, _s: hook(service, e)) if hook is not None else None
        )

    def _budget(self, now: float) -> RetryBudget:
        s = self.settings
        return RetryBudget(s.budget_ratio, s.budget_min_per_second, s.budget_window, now)

    def _bucket(self, now: float) -> TokenBucket | None:
        limit = self.settings.rate_limit
        return TokenBucket(limit[0], limit[1], now) if limit is not None else None

    def configure(self, settings: Settings, endpoints: tuple[Endpoint, ...], now: float) -> None:
        """A new snapshot: new endpoints keep their history; a changed knob starts that
        mechanism afresh (a new breaker for new breaker settings), the rest carry on."""
        old, self.settings = self.settings, settings
        if settings.breaker != old.breaker:
            self.breaker = self._breaker(now)
        if (settings.budget_ratio, settings.budget_min_per_second, settings.budget_window) != (
            old.budget_ratio,
            old.budget_min_per_second,
            old.budget_window,
        ):
            self.budget = self._budget(now)
        if settings.rate_limit != old.rate_limit:
            self.bucket = self._bucket(now)
        if settings.outlier != old.outlier:
            self.outlier = self._outlier(endpoints)
        elif endpoints != self.endpoints:
            self.outlier.update(endpoints)
        if settings.load_balancer != old.load_balancer:
            self._balancers.clear()
        elif endpoints != self.endpoints:
            for labels, balancer in self._balancers.items():
                balancer.update(_subset(endpoints, labels))
        self.endpoints = endpoints

    def balancer(self, labels: tuple[tuple[str, str], ...] = ()) -> Balancer:
        """The balancer over the endpoints whose labels include ``labels`` (a subset)."""
        found = self._balancers.get(labels)
        if found is None:
            endpoints = _subset(self.endpoints, labels)
            kind = self.settings.load_balancer
            if self.local_zone is not None:  # prefer endpoints in our zone, fail over to the others
                found = ZoneAware(kind, endpoints, self.local_zone, self.rng)
            else:
                found = make_balancer(kind, endpoints, self.rng)
            self._balancers[labels] = found
        return found


class ShadowDestination:
    """A DestinationPolicy in shadow mode: its breaker, rate limit and bulkhead judge the
    real traffic (the defaults serve it) and each request's verdict is counted
    (``meshlet_shadow_destination_decisions_total``): what rolling it out would do."""

    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker(settings.breaker, now)
        limit = settings.rate_limit
        self.bucket = TokenBucket(limit[0], limit[1], now) if limit is not None else None
        self.inflight = 0

    def judge(self, now: float) -> tuple[str, int | None]:
        """(what the policy would do with this request, the breaker permit if admitted)."""
        settings = self.settings
        if self.bucket is not None and not self.bucket.take(now):
            return "rate-limited", None
        if self.inflight >= settings.max_inflight + settings.max_pending:
            return "overloaded", None
        permit = self.breaker.admit(now)
        if permit is None:
            return "circuit-open", None
        return "allow", permit


class LatencySample:
    """The last :data:`SIZE` response-head latencies, and percentiles of them, worked out
    again every :data:`EVERY` samples (not per request: a sort is not free)."""

    SIZE = 256
    EVERY = 32
    __slots__ = ("ring", "count", "cached")

    def __init__(self) -> None:
        self.ring: list[float] = []
        self.count = 0
        self.cached: dict[str, float] = {}

    def add(self, seconds: float) -> None:
        ring = self.ring
        if len(ring) < self.SIZE:
            ring.append(seconds)
        else:
            ring[self.count % self.SIZE] = seconds
        self.count += 1
        if self.count % self.EVERY == 0:
            self.cached = {}

    def percentile(self, name: str) -> float | None:
        """``"p95"`` → seconds, or None before there are :data:`EVERY` samples."""
        if len(self.ring) < self.EVERY:
            return None
        found = self.cached.get(name)
        if found is None:
            ordered = sorted(self.ring)
            found = self.cached[name] = ordered[min(len(ordered) - 1, int(len(ordered) * int(name[1:]) / 100))]
        return found


def _subset(endpoints: Iterable[Endpoint], labels: tuple[tuple[str, str], ...]) -> list[Endpoint]:
    if not labels:
        return list(endpoints)
    return [e for e in endpoints if all(e.labels.get(k) == v for k, v in labels)]


class Destinations:
    """Every destination this sidecar has called, kept across snapshots."""

    def __init__(
        self,
        rng: random.Random | None = None,
        on_transition: OnTransition | None = None,
        on_eject: OnEject | None = None,
        local_zone: str | None = None,
    ) -> None:
        self.rng = rng or random.Random()
        self.local_zone = local_zone  # this sidecar's zone label, if it has one
        self.on_transition = on_transition
        self.on_eject = on_eject
        self.by_key: dict[str, Destination] = {}
        self.services: Mapping[str, ServiceConfig] = {}
        self.policies: Mapping[tuple[str, str | None], Settings] = {}  # (service, rule) → enforced
        self.shadow: Mapping[tuple[str, str | None], Settings] = {}  # (service, rule) → counted only
        self.shadows: dict[tuple[str, str | None], ShadowDestination] = {}
        self.now = 0.0

    def configure(
        self,
        services: Mapping[str, ServiceConfig],
        policies: Mapping[tuple[str, str | None], Settings],
        shadow: Mapping[tuple[str, str | None], Settings],
        now: float,
    ) -> None:
        self.services, self.policies, self.shadow = services, policies, shadow
        for key, destination in list(self.by_key.items()):
            service, _, rule = key.partition(" ")
            config = services.get(service)
            if config is None:
                del self.by_key[key]  # gone from the mesh: its history goes too
                continue
            destination.configure(self._settings(service, rule or None), config.endpoints, now)

    def _settings(self, service: str, rule: str | None) -> Settings:
        if rule is not None:
            found = self.policies.get((service, rule))
            if found is not None:
                return found
        return self.policies.get((service, None), DEFAULTS)

    def shadow_for(self, service: str, rule: str | None, now: float) -> ShadowDestination | None:
        """The shadow-mode policy that covers this request, if any."""
        key = (service, rule) if rule is not None and (service, rule) in self.shadow else (service, None)
        settings = self.shadow.get(key)
        if settings is None:
            return None
        found = self.shadows.get(key)
        if found is None or found.settings != settings:
            found = self.shadows[key] = ShadowDestination(settings, now)
        return found

    def get(self, service: str, rule: str | None, now: float) -> Destination:
        """The destination for a request to ``service`` that ``rule`` (ROUTE/RULE) matched."""
        key = service
        if rule is not None and (service, rule) in self.policies:
            key = f"{service} {rule}"
        else:
            rule = None
        found = self.by_key.get(key)
        if found is None:
            config = self.services.get(service)
            endpoints = config.endpoints if config is not None else ()
            found = self.by_key[key] = Destination(
                service,
                self._settings(service, rule),
                endpoints,
                now,
                self.rng,
                self.on_transition,
                self.on_eject,
                self.local_zone,
            )
        return found


__all__ = ["DEFAULTS", "Destination", "Destinations", "Fallback", "Settings", "ShadowDestination", "settings"]
