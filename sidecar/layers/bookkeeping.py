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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ..core.balance import Balancer
from ..core.errors import MeshError
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

    def abandon(self, balancer: Balancer, outlier: OutlierDetector, endpoint: Endpoint, sent: float) -> None:
        """The attempt started at ``sent`` ends without an answer: the time it took is a
        lower bound of its latency, and it says nothing about the endpoint's health."""
        balancer.finished(endpoint, self.timer() - sent, self.clock(), False)
        outlier.release(endpoint)


__all__ = ["Attempt", "Bookkeeping"]
