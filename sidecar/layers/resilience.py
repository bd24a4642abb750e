"""Outbound: how one request to a destination is made — the mechanisms of PRODUCT §8 in
the order they act (sidecar/core/destination.py holds their settings and state):

1. the rate limit's token bucket (429 ``rate-limited``);
2. the bulkhead: at most ``max_inflight`` requests under way, ``max_pending`` more wait
   for a place, the rest get 503 ``overloaded`` at once;
3. attempts, while the overall timeout lasts (it covers them all). Each attempt asks the
   circuit breaker (an OPEN circuit answers 503 ``circuit-open`` or the fallback at
   once, without waiting for a timeout), picks an endpoint the outlier detector has not
   ejected, one not tried yet when there is one, with the balancer, and sends the
   request with ``x-meshlet-attempt`` and the time left in ``x-meshlet-deadline-ms``.
   Its :class:`~sidecar.core.outcome.Outcome` feeds the balancer, the detector and the
   breaker alike;
4. a retry follows when the outcome matches ``retry_on``, the method may be repeated,
   the body is still in the replay buffer (sidecar/layers/replay.py), there is time left
   and the retry budget has a retry to spend; after a full-jitter backoff, or the
   ``Retry-After`` the upstream asked for.

The answer of the last attempt is the caller's. An attempt given up is closed (never
reused), and its response never reaches the caller.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import trio

from ..core import errors
from ..core.destination import Destination, Destinations
from ..core.errors import MeshError, policy_response
from ..core.outcome import Outcome, error_outcome, retriable_method
from ..core.retry import backoff, parse_retry_after
from .base import Handler, Request, Response
from .replay import REPLAY_LIMIT, ReplayBuffer

ATTEMPT_HEADER = b"x-meshlet-attempt"
DEADLINE_HEADER = b"x-meshlet-deadline-ms"
_OURS = (ATTEMPT_HEADER, DEADLINE_HEADER)
_ATTEMPTS = tuple((ATTEMPT_HEADER, b"%d" % n) for n in range(12))

Sleep = Callable[[float], Any]


class Attempts:
    """What happened to one request's attempts, for ``explain`` and the metrics."""

    __slots__ = ("tries", "stopped")

    def __init__(self) -> None:
        self.tries: list[tuple[str, str, float]] = []  # (endpoint, outcome, seconds)
        self.stopped = ""  # why no further attempt was made


def resilience_layer(
    inner: Handler,
    destinations: Destinations,
    *,
    clock: Callable[[], float] = trio.current_time,
    sleep: Sleep = trio.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[str, str], None] | None = None,
) -> Handler:
    """``inner``: the forwarder. ``on_retry(service, outcome)``: a retry was made
    ("retried"), or refused by the budget ("budget-exhausted")."""
    rng = rng or random.Random()
    waiting: dict[int, trio.lowlevel.ParkingLot] = {}  # id(destination) → requests waiting for a place

    async def handle(request: Request) -> Response:
        now = clock()
        rule = request.rule
        rule_ref = rule.ref if rule is not None else None
        destination = destinations.get(request.service, rule_ref, now)
        settings = destination.settings
        bucket = destination.bucket
        if bucket is not None and not bucket.take(now):
            wait = b"%d" % max(1, round(bucket.retry_after(now) + 0.5))
            raise MeshError(
                errors.RATE_LIMITED,
                f"over {settings.rate_limit[0]:g} requests/s to {request.service}",  # type: ignore[index]
                headers=((b"retry-after", wait),),
            )
        if destination.inflight >= settings.max_inflight:
            lot = waiting.get(id(destination))
            if lot is None:
                lot = waiting[id(destination)] = trio.lowlevel.ParkingLot()
            if len(lot) >= settings.max_pending:
                raise MeshError(
                    errors.OVERLOADED,
                    f"{settings.max_inflight} requests to {request.service} under way and {settings.max_pending} waiting",
                )
            while destination.inflight >= settings.max_inflight:
                await lot.park()
        destination.inflight += 1
        try:
            response = await _attempts(inner, destination, request, now, clock, sleep, rng, on_retry)
        except BaseException:
            _leave(destination, waiting)
            raise
        finish = response.on_finish

        def finished(complete: bool) -> None:
            _leave(destination, waiting)
            if finish is not None:
                finish(complete)

        response.on_finish = finished
        return response

    return handle


def _leave(destination: Destination, waiting: dict[int, trio.lowlevel.ParkingLot]) -> None:
    destination.inflight -= 1
    lot = waiting.get(id(destination))
    if lot:
        lot.unpark()


