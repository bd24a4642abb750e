"""Outbound: how one request to a destination is made — the mechanisms of docs/policy.md in
the order they act (sidecar/core/destination.py holds their settings and state):

1. the rate limit's token bucket (429 ``rate-limited``);
2. the bulkhead: at most ``max_inflight`` requests under way, ``max_pending`` more wait
   for a place, the rest get 503 ``overloaded`` at once;
3. attempts, while the overall timeout lasts (sidecar/layers/attempts.py): each asks the
   circuit breaker (an OPEN circuit answers 503 ``circuit-open``, or the fallback:
   sidecar/layers/fallback.py), picks an endpoint the outlier detector has not ejected
   with the balancer, and may be hedged (sidecar/layers/hedging.py). Each attempt's
   bookkeeping is in one place (sidecar/layers/bookkeeping.py);
4. a retry follows when the pure decision says so (sidecar/core/attempts.py): the outcome
   matches ``retry_on``, the method may be repeated, the body is still in the replay
   buffer (sidecar/layers/replay.py), there is time left and the retry budget has a retry
   to spend; after a full-jitter backoff, or the ``Retry-After`` the upstream asked for.

This module is the layer itself: the rate limit, the bulkhead and a shadow-mode policy's
verdict, then the attempts. A request that needed more than one clean try (or asked) is
explained (sidecar/layers/explainer.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import NamedTuple

import trio

from ..core import errors
from ..core.destination import Destination, Destinations, ShadowDestination
from ..core.errors import MeshError
from .attempts import Attempts, OnRetry, Sleep
from .base import Handler, Request, Response
from .bookkeeping import Bookkeeping
from .call import ATTEMPT_HEADER, DEADLINE_HEADER, read_call
from .explain import Explanations
from .explainer import Explainer
from .fallback import CircuitOpen, Discover
from .hedging import Hedging

# on_shadow(policy, destination, decision): the verdict of a shadow-mode DestinationPolicy
OnShadow = Callable[[str, str, str], None]


def resilience_layer(
    inner: Handler,
    destinations: Destinations,
    *,
    clock: Callable[[], float] = trio.current_time,
    sleep: Sleep = trio.sleep,
    rng: random.Random | None = None,
    on_retry: OnRetry | None = None,
    explanations: Explanations | None = None,
    timer: Callable[[], float] = time.perf_counter,
    on_shadow: OnShadow | None = None,
    discover: Discover | None = None,
) -> Handler:
    """``inner``: the forwarder. ``on_retry(service, outcome)``: a retry was made
    ("retried"), refused by the budget ("budget-exhausted") or a hedge sent ("hedged").
    ``clock``: for deadlines and windows (coarse will do); ``timer``: for latencies.
    ``discover`` looks up a fallback service this sidecar does not know yet."""
    report = on_retry or _ignore_retry
    book = Bookkeeping(clock, timer)
    explainer = Explainer(explanations or Explanations())
    hedging = Hedging(inner, book, clock, lambda service: report(service, "hedged"))
    attempts = Attempts(inner, book, hedging, explainer, clock, sleep, rng or random.Random(), report)
    attempts.circuit_open = CircuitOpen(destinations, explainer, clock, discover, attempts.run)
    layer = _Resilience(destinations, attempts, explainer, clock, timer, on_shadow or _ignore_shadow)
    return layer.handle


def _ignore_retry(_service: str, _outcome: str) -> None:
    pass


def _ignore_shadow(_policy: str, _destination: str, _decision: str) -> None:
    pass


class _Shadowed(NamedTuple):
    """A request a shadow-mode policy would have admitted: its breaker learns the real outcome."""

    destination: ShadowDestination
    permit: int
    sent: float  # the timer's


class _Resilience:
    """Admission (rate limit, bulkhead, a shadow policy's verdict), then the attempts."""

    def __init__(
        self,
        destinations: Destinations,
        attempts: Attempts,
        explainer: Explainer,
        clock: Callable[[], float],
        timer: Callable[[], float],
        on_shadow: OnShadow,
    ) -> None:
        self.destinations = destinations
        self.attempts = attempts
        self.explainer = explainer
        self.clock = clock
        self.timer = timer
        self.on_shadow = on_shadow
        self.waiting: dict[int, trio.lowlevel.ParkingLot] = {}  # id(destination) → requests waiting for a place

    async def handle(self, request: Request) -> Response:
        now = self.clock()
        rule_ref = request.rule.ref if request.rule is not None else None
        destination = self.destinations.get(request.service, rule_ref, now)
        call = read_call(request.head.headers)
        try:
            bucket = destination.bucket
            if bucket is not None and not bucket.take(now):
                wait = b"%d" % max(1, round(bucket.retry_after(now) + 0.5))
                raise MeshError(
                    errors.RATE_LIMITED,
                    f"over {bucket.rate:g} requests/s to {request.service}",
                    headers=((b"retry-after", wait),),
                )
            if destination.inflight >= destination.settings.max_inflight:
                await self._wait_for_a_place(destination, request)
        except MeshError as exc:
            raise self.explainer.failure(exc, destination, request, call, [], now) from None
        shadow = None
        if self.destinations.shadow:
            shadow = self._shadow(request, rule_ref, now)
        destination.inflight += 1
        try:
            response = await self.attempts.run(destination, request, call, now)
        except BaseException as exc:
            self._leave(destination)
            if shadow is not None:
                shadow.destination.inflight -= 1
                shadow.destination.breaker.record(self.clock(), shadow.permit, isinstance(exc, MeshError), 0.0)
            raise
        finish = response.on_finish
        if shadow is not None:
            shadow.destination.breaker.record(
                self.clock(), shadow.permit, response.status >= 500, self.timer() - shadow.sent
            )

        def finished(complete: bool) -> None:
            self._leave(destination)
            if shadow is not None:
                shadow.destination.inflight -= 1
            if finish is not None:
                finish(complete)

        response.on_finish = finished
        return response

    def _shadow(self, request: Request, rule: str | None, now: float) -> _Shadowed | None:
        """Judge the request by a shadow-mode DestinationPolicy, count the verdict; the
        state to feed its breaker with the real outcome (when it would have admitted it)."""
        shadow = self.destinations.shadow_for(request.service, rule, now)
        if shadow is None:
            return None
        decision, permit = shadow.judge(now)
        self.on_shadow(shadow.settings.name, request.service, decision)
        if permit is None:
            return None  # it would have refused this one: nothing to follow
        shadow.inflight += 1
        return _Shadowed(shadow, permit, self.timer())

    async def _wait_for_a_place(self, destination: Destination, request: Request) -> None:
        settings = destination.settings
        lot = self.waiting.get(id(destination))
        if lot is None:
            lot = self.waiting[id(destination)] = trio.lowlevel.ParkingLot()
        if len(lot) >= settings.max_pending:
            raise MeshError(
                errors.OVERLOADED,
                f"{settings.max_inflight} requests to {request.service} under way and {settings.max_pending} waiting",
            )
        while destination.inflight >= settings.max_inflight:
            await lot.park()

    def _leave(self, destination: Destination) -> None:
        destination.inflight -= 1
        waiting = self.waiting
        if waiting:  # some request waited for a place once: there may be one to wake
            lot = waiting.get(id(destination))
            if lot:
                lot.unpark()


__all__ = ["ATTEMPT_HEADER", "DEADLINE_HEADER", "resilience_layer"]
