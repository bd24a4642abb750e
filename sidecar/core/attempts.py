"""Between one attempt and the next: which endpoint an attempt goes to, when a hedge joins
the first one, and whether another attempt follows (after how long) or why not. Pure: the
time (``now``, ``deadline``: seconds on the caller's clock) and the randomness (``rng``)
are passed in; the state consulted (outlier detector, balancer, retry budget, latency
sample) is the destination's own, in sidecar/core.

:func:`decide` answers "try again?" with one type: :class:`Retry` (after ``delay``) or
:class:`Stop` (``reason``, as ``meshlet explain`` shows it). The checks run in the order a
reader would ask them (docs/policy.md): did it work; may this method be repeated; are
retries left; does the outcome match ``retry_on``; is the body still in the replay buffer;
is there time for the backoff (or the ``Retry-After`` the upstream asked for); and only
then, the retry budget, so a retry that would not be made spends nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import errors
from .balance import Balancer
from .destination import Destination, Settings
from .outcome import Outcome
from .retry import RetryBudget, backoff
from .services import Endpoint

# A timeout that fires this close to the overall deadline is the overall timeout's.
_DEADLINE_SLACK = 0.001


@dataclass(frozen=True, slots=True)
class Retry:
    """Another attempt, after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Stop:
    """No other attempt; ``reason`` says why ("success" when none was needed)."""

    reason: str


Decision = Retry | Stop

SUCCESS = Stop("success")
RETRIES_OFF = Stop("retries off")
METHOD_NOT_RETRIED = Stop("method not retried")
NO_TIME_LEFT = Stop("no time left for another attempt")
BUDGET_EXHAUSTED = Stop("retry budget exhausted")


def decide(
    settings: Settings,
    outcome: Outcome,
    attempt: int,
    *,
    may_retry: bool,
    replay_overflow: bool,
    retry_after: float | None,
    deadline: float,
    now: float,
    budget: RetryBudget,
    rng: random.Random,
) -> Decision:
    """Whether attempt number ``attempt`` (1 for the first), which ended with ``outcome``
    at ``now``, is followed by another. ``may_retry``: the method may be repeated and
    retries are on; ``replay_overflow``: the body outgrew the replay buffer;
    ``retry_after``: the seconds the answer's ``Retry-After`` asked for, if any. A
    :class:`Retry` has spent one retry from ``budget``."""
    if not outcome.failed and outcome.status < 400 and not outcome.grpc:  # gRPC: OK, or in the trailers
        return SUCCESS
    if not may_retry:
        return METHOD_NOT_RETRIED if settings.attempts else RETRIES_OFF
    if attempt > settings.attempts:
        return Stop(f"{settings.attempts} retries made")
    per_try_timeout = outcome.local and outcome.reason == errors.TIMEOUT.name and now < deadline
    if not settings.retry_on.matches(outcome, per_try_timeout=per_try_timeout):
        return Stop(f"{outcome.name} is not a retry condition")
    if replay_overflow:  # never sent twice: the part that left the buffer cannot be sent again
        return Stop(f"body over the {settings.replay_limit} bytes of the replay buffer")
    delay = backoff(attempt, settings.backoff_base, settings.backoff_max, rng)
    if retry_after is not None:
        delay = retry_after
    if now + delay >= deadline:
        return NO_TIME_LEFT
    if not budget.try_spend(now):
        return BUDGET_EXHAUSTED
    return Retry(delay)


def pick(destination: Destination, balancer: Balancer, tried: list[Endpoint], now: float) -> Endpoint | None:
    """An endpoint not ejected and not tried yet; else one not ejected; else any (panic)."""
    available, _panic = destination.outlier.available(now)
    if len(available) == len(destination.endpoints):
        if not tried:
            return balancer.pick()
        return balancer.pick(frozenset(tried)) or balancer.pick()
    out = set(destination.endpoints).difference(available)
    return balancer.pick(out.union(tried)) or balancer.pick(out) or balancer.pick()


def hedge_delay(destination: Destination) -> float | None:
    """How long the first attempt may take before a second one joins it; None: no hedge
    (none configured, or too few latencies observed yet to know what slow is)."""
    settings = destination.settings
    delay = settings.hedge_delay
    if isinstance(delay, str):
        delay = destination.latencies.percentile(delay)
    if delay is None:
        return None
    return max(delay, settings.hedge_min_delay)


def timeout_fired(outcome: Outcome, now: float, deadline: float, per_try_timeout: float | None) -> str:
    """Which timeout ended the last attempt, for the explanation: "overall", "per-try",
    or "" when none did."""
    if not (outcome.local and outcome.reason == errors.TIMEOUT.name):
        return ""
    if per_try_timeout is None or now >= deadline - _DEADLINE_SLACK:
        return "overall"
    return "per-try"


__all__ = [
    "BUDGET_EXHAUSTED",
    "METHOD_NOT_RETRIED",
    "NO_TIME_LEFT",
    "RETRIES_OFF",
    "SUCCESS",
    "Decision",
    "Retry",
    "Stop",
    "decide",
    "hedge_delay",
    "pick",
    "timeout_fired",
]
