"""The attempts of one call to a destination, while its overall timeout lasts (it covers
them all). Each attempt asks the circuit breaker (an OPEN circuit: sidecar/layers/fallback.py),
picks an endpoint the outlier detector has not ejected, one not tried yet when there is
one (sidecar/core/attempts.py), and sends the request with ``x-meshlet-attempt`` and the
time left in ``x-meshlet-deadline-ms``; a first attempt may be hedged
(sidecar/layers/hedging.py). Its :class:`~sidecar.layers.bookkeeping.Attempt` feeds the
balancer, the detector, the breaker and the retry decision alike; another attempt follows
when :func:`~sidecar.core.attempts.decide` says so, after its delay.

The answer of the last attempt is the caller's. An attempt given up is closed (never
reused), and its response never reaches the caller. A call that needed more than one
clean try (or asked) is explained (sidecar/layers/explainer.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

from ..core.attempts import BUDGET_EXHAUSTED, Decision, Retry, Stop, decide, hedge_delay, pick, timeout_fired
from ..core.destination import Destination
from ..core.errors import NO_HEALTHY_ENDPOINTS, MeshError
from ..core.outcome import retriable_method
from ..core.retry import parse_retry_after
from ..core.services import Endpoint
from .base import Handler, Request, Response
from .bookkeeping import Attempt, Bookkeeping
from .call import ATTEMPT_HEADER, DEADLINE_HEADER, Call
from .explainer import Explainer, Row, attempt_row, tag, with_id
from .fallback import CircuitOpen
from .grpc import cap, pass_on
from .hedging import Hedging
from .replay import ReplayBuffer

Sleep = Callable[[float], Awaitable[object]]
# on_retry(service, what): "retried", or "budget-exhausted" (a retry the budget refused)
OnRetry = Callable[[str, str], None]

_ATTEMPTS = tuple((ATTEMPT_HEADER, b"%d" % n) for n in range(12))  # made once: the header of attempt n
_LOST = " (lost the race)"


class Attempts:
    """``run`` makes a call's attempts; ``circuit_open`` answers when the breaker refuses one."""

    __slots__ = ("inner", "book", "hedging", "circuit_open", "explainer", "clock", "sleep", "rng", "on_retry")

    def __init__(
        self,
        inner: Handler,
        book: Bookkeeping,
        hedging: Hedging,
        explainer: Explainer,
        clock: Callable[[], float],
        sleep: Sleep,
        rng: random.Random,
        on_retry: OnRetry,
    ) -> None:
        self.inner = inner
        self.book = book
        self.hedging = hedging
        self.explainer = explainer
        self.clock = clock
        self.sleep = sleep
        self.rng = rng
        self.on_retry = on_retry
        self.circuit_open: CircuitOpen | None = None  # set once built: it runs attempts too

    async def run(self, destination: Destination, request: Request, call: Call, start: float) -> Response:
        """The answer of the call's last attempt (or what an open circuit answers).

        One frame for the whole loop, on purpose: a clean first try, the common request,
        runs here with no coroutine but the forwarder's and few calls; what only other
        requests need (the decision, the explanation, an open circuit) is elsewhere."""
        settings = destination.settings
        clock, book, breaker, outlier = self.clock, self.book, destination.breaker, destination.outlier
        head = request.head
        # The overall timeout: the policy's unless the Route rule set one, capped by the
        # deadline the app passed on.
        timeout = request.timeout
        rule = request.rule
        if settings.timeout is not None and (rule is None or rule.rule.timeout is None):
            timeout = settings.timeout
        if settings.connect_timeout is not None:
            request.connect_timeout = settings.connect_timeout
        if call.deadline is not None and call.deadline < timeout:
            timeout = call.deadline
        grpc = request.grpc
        if grpc is not None:  # its grpc-timeout too (MeshError if it has passed)
            timeout = cap(grpc, timeout)
        call.timeout = timeout
        deadline = request.deadline = start + timeout
        may_retry = settings.attempts > 0 and retriable_method(head.method, settings.non_idempotent)
        replay: ReplayBuffer | None = None
        if may_retry and request.body is not None:
            replay = call.replay = ReplayBuffer(request.body, settings.replay_limit)
        balancer = destination.balancer(request.subset)
        destination.budget.record_request(start)
        per_try = settings.per_try_timeout
        tried: list[Endpoint] = []
        rows: list[Row] = []  # for the explanation, filled once there is one to give
        attempt = 0
        while True:
            attempt += 1
            now = clock()
            permit = breaker.admit(now)
            if permit is None:  # open, or opened by the attempts before this one
                assert self.circuit_open is not None
                return await self.circuit_open.answer(destination, request, call, rows, now)
            endpoint = pick(destination, balancer, tried, now)
            if endpoint is None:
                breaker.release(permit)
                raise self._no_endpoint(destination, request, call, rows, now)
            tried.append(endpoint)
            request.endpoint = endpoint
            request.attempt = attempt
            left = deadline - now
            request.timeout = left if per_try is None or per_try > left else per_try
            headers = head.headers
            if attempt > 1:  # this attempt's own values replace the previous attempt's
                headers[:] = [h for h in headers if h[0] is not ATTEMPT_HEADER and h[0] is not DEADLINE_HEADER]
            headers.append(_ATTEMPTS[attempt] if attempt < len(_ATTEMPTS) else (ATTEMPT_HEADER, b"%d" % attempt))
            headers.append((DEADLINE_HEADER, b"%d" % max(1, int(left * 1000))))
            if grpc is not None:
                pass_on(grpc, headers, request.timeout)
            if replay is not None:
                request.body = replay.cursor()
            hedge_after = None
            if (
                settings.hedge_delay is not None
                and attempt == 1
                and may_retry
                and request.body is None
                and grpc is None  # a gRPC answer is judged by its status (Bookkeeping.end_grpc)
            ):
                hedge_after = hedge_delay(destination)
            hedged = False
            try:
                if hedge_after is None:
                    sent = book.start(balancer, outlier, endpoint, now)
                    try:
                        response = await self.inner(request)
                    except MeshError as exc:
                        last = book.end(balancer, outlier, endpoint, sent, exc)
                    except BaseException:
                        book.abandon(balancer, outlier, endpoint, sent)
                        raise
                    else:
                        if grpc is None:
                            last = book.end(balancer, outlier, endpoint, sent, response)
                        else:
                            last = book.end_grpc(balancer, outlier, endpoint, sent, response)
                    now = last.ended
                else:
                    race = await self.hedging.race(destination, balancer, request, endpoint, tried, hedge_after)
                    rows.extend(attempt_row(loser, _LOST) for loser in race.losers)
                    last, hedged = race.winner, race.hedged
                    now = clock()
            except BaseException:  # no answer to record: a HALF_OPEN trial slot is free again
                breaker.release(permit)
                raise
            if grpc is None or last.response is None or last.outcome.grpc is not None:
                breaker.record(now, permit, last.failed, last.elapsed)
            else:  # a gRPC status in the trailers: judged when the exchange is over
                book.judge_at_finish(last, outlier, breaker, permit)
            answer = last.response
            if settings.hedge_delay is not None and attempt == 1 and answer is not None and not last.failed:
                destination.latencies.add(last.elapsed)  # what "slow" is, for hedging
            if (
                answer is not None
                and answer.status < 400
                and attempt == 1
                and not (call.explain or hedged)
                and (grpc is None or not last.outcome.grpc)
            ):
                return answer  # the common case: a clean first try, nothing to explain
            rows.append(attempt_row(last))
            decision = self._decide(destination, request.service, last, attempt, may_retry, replay, deadline, now)
            if isinstance(decision, Stop):
                return self._last(destination, request, call, rows, last, decision.reason, now, deadline)
            if answer is not None:
                answer.finish(False)  # given up: its connection is closed, never reused
            await self.sleep(decision.delay)

    def _decide(
        self,
        destination: Destination,
        service: str,
        last: Attempt,
        attempt: int,
        may_retry: bool,
        replay: ReplayBuffer | None,
        deadline: float,
        now: float,
    ) -> Decision:
        """Another attempt after ``last``, or why not (sidecar/core/attempts.py); counted."""
        answer = last.response
        # A Retry-After counts only on an answer that may be retried (a 4xx or 5xx).
        retry_after = _retry_after(answer) if answer is not None and answer.status >= 400 else None
        decision = decide(
            destination.settings,
            last.outcome,
            attempt,
            may_retry=may_retry,
            replay_overflow=replay is not None and replay.overflow,
            retry_after=retry_after,
            deadline=deadline,
            now=now,
            budget=destination.budget,
            rng=self.rng,
        )
        if isinstance(decision, Retry):
            self.on_retry(service, "retried")
        elif decision == BUDGET_EXHAUSTED:
            self.on_retry(service, "budget-exhausted")
        return decision

    def _last(
        self,
        destination: Destination,
        request: Request,
        call: Call,
        rows: list[Row],
        last: Attempt,
        stopped: str,
        now: float,
        deadline: float,
    ) -> Response:
        """The last attempt's answer, explained: its response, or its error raised."""
        fired = timeout_fired(last.outcome, now, deadline, destination.settings.per_try_timeout)
        explanation = self.explainer.record(destination, request, call, rows, stopped, now, fired)
        if last.error is not None:
            raise with_id(last.error, explanation, call)
        assert last.response is not None
        tag(last.response, explanation, call)
        return last.response

    def _no_endpoint(
        self, destination: Destination, request: Request, call: Call, rows: list[Row], now: float
    ) -> MeshError:
        which = f" in subset {dict(request.subset)}" if request.subset else ""
        failure = MeshError(NO_HEALTHY_ENDPOINTS, f"service {request.service!r} has no endpoint{which}")
        return self.explainer.failure(failure, destination, request, call, rows, now)


def _retry_after(response: Response) -> float | None:
    """The seconds a response's ``Retry-After`` asks for, if it has a valid one."""
    for name, value in response.headers:
        if len(name) == 11 and name.lower() == b"retry-after":
            return parse_retry_after(value, time.time())
    return None


__all__ = ["Attempts", "OnRetry", "Sleep"]
