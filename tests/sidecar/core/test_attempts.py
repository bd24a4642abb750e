"""Between attempts (sidecar/core/attempts.py): the retry decision, the endpoint choice, the
hedge delay and which timeout fired — pure, so tables of cases."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from sidecar.core import errors
from sidecar.core.attempts import (
    BUDGET_EXHAUSTED,
    METHOD_NOT_RETRIED,
    NO_TIME_LEFT,
    RETRIES_OFF,
    SUCCESS,
    Decision,
    Retry,
    Stop,
    decide,
    hedge_delay,
    pick,
    timeout_fired,
)
from sidecar.core.balance import make_balancer
from sidecar.core.destination import DEFAULTS, Destination, Settings
from sidecar.core.outcome import Outcome, RetryOn, error_outcome
from sidecar.core.outlier import OutlierConfig
from sidecar.core.retry import RetryBudget
from sidecar.core.services import Endpoint

A, B, C = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)


class Fixed(random.Random):
    """An rng whose ``random()`` is always ``value``: exact back-offs."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def error(reason: errors.Reason, cause: str = "") -> Outcome:
    return error_outcome(errors.MeshError(reason, "test", cause=cause))


# The defaults: 2 retries on connect-failure, reset, refused, unavailable; backoff 25 ms
# doubling to 250 ms; with Fixed(0.5) retry n waits 12.5 ms * 2 ** (n - 1).
DECISIONS: list[tuple[str, Outcome, int, dict[str, Any], Decision]] = [
    ("a 200 needs no other", Outcome(200), 1, {}, SUCCESS),
    ("a 204 on a retry", Outcome(204), 2, {}, SUCCESS),
    ("a 404 is no retry condition", Outcome(404), 1, {}, Stop("404 is not a retry condition")),
    ("a 500 is not either, by default", Outcome(500), 1, {}, Stop("500 is not a retry condition")),
    ("a 503 is retried", Outcome(503), 1, {}, Retry(0.0125)),
    ("the second retry waits twice as long", Outcome(503), 2, {}, Retry(0.025)),
    ("after the retries allowed", Outcome(503), 3, {}, Stop("2 retries made")),
    ("a refused connection", error(errors.CONNECT_FAILED, "refused"), 1, {}, Retry(0.0125)),
    ("a reset", error(errors.UPSTREAM_RESET), 1, {}, Retry(0.0125)),
    ("a timeout, by default", error(errors.TIMEOUT), 1, {}, Stop("timeout is not a retry condition")),
    ("a bad request of ours", error(errors.BAD_REQUEST), 1, {}, Stop("bad-request is not a retry condition")),
    ("a method not repeated", Outcome(503), 1, {"may_retry": False}, METHOD_NOT_RETRIED),
    ("retries off", Outcome(503), 1, {"may_retry": False, "attempts": 0}, RETRIES_OFF),
    (
        "a body past the replay buffer",
        Outcome(503),
        1,
        {"replay_overflow": True},
        Stop("body over the 65536 bytes of the replay buffer"),
    ),
    ("the Retry-After asked for", Outcome(503), 1, {"retry_after": 0.5}, Retry(0.5)),
    ("a Retry-After of 0", Outcome(503), 1, {"retry_after": 0.0}, Retry(0.0)),
    ("a Retry-After past the deadline", Outcome(503), 1, {"retry_after": 30.0}, NO_TIME_LEFT),
    ("no time for the backoff", Outcome(503), 1, {"now": 9.99}, NO_TIME_LEFT),
    ("exactly no time left", Outcome(503), 1, {"now": 10.0 - 0.0125}, NO_TIME_LEFT),
    ("the budget refuses", Outcome(503), 1, {"budget": RetryBudget(0.0, 0.0)}, BUDGET_EXHAUSTED),
    (
        "a per-try timeout under gateway-error",
        error(errors.TIMEOUT),
        1,
        {"retry_on": RetryOn(["gateway-error"])},
        Retry(0.0125),
    ),
    (
        "the overall timeout never is",
        error(errors.TIMEOUT),
        1,
        {"retry_on": RetryOn(["gateway-error"]), "now": 10.0},
        Stop("timeout is not a retry condition"),
    ),
    (
        "a listed status",
        Outcome(429),
        1,
        {"retry_on": RetryOn(["retriable-status-codes"], [429])},
        Retry(0.0125),
    ),
]


