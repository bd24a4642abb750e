"""Outbound: how one request to a destination is made — the mechanisms of docs/policy.md in
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
reused), and its response never reaches the caller. A request that needed more than one
clean try (or asked) is explained (sidecar/layers/explain.py).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshlet.headers import ATTEMPT_HEADER, DEADLINE_HEADER, FALLBACK_HEADER

from ..core import errors
from ..core.destination import Destination, Destinations
from ..core.errors import MeshError, policy_response
from ..core.outcome import Outcome, error_outcome, retriable_method
from ..core.retry import backoff, parse_retry_after
from .base import Handler, Request, Response
from .explain import EXPLAIN_HEADER, ID_RESPONSE_HEADER, REQUEST_ID_HEADER, Explanations, now_wall, summary
from .replay import ReplayBuffer

_ATTEMPTS = tuple((ATTEMPT_HEADER, b"%d" % n) for n in range(12))

Sleep = Callable[[float], Any]


class _Asked:
    """What the request's own headers asked of us (read once, in one pass)."""

    __slots__ = ("deadline", "explain", "request_id", "timeout", "fell_back", "replay")

    def __init__(self) -> None:
        self.replay: ReplayBuffer | None = None  # the body kept for another attempt
        self.fell_back = False  # the request went to a fallback service already
        self.deadline: float | None = None  # the app passed on the deadline it was given
        self.timeout: float | None = None  # the overall timeout, once worked out
        self.explain = False
        self.request_id: str | None = None


def resilience_layer(
    inner: Handler,
    destinations: Destinations,
    *,
    clock: Callable[[], float] = trio.current_time,
    sleep: Sleep = trio.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[str, str], None] | None = None,
    explanations: Explanations | None = None,
    timer: Callable[[], float] = time.perf_counter,
    on_shadow: Callable[[str, str, str], None] | None = None,
    discover: Callable[[str], Awaitable[Any]] | None = None,
) -> Handler:
    """``inner``: the forwarder. ``on_retry(service, outcome)``: a retry was made
    ("retried"), refused by the budget ("budget-exhausted") or a hedge sent ("hedged").
    ``clock``: for deadlines and windows (coarse will do); ``timer``: for latencies."""
    layer = _Resilience(inner, destinations, clock, sleep, rng or random.Random(), on_retry, explanations)
    layer.timer = timer
    layer.discover = discover  # looks up a fallback service this sidecar does not know yet
    if on_shadow is not None:
        layer.on_shadow = on_shadow  # (policy, destination, decision) of a shadow-mode DestinationPolicy
    return layer.handle