async def _attempts(
    inner: Handler,
    destination: Destination,
    request: Request,
    start: float,
    clock: Callable[[], float],
    sleep: Sleep,
    rng: random.Random,
    on_retry: Callable[[str, str], None] | None,
) -> Response:
    settings = destination.settings
    head = request.head
    timeout = request.timeout
    rule = request.rule
    if settings.timeout is not None and (rule is None or rule.rule.timeout is None):
        timeout = settings.timeout
    if settings.connect_timeout is not None:
        request.connect_timeout = settings.connect_timeout
    given = _take_our_headers(head.headers)
    if given is not None:  # the app passed on the deadline it was given: keep to it
        timeout = min(timeout, given)
    deadline = start + timeout
    request.deadline = deadline
    may_retry = settings.attempts > 0 and retriable_method(head.method, settings.non_idempotent)
    replay: ReplayBuffer | None = None
    if may_retry and request.body is not None:
        replay = ReplayBuffer(request.body, REPLAY_LIMIT)
    balancer = destination.balancer(request.subset)
    breaker = destination.breaker
    outlier = destination.outlier
    destination.budget.record_request(start)
    tried: list[Any] = []
    attempt = 0
    while True:
        attempt += 1
        now = clock()
        permit = breaker.admit(now)
        if permit is None:  # open, or opened by the attempts before this one
            return _circuit_open(destination, request, now)
        endpoint = _pick(destination, balancer, tried, now)
        if endpoint is None:
            breaker.release(permit)
            which = f" in subset {dict(request.subset)}" if request.subset else ""
            raise MeshError(errors.NO_HEALTHY_ENDPOINTS, f"service {request.service!r} has no endpoint{which}")
        tried.append(endpoint)
        request.endpoint = endpoint
        left = deadline - now
        per_try = settings.per_try_timeout
        request.timeout = left if per_try is None or per_try > left else per_try
        headers = head.headers
        if attempt > 1:
            del headers[-2:]  # this attempt's own values replace the previous attempt's
        headers.append(_ATTEMPTS[attempt] if attempt < len(_ATTEMPTS) else (ATTEMPT_HEADER, b"%d" % attempt))
        headers.append((DEADLINE_HEADER, b"%d" % max(1, int(left * 1000))))
        if replay is not None:
            request.body = replay.cursor()
        balancer.started(endpoint)
        outlier.started(endpoint, now)
        sent = time.perf_counter()
        last: Response | None = None
        failure: MeshError | None = None
        try:
            response = await inner(request)
        except MeshError as exc:
            failure = exc
            outcome = error_outcome(exc)
        except BaseException:
            balancer.finished(endpoint, time.perf_counter() - sent, clock(), False)
            outlier.release(endpoint)
            breaker.release(permit)
            raise
        else:
            took = time.perf_counter() - sent
            if response.status < 400:  # the common case, short
                now = clock()
                balancer.finished(endpoint, took, now, False)
                outlier.record(endpoint, now, False)
                breaker.record(now, permit, False, took)
                return response
            last = response
            outcome = Outcome(response.status, response.mesh_error)
        took = time.perf_counter() - sent
        now = clock()
        failed = outcome.failed
        balancer.finished(endpoint, took, now, failed)
        outlier.record(endpoint, now, failed)
        breaker.record(now, permit, failed, took)
        if not failed and not outcome.status >= 400:
            break
        # Another attempt?
        if attempt > settings.attempts or not may_retry:
            break
        per_try_timeout = outcome.local and outcome.reason == errors.TIMEOUT.name and now < deadline
        if not settings.retry_on.matches(outcome, per_try_timeout=per_try_timeout):
            break
        if replay is not None and replay.overflow:
            break  # the body no longer fits in the replay buffer: never sent twice
        delay = backoff(attempt, settings.backoff_base, settings.backoff_max, rng)
        if last is not None:
            asked = _retry_after(last)
            if asked is not None:
                delay = asked
        if now + delay >= deadline:
            break
        if not destination.budget.try_spend(now):
            if on_retry is not None:
                on_retry(request.service, "budget-exhausted")
            break
        if on_retry is not None:
            on_retry(request.service, "retried")
        if last is not None:
            last.finish(False)  # given up: its connection is closed, never reused
        await sleep(delay)
    if failure is not None:
        raise failure
    assert last is not None
    return last


def _pick(destination: Destination, balancer: Any, tried: list[Any], now: float) -> Any:
    """An endpoint not ejected and not tried yet; else one not ejected; else any (panic)."""
    available, _panic = destination.outlier.available(now)
    if len(available) == len(destination.endpoints):
        if not tried:
            return balancer.pick()
        return balancer.pick(frozenset(tried)) or balancer.pick()
    out = set(destination.endpoints).difference(available)
    return balancer.pick(out.union(tried)) or balancer.pick(out) or balancer.pick()


def _circuit_open(destination: Destination, request: Request, now: float) -> Response:
    fallback = destination.settings.fallback
    if fallback is not None and fallback.status is not None:
        response = Response(fallback.status, b"", [])
        headers = [*fallback.headers, (b"x-meshlet-fallback", b"circuit-open")]
        response.raw = policy_response(fallback.status, headers, fallback.body)
        return response
    wait = destination.breaker.retry_after(now)
    raise MeshError(
        errors.CIRCUIT_OPEN,
        f"the circuit to {request.service} is open (too many failures); next trial in {wait:.1f}s",
    )


def _take_our_headers(headers: list[tuple[bytes, bytes]]) -> float | None:
    """Remove attempt and deadline headers the app sent; the deadline it passed on (s)."""
    given: float | None = None
    for i in range(len(headers) - 1, -1, -1):
        name = headers[i][0]
        if len(name) in (17, 21) and name.lower() in _OURS:
            if name.lower() == DEADLINE_HEADER:
                value = headers[i][1]
                if value.isdigit() and len(value) < 10:
                    given = int(value) / 1000
            del headers[i]
    return given


def _retry_after(response: Response) -> float | None:
    for name, value in response.headers:
        if len(name) == 11 and name.lower() == b"retry-after":
            return parse_retry_after(value, time.time())
    return None


__all__ = ["ATTEMPT_HEADER", "DEADLINE_HEADER", "resilience_layer"]