@pytest.mark.parametrize(
    ("outcome", "attempt", "given", "expected"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_decide(outcome: Outcome, attempt: int, given: dict[str, Any], expected: Decision) -> None:
    given = dict(given)
    settings: Settings = DEFAULTS
    for knob in ("attempts", "retry_on"):
        if knob in given:
            settings = replace(settings, **{knob: given.pop(knob)})
    arguments: dict[str, Any] = {
        "may_retry": True,
        "replay_overflow": False,
        "retry_after": None,
        "deadline": 10.0,
        "now": 0.0,
        "budget": RetryBudget(),
        "rng": Fixed(0.5),
    }
    arguments.update(given)
    assert decide(settings, outcome, attempt, **arguments) == expected


def test_a_retry_spends_from_the_budget_and_a_stop_spends_nothing() -> None:
    budget = RetryBudget(0.0, 0.1, window=10.0)  # one retry in the window
    kwargs: dict[str, Any] = {"may_retry": True, "replay_overflow": False, "deadline": 10.0, "now": 0.0}
    stops = [
        decide(DEFAULTS, Outcome(503), 1, retry_after=30.0, budget=budget, rng=Fixed(0.5), **kwargs),
        decide(DEFAULTS, Outcome(404), 1, retry_after=None, budget=budget, rng=Fixed(0.5), **kwargs),
    ]
    assert stops == [NO_TIME_LEFT, Stop("404 is not a retry condition")]
    assert budget.remaining(0.0) == 1.0  # nothing spent on a retry not made
    first = decide(DEFAULTS, Outcome(503), 1, retry_after=None, budget=budget, rng=Fixed(0.5), **kwargs)
    second = decide(DEFAULTS, Outcome(503), 1, retry_after=None, budget=budget, rng=Fixed(0.5), **kwargs)
    assert (first, second) == (Retry(0.0125), BUDGET_EXHAUSTED)


def destination(*endpoints: Endpoint, settings: Settings = DEFAULTS) -> Destination:
    return Destination("item", settings, endpoints, 0.0, random.Random(1))


@pytest.mark.parametrize(
    ("ejected", "tried", "allowed"),
    [
        ((), (), {A, B, C}),
        ((), (A,), {B, C}),
        ((), (A, B), {C}),
        ((), (A, B, C), {A, B, C}),  # all tried: any again
        ((A,), (), {B, C}),
        ((A,), (B,), {C}),
        ((A,), (B, C), {B, C}),  # the ones not ejected, though tried
    ],
)
def test_pick_prefers_endpoints_not_ejected_then_not_tried(
    ejected: tuple[Endpoint, ...], tried: tuple[Endpoint, ...], allowed: set[Endpoint]
) -> None:
    settings = replace(DEFAULTS, outlier=OutlierConfig(consecutive_failures=1, max_ejected_percent=100))
    place = destination(A, B, C, settings=settings)
    for endpoint in ejected:
        place.outlier.record(endpoint, 0.0, True)
    balancer = make_balancer("random", place.endpoints, random.Random(2))
    picked = {pick(place, balancer, list(tried), 1.0) for _ in range(60)}
    assert picked == allowed


def test_pick_in_a_panic_takes_any_and_with_no_endpoint_none() -> None:
    settings = replace(DEFAULTS, outlier=OutlierConfig(consecutive_failures=1, max_ejected_percent=100))
    place = destination(A, B, settings=settings)
    place.outlier.record(A, 0.0, True)
    place.outlier.record(B, 0.0, True)
    balancer = make_balancer("random", place.endpoints, random.Random(2))
    assert {pick(place, balancer, [], 1.0) for _ in range(40)} == {A, B}
    empty = destination()
    assert pick(empty, make_balancer("random", [], random.Random(2)), [], 1.0) is None


@pytest.mark.parametrize(
    ("delay", "min_delay", "samples", "expected"),
    [
        (None, 0.005, [], None),  # no hedging
        (0.05, 0.005, [], 0.05),  # a fixed delay
        (0.001, 0.005, [], 0.005),  # never below min_delay
        ("p95", 0.005, [0.01] * 31, None),  # too few samples yet
        ("p95", 0.005, [0.01] * 32, 0.01),
        ("p50", 0.005, [i / 1000 for i in range(1, 65)], 0.033),
        ("p95", 0.02, [0.01] * 32, 0.02),
    ],
)
def test_hedge_delay(delay: float | str | None, min_delay: float, samples: list[float], expected: float | None) -> None:
    place = destination(A, settings=replace(DEFAULTS, hedge_delay=delay, hedge_min_delay=min_delay))
    for seconds in samples:
        place.latencies.add(seconds)
    assert hedge_delay(place) == expected


@pytest.mark.parametrize(
    ("outcome", "now", "per_try", "expected"),
    [
        (Outcome(200), 5.0, 1.0, ""),
        (Outcome(504), 5.0, 1.0, ""),  # a gateway timeout upstream is not ours
        (error(errors.CONNECT_FAILED), 5.0, 1.0, ""),
        (error(errors.TIMEOUT), 5.0, None, "overall"),  # no per-try timeout: the overall one
        (error(errors.TIMEOUT), 5.0, 1.0, "per-try"),
        (error(errors.TIMEOUT), 9.9995, 1.0, "overall"),  # at the deadline (within 1 ms)
        (error(errors.TIMEOUT), 10.0, 1.0, "overall"),
    ],
)
def test_which_timeout_fired(outcome: Outcome, now: float, per_try: float | None, expected: str) -> None:
    assert timeout_fired(outcome, now, 10.0, per_try) == expected