class _Resilience:
    def __init__(
        self,
        inner: Handler,
        destinations: Destinations,
        clock: Callable[[], float],
        sleep: Sleep,
        rng: random.Random,
        on_retry: Callable[[str, str], None] | None,
        explanations: Explanations | None,
    ) -> None:
        self.inner = inner
        self.destinations = destinations
        self.clock = clock
        self.sleep = sleep
        self.rng = rng
        self.on_retry = on_retry or (lambda _service, _outcome: None)
        self.explanations = explanations or Explanations()
        self.waiting: dict[int, trio.lowlevel.ParkingLot] = {}  # id(destination) → requests waiting for a place
        self.timer: Callable[[], float] = time.perf_counter
        self.discover: Callable[[str], Awaitable[Any]] | None = None
        self.on_shadow: Callable[[str, str, str], None] = lambda _policy, _destination, _decision: None

    async def handle(self, request: Request) -> Response:
        now = self.clock()
        rule_ref = request.rule.ref if request.rule is not None else None
        destination = self.destinations.get(request.service, rule_ref, now)
        settings = destination.settings
        asked = _read_our_headers(request.head.headers)
        try:
            bucket = destination.bucket
            if bucket is not None and not bucket.take(now):
                wait = b"%d" % max(1, round(bucket.retry_after(now) + 0.5))
                raise MeshError(
                    errors.RATE_LIMITED,
                    f"over {settings.rate_limit[0]:g} requests/s to {request.service}",  # type: ignore[index]
                    headers=((b"retry-after", wait),),
                )
            if destination.inflight >= settings.max_inflight:
                await self._wait_for_a_place(destination, request)
        except MeshError as exc:
            raise self._explained_error(exc, destination, request, asked, [], exc.reason.name, now) from None
        shadow = None
        if self.destinations.shadow:
            shadow = self._shadow(request, rule_ref, now)
        destination.inflight += 1
        try:
            response = await self._attempts(destination, request, asked, now)
        except BaseException as exc:
            self._leave(destination)
            if shadow is not None:
                shadow[0].inflight -= 1
                shadow[0].breaker.record(self.clock(), shadow[1], isinstance(exc, MeshError), 0.0)
            raise
        finish = response.on_finish
        if shadow is not None:
            shadow[0].breaker.record(self.clock(), shadow[1], response.status >= 500, self.timer() - shadow[2])

        def finished(complete: bool) -> None:
            self._leave(destination)
            if shadow is not None:
                shadow[0].inflight -= 1
            if finish is not None:
                finish(complete)

        response.on_finish = finished
        return response

    def _shadow(self, request: Request, rule: str | None, now: float) -> tuple[Any, int, float] | None:
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
        return shadow, permit, self.timer()

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
        lot = self.waiting.get(id(destination))
        if lot:
            lot.unpark()

    async def _attempts(self, destination: Destination, request: Request, asked: _Asked, start: float) -> Response:
        settings = destination.settings
        clock = self.clock
        head = request.head
        timeout = request.timeout
        rule = request.rule
        if settings.timeout is not None and (rule is None or rule.rule.timeout is None):
            timeout = settings.timeout
        if settings.connect_timeout is not None:
            request.connect_timeout = settings.connect_timeout
        if asked.deadline is not None and asked.deadline < timeout:
            timeout = asked.deadline
        asked.timeout = timeout
        deadline = start + timeout
        request.deadline = deadline
        may_retry = settings.attempts > 0 and retriable_method(head.method, settings.non_idempotent)
        replay: ReplayBuffer | None = None
        if may_retry and request.body is not None:
            replay = asked.replay = ReplayBuffer(request.body, settings.replay_limit)
        balancer = destination.balancer(request.subset)
        breaker = destination.breaker
        outlier = destination.outlier
        destination.budget.record_request(start)
        tried: list[Any] = []
        tries: list[dict[str, Any]] = []  # for the explanation, filled once there is one to give
        attempt = 0
        while True:
            attempt += 1
            now = clock()
            permit = breaker.admit(now)
            if permit is None:  # open, or opened by the attempts before this one
                return await self._circuit_open(destination, request, asked, tries, now)
            endpoint = _pick(destination, balancer, tried, now)
            if endpoint is None:
                breaker.release(permit)
                which = f" in subset {dict(request.subset)}" if request.subset else ""
                failure = MeshError(errors.NO_HEALTHY_ENDPOINTS, f"service {request.service!r} has no endpoint{which}")
                raise self._explained_error(failure, destination, request, asked, tries, failure.reason.name, now)
            tried.append(endpoint)
            request.endpoint = endpoint
            request.attempt = attempt
            left = deadline - now
            per_try = settings.per_try_timeout
            request.timeout = left if per_try is None or per_try > left else per_try
            headers = head.headers
            if attempt > 1:  # this attempt's own values replace the previous attempt's
                headers[:] = [h for h in headers if h[0] is not ATTEMPT_HEADER and h[0] is not DEADLINE_HEADER]
            headers.append(_ATTEMPTS[attempt] if attempt < len(_ATTEMPTS) else (ATTEMPT_HEADER, b"%d" % attempt))
            headers.append((DEADLINE_HEADER, b"%d" % max(1, int(left * 1000))))
            if replay is not None:
                request.body = replay.cursor()
            last: Response | None = None
            failure: MeshError | None = None
            hedge_after = None
            if settings.hedge_delay is not None and attempt == 1 and may_retry and request.body is None:
                hedge_after = self._hedge_after(destination)
            if hedge_after is not None:
                last, failure, outcome, took, endpoint = await self._race(
                    destination, balancer, request, endpoint, tried, hedge_after, tries
                )
                now = clock()
                if last is not None and not outcome.failed:
                    destination.latencies.add(took)
                breaker.record(now, permit, outcome.failed, took)
            else:
                balancer.started(endpoint)
                outlier.started(endpoint, now)
                sent = self.timer()
                try:
                    response = await self.inner(request)
                except MeshError as exc:
                    failure = exc
                    outcome = error_outcome(exc)
                except BaseException:
                    balancer.finished(endpoint, self.timer() - sent, clock(), False)
                    outlier.release(endpoint)
                    breaker.release(permit)
                    raise
                else:
                    took = self.timer() - sent
                    if response.status < 400 and attempt == 1 and not asked.explain:  # the common case, short
                        now = clock()
                        balancer.finished(endpoint, took, now, False)
                        outlier.record(endpoint, now, False)
                        breaker.record(now, permit, False, took)
                        if settings.hedge_delay is not None:
                            destination.latencies.add(took)
                        return response
                    last = response
                    outcome = Outcome(response.status, response.mesh_error)
                took = self.timer() - sent
                now = clock()
                failed = outcome.failed
                balancer.finished(endpoint, took, now, failed)
                outlier.record(endpoint, now, failed)
                breaker.record(now, permit, failed, took)
            tries.append({"endpoint": endpoint.address, "outcome": outcome.name, "ms": round(took * 1000, 2)})
            stopped = self._another(destination, request, outcome, last, replay, attempt, may_retry, deadline, now)
            if isinstance(stopped, str):
                break
            if last is not None:
                last.finish(False)  # given up: its connection is closed, never reused
            await self.sleep(stopped)
        timeout_fired = ""
        if outcome.local and outcome.reason == errors.TIMEOUT.name:
            timeout_fired = "overall" if now >= deadline - 0.001 or per_try is None else "per-try"
        explanation = self._explain(destination, request, asked, tries, stopped, now, timeout_fired)
        if failure is not None:
            raise _with_id(failure, explanation, asked.explain)
        assert last is not None
        _tag(last, explanation, asked.explain)
        return last

    def _hedge_after(self, destination: Destination) -> float | None:
        """How long the first attempt may take before a second one joins it."""
        settings = destination.settings
        delay = settings.hedge_delay
        if isinstance(delay, str):
            observed = destination.latencies.percentile(delay)
            if observed is None:
                return None  # too few samples yet to know what slow is
            delay = observed
        return max(delay, settings.hedge_min_delay)  # type: ignore[type-var]

    async def _race(
        self,
        destination: Destination,
        balancer: Any,
        request: Request,
        endpoint: Any,
        tried: list[Any],
        hedge_after: float,
        tries: list[dict[str, Any]],
    ) -> tuple[Response | None, MeshError | None, Outcome, float, Any]:
        """Hedging: the first attempt, and after ``hedge_after`` without an answer a second
        one to another endpoint (if the retry budget has one to spend); the first good
        answer wins, the other attempt is cancelled (its connection closed). Returns the
        winner: (response, failure, outcome, seconds, endpoint)."""
        clock = self.clock
        outlier = destination.outlier
        results: list[tuple[Response | None, MeshError | None, Outcome, float, Any]] = []
        running = 0

        async def attempt(req: Request, target: Any, scope: trio.CancelScope) -> None:
            nonlocal running
            running += 1
            balancer.started(target)
            outlier.started(target, clock())
            sent = self.timer()
            done = False
            try:
                try:
                    response: Response | None = await self.inner(req)
                    failure = None
                    outcome = Outcome(response.status, response.mesh_error)  # type: ignore[union-attr]
                except MeshError as exc:
                    response, failure, outcome = None, exc, error_outcome(exc)
                took = self.timer() - sent
                now = clock()
                balancer.finished(target, took, now, outcome.failed)
                outlier.record(target, now, outcome.failed)
                done = True
                results.append((response, failure, outcome, took, target))
                if not outcome.failed or running == len(results):
                    scope.cancel()  # a good answer (or the last one): the race is over
            finally:
                if not done:  # cancelled: it lost; the time it took is a lower bound of its latency
                    balancer.finished(target, self.timer() - sent, clock(), False)
                    outlier.release(target)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, request, endpoint, nursery.cancel_scope)
            await trio.sleep(hedge_after)
            now = clock()
            second = _pick(destination, balancer, tried, now)
            if second is not None and second != endpoint and destination.budget.try_spend(now):
                self.on_retry(request.service, "hedged")
                tried.append(second)
                nursery.start_soon(attempt, _copy_for(request, second), second, nursery.cancel_scope)
            else:
                await trio.sleep_forever()  # no hedge: wait for the first attempt
        winner = next((r for r in results if not r[2].failed), results[-1])
        for response, _, outcome, took, target in results:
            if response is not None and response is not winner[0]:
                response.finish(False)  # the loser's answer: dropped, its connection closed
            if target is not winner[4]:
                tries.append(
                    {
                        "endpoint": target.address,
                        "outcome": f"{outcome.name} (lost the race)",
                        "ms": round(took * 1000, 2),
                    }
                )
        return winner

    def _another(
        self,
        destination: Destination,
        request: Request,
        outcome: Outcome,
        last: Response | None,
        replay: ReplayBuffer | None,
        attempt: int,
        may_retry: bool,
        deadline: float,
        now: float,
    ) -> float | str:
        """The delay before another attempt, or why there is none."""
        settings = destination.settings
        if not outcome.failed and outcome.status < 400:
            return "success"
        if not may_retry:
            return "method not retried" if settings.attempts else "retries off"
        if attempt > settings.attempts:
            return f"{settings.attempts} retries made"
        per_try_timeout = outcome.local and outcome.reason == errors.TIMEOUT.name and now < deadline
        if not settings.retry_on.matches(outcome, per_try_timeout=per_try_timeout):
            return f"{outcome.name} is not a retry condition"
        if replay is not None and replay.overflow:
            return f"body over the {settings.replay_limit} bytes of the replay buffer"  # never sent twice
        delay = backoff(attempt, settings.backoff_base, settings.backoff_max, self.rng)
        if last is not None:
            asked = _retry_after(last)
            if asked is not None:
                delay = asked
        if now + delay >= deadline:
            return "no time left for another attempt"
        if not destination.budget.try_spend(now):
            self.on_retry(request.service, "budget-exhausted")
            return "retry budget exhausted"
        self.on_retry(request.service, "retried")
        return delay

    async def _circuit_open(
        self, destination: Destination, request: Request, asked: _Asked, tries: list[dict[str, Any]], now: float
    ) -> Response:
        explanation = self._explain(destination, request, asked, tries, "circuit-open", now, "")
        fallback = destination.settings.fallback
        if fallback is not None and fallback.status is not None:
            response = Response(fallback.status, b"", [])
            headers = [
                *fallback.headers,
                (FALLBACK_HEADER, b"circuit-open"),
                *_id_headers(explanation, asked.explain),
            ]
            response.raw = policy_response(fallback.status, headers, fallback.body)
            return response
        if fallback is not None and fallback.service is not None and not asked.fell_back:
            return await self._fall_back(fallback.service, request, asked)
        wait = destination.breaker.retry_after(now)
        failure = MeshError(
            errors.CIRCUIT_OPEN,
            f"the circuit to {request.service} is open (too many failures); next trial in {wait:.1f}s",
        )
        raise _with_id(failure, explanation, asked.explain)

    async def _fall_back(self, service: str, request: Request, asked: _Asked) -> Response:
        """An open circuit's fallback service: the request goes there instead (once: a
        fallback's own fallback is not followed)."""
        asked.fell_back = True
        if asked.replay is not None:  # attempts read some of the body: the fallback gets it whole
            cursor = asked.replay.cursor()
            if cursor is None:
                raise MeshError(errors.CIRCUIT_OPEN, f"the circuit is open and the body is too large for {service}")
            request.body = cursor
        if service not in self.destinations.services and self.discover is not None:
            try:
                await self.discover(service)  # a fallback the app never called: look it up
            except MeshError:
                pass  # then it has no endpoint: 503 below, explained
        request.service = service
        request.subset = ()
        request.rule = None
        request.authority = service.encode()
        now = self.clock()
        response = await self._attempts(self.destinations.get(service, None, now), request, asked, now)
        if response.raw is None:
            response.headers.append((FALLBACK_HEADER, b"circuit-open"))
        return response

    def _explained_error(
        self,
        failure: MeshError,
        destination: Destination,
        request: Request,
        asked: _Asked,
        tries: list[dict[str, Any]],
        stopped: str,
        now: float,
    ) -> MeshError:
        explanation = self._explain(destination, request, asked, tries, stopped, now, "")
        return _with_id(failure, explanation, asked.explain)

    def _explain(
        self,
        destination: Destination,
        request: Request,
        asked: _Asked,
        tries: list[dict[str, Any]],
        stopped: str,
        now: float,
        timeout_fired: str,
    ) -> dict[str, Any]:
        settings = destination.settings
        explanations = self.explanations
        explanation = {
            "request_id": asked.request_id or explanations.new_id(),
            "at": now_wall(),
            "service": request.service,
            "method": request.head.method.decode("ascii", "replace"),
            "target": request.target.decode("latin-1"),
            "route": request.rule.ref if request.rule is not None else None,
            "subset": dict(request.subset),
            "policy": settings.name or "defaults",
            "load_balancer": settings.load_balancer,
            "candidates": [
                {"endpoint": address, "score": round(score, 6)}
                for address, score in destination.balancer(request.subset).scores(now)
            ],
            "outliers": [e for e in destination.outlier.snapshot(now) if e["state"] != "healthy"],
            "circuit": destination.breaker.snapshot(now),
            "budget": destination.budget.snapshot(now),
            "attempts": tries,
            "stopped": stopped if stopped != "success" else "",
            "result": tries[-1]["outcome"] if tries else stopped,
            "timeout": {
                "overall": asked.timeout if asked.timeout is not None else request.timeout,
                "per_try": settings.per_try_timeout,
                "fired": timeout_fired,
            },
        }
        explanations.add(explanation)
        return explanation


