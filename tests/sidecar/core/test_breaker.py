"""Circuit breakers (sidecar/core/breaker.py): every state transition, on a fake clock."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.breaker import BreakerConfig, CircuitBreaker, State

CLOSED, OPEN, HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN
FAST = 0.01


def breaker(now: float = 0.0, **config: Any) -> tuple[CircuitBreaker, list[tuple[State, State]]]:
    moves: list[tuple[State, State]] = []
    b = CircuitBreaker(BreakerConfig(**config), now, lambda old, new: moves.append((old, new)))
    return b, moves


def call(b: CircuitBreaker, now: float, failed: bool = False, duration: float = FAST) -> int:
    permit = b.admit(now)
    assert permit is not None, f"rejected at {now} in {b.state!r}"
    b.record(now, permit, failed, duration)
    return permit


def calls(b: CircuitBreaker, now: float, failures: int = 0, successes: int = 0, duration: float = FAST) -> None:
    for failed in [True] * failures + [False] * successes:
        call(b, now, failed, duration)


def opened(now: float = 0.0, **config: Any) -> tuple[CircuitBreaker, list[tuple[State, State]]]:
    """A breaker that opened at ``now`` (min_requests 20, so 20 failures)."""
    b, moves = breaker(**config)
    calls(b, now, failures=20)
    assert b.state is OPEN
    return b, moves


# --- CLOSED -> OPEN -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "failures", "fast", "slow", "state"),
    [
        ({}, 19, 0, 0, CLOSED),  # under min_requests: 100 % failures are not enough
        ({}, 10, 10, 0, OPEN),  # exactly the ratio, exactly min_requests
        ({}, 9, 11, 0, CLOSED),
        ({}, 15, 5, 0, OPEN),  # the ratio was met before; opens when the 20th call (a success) comes
        ({"failure_ratio": 1.0}, 19, 1, 0, CLOSED),
        ({"failure_ratio": 1.0}, 20, 0, 0, OPEN),
        ({"min_requests": 30, "failure_ratio": 0.1}, 3, 27, 0, OPEN),  # 3/30 is 0.1 (0.1 * 30 is not 3)
        ({"min_requests": 30, "failure_ratio": 0.1}, 2, 28, 0, CLOSED),
        ({"slow_threshold": 0.8}, 0, 0, 20, OPEN),  # all slow, default slow_ratio 1.0
        ({"slow_threshold": 0.8}, 0, 1, 19, CLOSED),
        ({"slow_threshold": 0.8, "slow_ratio": 0.5}, 0, 10, 10, OPEN),
        ({"slow_threshold": 0.8, "slow_ratio": 0.5}, 0, 11, 9, CLOSED),
        ({}, 0, 0, 20, CLOSED),  # no slow_threshold: slowness is not counted against it
    ],
)
def test_closed_opens_on_the_ratios_once_min_requests_are_in(
    config: dict[str, Any], failures: int, fast: int, slow: int, state: State
) -> None:
    b, moves = breaker(**config)
    calls(b, 1.0, failures=failures)
    calls(b, 1.0, successes=fast)
    calls(b, 1.0, successes=slow, duration=5.0)
    assert b.state is state
    assert moves == ([(CLOSED, OPEN)] if state is OPEN else [])


def test_a_slow_failure_counts_as_a_failure_and_as_slow() -> None:
    b, _ = breaker(slow_threshold=0.8)
    call(b, 0.0, failed=True, duration=0.8)  # >= threshold: slow
    call(b, 0.0, failed=False, duration=0.79)
    snap = b.snapshot(0.0)
    assert (snap["calls"], snap["failures"], snap["slow"]) == (2, 1, 1)


@pytest.mark.parametrize(("later", "state"), [(9.99, OPEN), (10.0, CLOSED), (11.0, CLOSED)])
def test_failures_older_than_the_window_do_not_count(later: float, state: State) -> None:
    b, _ = breaker()
    calls(b, 0.0, failures=10)
    calls(b, later, successes=10)  # 10/20 failed if the first ten are still in the window
    assert b.state is state


def test_the_window_rolls_bucket_by_bucket() -> None:
    b, _ = breaker(min_requests=1000)
    for second in range(10):
        call(b, second + 0.5, failed=second % 2 == 0)
    counts = [(t, b.snapshot(t)["calls"], b.snapshot(t)["failures"]) for t in (9.9, 10.0, 10.5, 15.0, 18.9, 19.0)]
    assert counts == [(9.9, 10, 5), (10.0, 9, 4), (10.5, 9, 4), (15.0, 4, 2), (18.9, 1, 0), (19.0, 0, 0)]
    call(b, 25.0, failed=True)  # after a jump past the whole window: one fresh bucket
    assert (b.snapshot(25.0)["calls"], b.snapshot(25.0)["failures"]) == (1, 1)


def test_a_now_behind_the_newest_bucket_counts_in_the_newest() -> None:
    b, _ = breaker(min_requests=1000)
    call(b, 5.0)
    call(b, 3.0, failed=True)  # another task's clock read, a little older
    assert (b.snapshot(14.99)["calls"], b.snapshot(14.99)["failures"]) == (2, 1)
    assert b.snapshot(15.0)["calls"] == 0  # both went out with the bucket of t=5


def test_buckets_follow_the_config() -> None:
    b, _ = breaker(window=2.0, buckets=4, min_requests=1000)  # 0.5 s buckets
    call(b, 0.0, failed=True)
    call(b, 0.6)
    assert b.snapshot(1.99)["calls"] == 2
    assert (b.snapshot(2.0)["calls"], b.snapshot(2.0)["failures"]) == (1, 0)
    assert b.snapshot(2.5)["calls"] == 0


# --- OPEN -> HALF_OPEN ----------------------------------------------------------------------


def test_open_rejects_until_open_for_then_the_next_admit_is_a_trial() -> None:
    b, moves = opened(1.0)
    assert [b.admit(t) for t in (1.0, 3.0, 5.999)] == [None, None, None]
    assert b.state is OPEN
    assert b.snapshot(6.0)["state"] == "open"  # no timer: still OPEN at 6.0 until something is admitted
    permit = b.admit(6.0)
    assert permit is not None
    assert b.state is HALF_OPEN
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_open_for_comes_from_the_config() -> None:
    b, _ = opened(0.0, open_for=30.0)
    assert b.admit(29.9) is None
    assert b.admit(30.0) is not None


# --- HALF_OPEN ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
def test_half_open_admits_exactly_n_trials_in_all(n: int) -> None:
    b, _ = opened(0.0, half_open_requests=n)
    permits = [b.admit(5.0 + i) for i in range(n)]
    assert None not in permits
    assert b.admit(20.0) is None  # not per second: all n are out
    assert b.snapshot(20.0)["trials_left"] == 0
    for permit in permits[:-1]:
        b.record(21.0, permit, False, FAST)
        assert b.state is HALF_OPEN
        assert b.admit(21.0) is None  # a success does not free a slot either
    b.record(22.0, permits[-1], False, FAST)
    assert b.state is CLOSED


def test_n_successful_trials_close_it_with_an_empty_window() -> None:
    b, moves = breaker(half_open_requests=2)
    calls(b, 0.0, failures=15, successes=5)
    a, c = b.admit(5.0), b.admit(5.0)
    assert a is not None and c is not None
    b.record(5.5, a, False, FAST)
    b.record(5.5, c, False, FAST)
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    snap = b.snapshot(5.5)
    assert (snap["state"], snap["calls"], snap["failures"]) == ("closed", 0, 0)
    calls(b, 6.0, failures=19)  # a fresh window: min_requests again
    assert b.state is CLOSED
    call(b, 6.0, failed=True)
    assert b.state is OPEN


@pytest.mark.parametrize(
    ("config", "failed", "duration", "state"),
    [
        ({}, True, FAST, OPEN),
        ({}, False, FAST, CLOSED),
        ({}, False, 60.0, CLOSED),  # no slow_threshold: a slow success is a success
        ({"slow_threshold": 0.8}, False, 0.8, OPEN),  # a slow trial fails it
        ({"slow_threshold": 0.8}, False, 0.79, CLOSED),
    ],
)
def test_a_trial_decides(config: dict[str, Any], failed: bool, duration: float, state: State) -> None:
    b, moves = opened(0.0, **config)
    permit = b.admit(5.0)
    assert permit is not None
    b.record(6.0, permit, failed, duration)
    assert b.state is state
    assert moves[-1] == (HALF_OPEN, state)


def test_a_failed_trial_reopens_from_the_time_it_failed() -> None:
    b, moves = opened(0.0, half_open_requests=2)
    first, second = b.admit(5.0), b.admit(5.0)
    assert first is not None and second is not None
    b.record(7.0, first, True, FAST)
    assert b.state is OPEN
    assert b.retry_after(7.0) == 5.0
    assert b.admit(11.99) is None
    b.record(11.99, second, False, FAST)  # the other trial ends: its generation is gone
    assert b.state is OPEN
    assert b.admit(12.0) is not None
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


# --- permits --------------------------------------------------------------------------------


def test_a_call_admitted_in_an_earlier_state_is_not_a_trial() -> None:
    b, moves = breaker()
    slow_one = b.admit(0.0)
    assert slow_one is not None
    calls(b, 0.0, failures=20)
    trial = b.admit(5.0)
    assert trial is not None and b.state is HALF_OPEN
    assert trial == slow_one + 2  # a generation a transition: CLOSED -> OPEN -> HALF_OPEN
    b.record(6.0, slow_one, False, 6.0)  # a success, but from CLOSED: not the trial's outcome
    assert b.state is HALF_OPEN
    b.record(6.0, slow_one, True, 6.0)  # nor a failure
    assert b.state is HALF_OPEN
    b.record(6.5, trial, False, FAST)
    assert b.state is CLOSED
    b.record(7.0, slow_one, True, 7.0)  # CLOSED again, but a new generation: not counted
    assert b.snapshot(7.0)["calls"] == 0
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_result_recorded_twice_for_one_trial_counts_once() -> None:
    b, _ = opened(0.0, half_open_requests=2)
    first = b.admit(5.0)
    assert first is not None
    b.record(5.0, first, False, FAST)
    b.record(5.0, first, False, FAST)  # a caller's bug: must not close it with one trial
    assert b.state is HALF_OPEN


def test_release_frees_a_trial_slot() -> None:
    b, _ = opened(0.0)
    permit = b.admit(5.0)
    assert permit is not None
    assert b.admit(5.0) is None
    b.release(permit)  # the client went away: no outcome
    assert b.state is HALF_OPEN
    assert b.snapshot(5.0)["trials_left"] == 1
    again = b.admit(5.1)
    assert again is not None
    assert b.admit(5.1) is None
    b.record(5.2, again, False, FAST)
    assert b.state is CLOSED


def test_release_of_a_stale_or_finished_permit_frees_nothing() -> None:
    b, _ = breaker(half_open_requests=2)
    old = b.admit(0.0)
    assert old is not None
    calls(b, 0.0, failures=20)
    first, second = b.admit(5.0), b.admit(5.0)
    assert first is not None and second is not None
    b.release(old)  # from CLOSED
    assert b.admit(5.0) is None
    b.record(5.0, first, False, FAST)
    b.release(second)
    b.release(second)  # a caller's bug: one slot was out, one comes back
    assert b.admit(5.0) is not None
    assert b.admit(5.0) is None


def test_release_while_closed_changes_nothing() -> None:
    b, moves = breaker()
    permit = b.admit(0.0)
    assert permit is not None
    b.release(permit)
    assert (b.state, b.snapshot(0.0)["calls"], moves) == (CLOSED, 0, [])


# --- force ----------------------------------------------------------------------------------


def test_forced_open_never_admits() -> None:
    b, moves = breaker(force="open")
    assert b.state is OPEN
    assert [b.admit(t) for t in (0.0, 5.0, 1e9)] == [None, None, None]
    assert b.retry_after(1e9) == 5.0  # a hint for Retry-After: no trial is coming
    assert (b.snapshot(0.0)["forced"], b.snapshot(0.0)["half_open_in_s"]) == ("open", None)
    assert moves == []


def test_forced_closed_counts_but_never_opens() -> None:
    b, moves = breaker(force="closed", slow_threshold=0.5)
    calls(b, 0.0, failures=50, duration=1.0)
    assert b.state is CLOSED
    snap = b.snapshot(0.0)
    assert (snap["forced"], snap["calls"], snap["failures"], snap["slow"]) == ("closed", 50, 50, 50)
    assert snap["failure_rate"] == 1.0
    assert moves == []


@pytest.mark.parametrize(
    "config",
    [{"force": "half"}, {"buckets": 0}, {"window": 0.0}, {"min_requests": 0}, {"half_open_requests": 0}],
)
def test_a_config_that_cannot_work_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**config)


# --- reporting ------------------------------------------------------------------------------


def test_on_transition_sees_every_edge_in_order() -> None:
    seen: list[tuple[State, State, State]] = []
    b = CircuitBreaker(BreakerConfig(min_requests=2), 0.0, lambda old, new: seen.append((old, new, b.state)))
    calls(b, 0.0, failures=2)
    trial = b.admit(5.0)
    assert trial is not None
    b.record(5.0, trial, True, FAST)
    trial = b.admit(10.0)
    assert trial is not None
    b.record(10.0, trial, False, FAST)
    assert seen == [  # the callback runs after the change: state is already the new one
        (CLOSED, OPEN, OPEN),
        (OPEN, HALF_OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN, OPEN),
        (OPEN, HALF_OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED, CLOSED),
    ]


def test_retry_after() -> None:
    b, _ = breaker()
    assert b.retry_after(0.0) == 0.0  # CLOSED
    calls(b, 2.0, failures=20)
    assert [b.retry_after(t) for t in (2.0, 4.5, 7.0, 9.0)] == [5.0, 2.5, 0.0, 0.0]
    assert b.state is OPEN  # open_for is over, but nobody asked yet
    assert b.admit(9.0) is not None
    assert b.retry_after(9.0) == 0.0  # HALF_OPEN, even with no trial slot left


def test_snapshot_numbers() -> None:
    b, _ = breaker(slow_threshold=1.0, half_open_requests=3)
    calls(b, 0.0, failures=3, duration=2.0)
    calls(b, 0.0, successes=5)
    assert b.snapshot(1.0) == {
        "state": "closed",
        "forced": None,
        "calls": 8,
        "failures": 3,
        "slow": 3,
        "failure_rate": 0.375,
        "slow_rate": 0.375,
        "min_requests": 20,
        "half_open_in_s": None,
        "trials_left": 0,
    }
    calls(b, 1.0, failures=12)
    snap = b.snapshot(2.0)
    assert (snap["state"], snap["calls"], snap["failure_rate"], snap["half_open_in_s"]) == ("open", 0, 0.0, 4.0)
    assert b.admit(6.0) is not None
    snap = b.snapshot(6.0)
    assert (snap["state"], snap["half_open_in_s"], snap["trials_left"]) == ("half_open", None, 2)


# --- properties -----------------------------------------------------------------------------

SMALL = BreakerConfig(
    window=2.0, buckets=4, min_requests=2, failure_ratio=0.5, open_for=1.0, half_open_requests=2, slow_threshold=0.5
)
EDGES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}

# (what, i): "advance" the clock STEPS[i] seconds, "admit", or record or release the i-th
# outstanding permit (modulo their number). Weighted so that runs open, wait, half-open and run
# out of trial slots often.
STEPS = (0.05, 0.1, 0.2, 0.5, 0.99, 1.0, 2.5)
WHAT = ("advance", "advance", "admit", "admit", "success", "success", "failure", "failure", "slow", "release")
operations = st.lists(st.tuples(st.sampled_from(WHAT), st.integers(0, len(STEPS) - 1)), min_size=20, max_size=100)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_properties_over_any_sequence_of_calls(ops: list[tuple[str, int]]) -> None:
    now = 0.0
    moves: list[tuple[State, State]] = []
    opened_at: list[float] = []
    period = {"admitted": 0}  # trials admitted in this HALF_OPEN period, minus those released

    def on_transition(old: State, new: State) -> None:
        moves.append((old, new))
        if new is OPEN:
            opened_at.append(now)
        if new is HALF_OPEN:
            period["admitted"] = 0

    b = CircuitBreaker(SMALL, now, on_transition)
    # Permits admitted and not yet recorded or released, with the period they were admitted in:
    # len(moves) at the time, if HALF_OPEN, else None.
    outstanding: list[tuple[int, int | None]] = []
    for op, arg in ops:
        if op == "advance":
            now += STEPS[arg]
        elif op == "admit":
            before = b.state
            permit = b.admit(now)
            if before is OPEN:
                # (2) never before open_for since it opened; and then at once
                assert (permit is not None) == (now >= opened_at[-1] + SMALL.open_for)
            if permit is not None:
                trial = b.state is HALF_OPEN
                outstanding.append((permit, len(moves) if trial else None))
                period["admitted"] += trial
        elif outstanding:
            permit, admitted_in = outstanding.pop(arg % len(outstanding))
            if op == "release":
                if b.state is HALF_OPEN and admitted_in == len(moves):
                    period["admitted"] -= 1
                b.release(permit)
            else:
                b.record(now, permit, op == "failure", 1.0 if op == "slow" else 0.1)
        if b.state is HALF_OPEN:
            # (1) trials out at once, and admitted in the period, never above half_open_requests
            trials_out = sum(1 for _, admitted_in in outstanding if admitted_in == len(moves))
            assert trials_out <= period["admitted"] <= SMALL.half_open_requests
    # (3) only along the four edges, each starting where the last one ended
    assert set(moves) <= EDGES
    assert all(first[1] == then[0] for first, then in pairwise(moves))
    assert moves == [] or moves[-1][1] is b.state


@settings(max_examples=50, deadline=None)
@given(operations, st.sampled_from(["open", "closed"]))
def test_a_forced_breaker_never_moves(ops: list[tuple[str, int]], force: str) -> None:
    moves: list[tuple[State, State]] = []
    config = BreakerConfig(min_requests=1, failure_ratio=0.1, open_for=0.1, force=force)
    b = CircuitBreaker(config, 0.0, lambda old, new: moves.append((old, new)))
    now = 0.0
    for op, arg in ops:
        if op == "advance":
            now += STEPS[arg]
            continue
        permit = b.admit(now)
        if force == "open":
            assert permit is None  # (4)
            continue
        assert permit is not None
        if op == "release":
            b.release(permit)
        elif op != "admit":
            b.record(now, permit, op == "failure", 1.0 if op == "slow" else 0.1)
    assert moves == []
    assert b.state is (OPEN if force == "open" else CLOSED)
