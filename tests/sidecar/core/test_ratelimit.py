"""Local rate limits (sidecar/core/ratelimit.py): a continuously refilled token bucket."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.ratelimit import TokenBucket


def empty(rate: float = 2.0, burst: int = 3, now: float = 0.0) -> TokenBucket:
    bucket = TokenBucket(rate, burst, now)
    while bucket.take(now):
        pass
    return bucket


def test_a_bucket_starts_full_and_gives_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert bucket.tokens(0.0) == 3.0
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.tokens(0.0) == 0.0


@pytest.mark.parametrize(
    ("later", "tokens"),
    [
        (0.0, 0.0),
        (0.25, 0.5),
        (0.5, 1.0),
        (1.25, 2.5),
        (1.5, 3.0),
        (100.0, 3.0),  # up to the burst, no more
    ],
)
def test_tokens_refill_at_rate_up_to_the_burst(later: float, tokens: float) -> None:
    assert empty(rate=2.0, burst=3).tokens(later) == tokens


def test_a_refused_take_costs_nothing_and_a_refilled_token_is_taken() -> None:
    bucket = empty(rate=2.0, burst=3)
    assert not bucket.take(0.25)
    assert bucket.tokens(0.25) == 0.5
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert bucket.tokens(0.75) == 0.5


@pytest.mark.parametrize(
    ("now", "wait"),
    [
        (0.0, 0.5),
        (0.125, 0.375),
        (0.25, 0.25),
        (0.5, 0.0),
        (3.0, 0.0),
    ],
)
def test_retry_after_is_the_time_until_one_token(now: float, wait: float) -> None:
    bucket = empty(rate=2.0, burst=3)
    assert bucket.retry_after(now) == wait
    if wait:
        assert not bucket.take(now)
    assert bucket.take(now + wait)


def test_retry_after_a_full_bucket_is_zero() -> None:
    assert TokenBucket(rate=1.0, burst=1, now=0.0).retry_after(0.0) == 0.0


def test_time_going_backwards_adds_no_token_and_the_refill_resumes_from_the_latest_time() -> None:
    bucket = empty(rate=2.0, burst=3, now=10.0)
    assert not bucket.take(5.0)
    assert bucket.tokens(5.0) == 0.0
    assert bucket.retry_after(5.0) == 5.5  # back to 10, then half a second
    assert bucket.tokens(10.0) == 0.0  # the jump back and forth is not refill time
    assert bucket.tokens(10.5) == 1.0
    assert bucket.take(7.0)  # a token there is still there
    assert bucket.tokens(7.0) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.nan, 1), (1.0, 0), (1.0, -2)])
def test_a_bucket_refuses_nonsense_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


EIGHTH = 0.125  # times on a grid of eighths and rates powers of two: exact floats


@given(
    rate=st.sampled_from([0.5, 1.0, 2.0, 8.0]),
    burst=st.integers(min_value=1, max_value=5),
    start=st.integers(min_value=-100, max_value=100),
    ops=st.lists(
        st.tuples(st.integers(min_value=-16, max_value=16), st.sampled_from(["take", "tokens", "wait"])),
        max_size=150,
    ),
)
def test_a_bucket_never_gives_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, start: int, ops: list[tuple[int, str]]
) -> None:
    now = start * EIGHTH
    bucket = TokenBucket(rate, burst, now)
    latest = now
    taken = 0
    for step, op in ops:
        now += step * EIGHTH
        if op == "wait":  # as a client honouring Retry-After would
            now += bucket.retry_after(now)
            assert bucket.take(now)
            taken += 1
        elif op == "take":
            if bucket.take(now):
                taken += 1
            else:
                assert bucket.retry_after(now) > 0.0
        else:
            assert 0.0 <= bucket.tokens(now) <= burst
        latest = max(latest, now)
        assert taken <= burst + rate * (latest - start * EIGHTH)