def _id_headers(explanation: dict[str, Any], explain: bool) -> list[tuple[bytes, bytes]]:
    """The request id for the response, and the one-line summary if it was asked for."""
    out = [(ID_RESPONSE_HEADER, explanation["request_id"].encode("latin-1", "replace"))]
    if explain:
        out.append((EXPLAIN_HEADER, summary(explanation)))
    return out


def _with_id(failure: MeshError, explanation: dict[str, Any], explain: bool) -> MeshError:
    failure.headers = (*failure.headers, *_id_headers(explanation, explain))
    return failure


def _tag(response: Response, explanation: dict[str, Any], explain: bool) -> None:
    if response.raw is None:
        response.headers.extend(_id_headers(explanation, explain))


def _copy_for(request: Request, endpoint: Any) -> Request:
    """The same request for a hedged attempt: its own head (its own attempt header)."""
    headers = [h for h in request.head.headers if h[0] is not ATTEMPT_HEADER]
    headers.append(_ATTEMPTS[2])
    head = dataclasses.replace(request.head, headers=headers)
    copy = Request(head, None, request.peer_ip)
    copy.attempt = 2
    copy.trace = request.trace
    for name in (
        "service",
        "target",
        "authority",
        "nursery",
        "source",
        "connect_timeout",
        "timeout",
        "rule",
        "subset",
        "deadline",
    ):
        setattr(copy, name, getattr(request, name))
    copy.direction = request.direction
    copy.endpoint = endpoint
    return copy


