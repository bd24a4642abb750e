"""One attempt's accounts, kept in one place for the plain attempt and the hedged ones
(sidecar/layers/attempts.py, sidecar/layers/hedging.py).

An attempt is :meth:`Bookkeeping.start`-ed, then either :meth:`~Bookkeeping.end`-s with
an answer (a response, or the mesh error that stands for one) or is
:meth:`~Bookkeeping.abandon`-ed (cancelled: it lost a race, or the caller went away).
The balancer and the outlier detector hear of each of these; the answer is classified
once, into the :class:`Attempt` the breaker, the retry decision and the explanation
all read. The breaker is not here: it admits a *try* (one attempt, or a
hedged race of two), so the attempt loop records it.

The caller awaits the forwarder itself, between ``start`` and ``end``: a coroutine
wrapped around it here would cost one more frame on every suspension of every request.

A gRPC call's answer ends with :meth:`~Bookkeeping.end_grpc`: classified by the gRPC
status its head tells (Trailers-Only, an HTTP error); when the status comes in the
trailers, the detector and the breaker hear of it when the exchange is over
(:meth:`~Bookkeeping.judge_at_finish`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from meshlet.headers import ERROR_HEADER

from ..core.balance import Balancer
from ..core.breaker import CircuitBreaker
from ..core.errors import MeshError
from ..core.grpc import final_status, head_status, server_fault
from ..core.outcome import Outcome, error_outcome
from ..core.outlier import OutlierDetector
from ..core.services import Endpoint
from .base import Response

# The outcome of a plain answer (no x-meshlet-error) for each status, and whether it is a
# failure, worked out once: the common answer allocates nothing and calls nothing for them.
_STATUSES = 600
_ANSWERED = tuple(Outcome(status) for status in range(_STATUSES))
_ANSWER_FAILED = tuple(outcome.failed for outcome in _ANSWERED)
# Attempt(...) without the Python frame of a NamedTuple's __new__: one per request.
_new_tuple = tuple.__new__


class Attempt(NamedTuple):
    """What became of one attempt."""

    endpoint: Endpoint
    outcome: Outcome  # the answer, classified once
    failed: bool  # outcome.failed: a failure of the destination (read often, so kept)
    elapsed: float  # seconds from sending to the answer (the timer's)
    ended: float  # when it ended (the clock's)
    response: Response | None  # the answer, when there is a response...
    error: MeshError | None  # ...or the mesh error that stands for one


class Bookkeeping:
    """``clock``: for the balancer's and the detector's windows; ``timer``: for latencies."""

    __slots__ = ("clock", "timer")

    def __init__(self, clock: Callable[[], float], timer: Callable[[], float]) -> None:
        self.clock = clock
        self.timer = timer

    def start(self, balancer: Balancer, outlier: OutlierDetector, endpoint: Endpoint, now: float) -> float:
        """An attempt to ``endpoint`` begins; when (the timer's), to pass to ``end`` or ``abandon``."""
        balancer.started(endpoint)
        outlier.started(endpoint, now)
        return self.timer()

    def end(
        self,
        balancer: Balancer,
        outlier: OutlierDetector,
        endpoint: Endpoint,
        sent: float,
        answer: Response | MeshError,
    ) -> Attempt:
        """The attempt started at ``sent`` was answered."""
        elapsed = self.timer() - sent
        now = self.clock()
        if isinstance(answer, MeshError):
            response, error, outcome = None, answer, error_outcome(answer)
            failed = outcome.failed
        else:
            response, error, status = answer, None, answer.status
            if status < _STATUSES and not answer.mesh_error:
                outcome, failed = _ANSWERED[status], _ANSWER_FAILED[status]
            else:
                outcome = Outcome(status, answer.mesh_error)
                failed = outcome.failed
        balancer.finished(endpoint, elapsed, now, failed)
        outlier.record(endpoint, now, failed)
        return _new_tuple(Attempt, (endpoint, outcome, failed, elapsed, now, response, error))

    def end_grpc(
        self, balancer: Balancer, outlier: OutlierDetector, endpoint: Endpoint, sent: float, response: Response
    ) -> Attempt:
        """A gRPC call's attempt started at ``sent`` was answered. With its status in the
        head, it is judged now; else (the status comes in the trailers) the balancer hears
        of it now and the detector when the exchange is over (:meth:`judge_at_finish`)."""
        elapsed = self.timer() - sent
        now = self.clock()
        code = head_status(response.status, response.headers)
        if code is not None and not response.mesh_error:
            # The next sidecar's own error, answered Trailers-Only: its reason, as for a 5xx.
            for name, value in response.headers:
                if len(name) == len(ERROR_HEADER) and name.lower() == ERROR_HEADER:
                    response.mesh_error = value.decode("ascii", "replace")
        outcome = Outcome(response.status, response.mesh_error, grpc=code)
        failed = outcome.failed
        balancer.finished(endpoint, elapsed, now, failed)
        if code is not None:
            outlier.record(endpoint, now, failed)
        return _new_tuple(Attempt, (endpoint, outcome, failed, elapsed, now, response, None))

    def judge_at_finish(self, last: Attempt, outlier: OutlierDetector, breaker: CircuitBreaker, permit: int) -> None:
        """A gRPC attempt whose status comes in its trailers: the detector and the breaker
        learn it when the exchange is over. One cut short before any status tells them
        nothing (as an abandoned attempt): its breaker permit is handed back."""
        response, endpoint, elapsed = last.response, last.endpoint, last.elapsed
        assert response is not None
        inner, clock = response.on_finish, self.clock

        def finished(complete: bool) -> None:
            if inner is not None:
                inner(complete)
            code = final_status(response.status, response.headers, response.trailers, complete)
            if code is None:
                outlier.release(endpoint)
                breaker.release(permit)
                return
            failed, now = server_fault(code), clock()
            outlier.record(endpoint, now, failed)
            breaker.record(now, permit, failed, elapsed)

        response.on_finish = finished

    def abandon(self, balancer: Balancer, outlier: OutlierDetector, endpoint: Endpoint, sent: float) -> None:
        """The attempt started at ``sent`` ends without an answer: the time it took is a
        lower bound of its latency, and it says nothing about the endpoint's health."""
        balancer.finished(endpoint, self.timer() - sent, self.clock(), False)
        outlier.release(endpoint)


__all__ = ["Attempt", "Bookkeeping"]