def _pick(destination: Destination, balancer: Any, tried: list[Any], now: float) -> Any:
    """An endpoint not ejected and not tried yet; else one not ejected; else any (panic)."""
    available, _panic = destination.outlier.available(now)
    if len(available) == len(destination.endpoints):
        if not tried:
            return balancer.pick()
        return balancer.pick(frozenset(tried)) or balancer.pick()
    out = set(destination.endpoints).difference(available)
    return balancer.pick(out.union(tried)) or balancer.pick(out) or balancer.pick()


def _read_our_headers(headers: list[tuple[bytes, bytes]]) -> _Asked:
    """Take off the attempt and deadline headers the app sent (ours replace them), keeping
    the deadline it passed on; see whether it asks for an explanation, and its request id."""
    asked = _Asked()
    for i in range(len(headers) - 1, -1, -1):
        name = headers[i][0]
        size = len(name)
        if size == 17 or size == 21 or size == 12:
            lowered = name.lower()
            if lowered == DEADLINE_HEADER:
                value = headers[i][1]
                if value.isdigit() and len(value) < 10:
                    asked.deadline = int(value) / 1000
                del headers[i]
            elif lowered == ATTEMPT_HEADER:
                del headers[i]
            elif lowered == EXPLAIN_HEADER:
                asked.explain = True
                del headers[i]
            elif lowered == REQUEST_ID_HEADER:
                asked.request_id = headers[i][1][:128].decode("latin-1")
    return asked


def _retry_after(response: Response) -> float | None:
    for name, value in response.headers:
        if len(name) == 11 and name.lower() == b"retry-after":
            return parse_retry_after(value, time.time())
    return None


__all__ = ["ATTEMPT_HEADER", "DEADLINE_HEADER", "resilience_layer"]
