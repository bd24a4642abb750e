"""Retries (sidecar/core/retry.py): full-jitter back-off, Retry-After, Linkerd's retry budget."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.retry import RetryBudget, backoff, parse_retry_after

BASE, CAP = 0.025, 0.25  # Envoy's defaults


class Fixed(random.Random):
    """An rng whose ``random()`` is always ``value``: exact back-offs."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("retry", "fraction", "delay"),
    [
        (1, 0.5, 0.0125),
        (2, 0.5, 0.025),
        (3, 0.5, 0.05),
        (4, 0.5, 0.1),
        (5, 0.5, 0.125),  # 0.4 is over the cap: 0.25 * 0.5
        (6, 0.5, 0.125),
        (1, 0.0, 0.0),
        (4, 0.25, 0.05),
        (1000, 0.5, 0.125),
        (10**6, 0.5, 0.125),  # 2 ** 999999 would overflow a float
        (10**30, 0.5, 0.125),
        (0, 0.5, 0.0125),  # below 1 counts as the first retry
        (-3, 0.5, 0.0125),
    ],
)
def test_backoff_is_a_fraction_of_the_capped_exponential_ceiling(retry: int, fraction: float, delay: float) -> None:
    assert backoff(retry, BASE, CAP, Fixed(fraction)) == delay


@pytest.mark.parametrize(
    ("base", "cap", "delay"),
    [
        (0.0, CAP, 0.0),
        (1.0, CAP, 0.125),  # a base over the cap: the cap
        (BASE, 0.0, 0.0),
        (BASE, -1.0, 0.0),  # a nonsense cap never makes a negative delay
        (-1.0, CAP, 0.0),
    ],
)
def test_backoff_odd_settings_stay_within_zero_and_the_cap(base: float, cap: float, delay: float) -> None:
    assert backoff(2, base, cap, Fixed(0.5)) == delay


def test_backoff_with_a_seeded_rng_is_repeatable_and_spans_the_whole_range() -> None:
    a, b = random.Random(7), random.Random(7)
    assert [backoff(3, BASE, CAP, a) for _ in range(20)] == [backoff(3, BASE, CAP, b) for _ in range(20)]
    draws = [backoff(4, BASE, CAP, a) for _ in range(2000)]  # ceiling 0.2
    assert all(0.0 <= d < 0.2 for d in draws)
    assert min(draws) < 0.01 and max(draws) > 0.19
    assert abs(sum(draws) / len(draws) - 0.1) < 0.005  # uniform: the mean is half the ceiling


@given(
    retry=st.integers(min_value=-5, max_value=10**40),
    base=st.floats(min_value=0.0, max_value=1e6),
    cap=st.floats(min_value=0.0, max_value=1e6),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_is_never_negative_nor_above_the_cap(retry: int, base: float, cap: float, seed: int) -> None:
    for rng in (random.Random(seed), Fixed(0.0), Fixed(math.nextafter(1.0, 0.0))):
        delay = backoff(retry, base, cap, rng)
        assert 0.0 <= delay <= cap


NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    ("value", "delay"),
    [
        (b"120", 120.0),
        (b"0", 0.0),
        (b"007", 7.0),
        (b" 5\t", 5.0),  # surrounding whitespace
        (b"86400000", 86400000.0),  # not capped here
        (b"9" * 400, math.inf),  # too large for a float: longer than anything
        (b"Sun, 06 Nov 1994 08:49:57 GMT", 20.0),  # IMF-fixdate
        (b"  Sun, 06 Nov 1994 08:49:57 GMT ", 20.0),
        (b"Sunday, 06-Nov-94 08:49:57 GMT", 20.0),  # RFC 850 (obsolete)
        (b"Sun Nov  6 08:49:57 1994", 20.0),  # asctime (obsolete): no zone, GMT
        (b"Sun, 06 Nov 1994 09:49:37 GMT", 3600.0),
        (b"Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # now
        (b"Sun, 06 Nov 1994 08:49:36 GMT", 0.0),  # the past: now
        (b"Sat, 01 Jan 1994 00:00:00 GMT", 0.0),
        (b"", None),
        (b"   ", None),
        (b"soon", None),
        (b"-5", None),  # delay-seconds has no sign
        (b"+5", None),
        (b"1.5", None),  # nor a fraction
        (b"1_000", None),  # Python's int() would take this
        (b"0x10", None),
        (b"5 s", None),
        (b"\xd9\xa3", None),  # a non-ASCII digit
        (b"Sun, 06 Nov 1994", None),  # a date without a time
        (b"Mon, 32 Nov 1994 08:49:37 GMT", None),  # no such day
        (b"Sun, 06 Nov 1994 25:49:37 GMT", None),
        (b"x" * 10000, None),
        (b"Sun, 06 Nov 1994 08:49:57 GMT" + b" " * 40 + b"x", None),  # too long for a date
    ],
)
def test_retry_after_is_seconds_or_a_date_else_none(value: bytes, delay: float | None) -> None:
    assert parse_retry_after(value, NOW) == delay


def test_retry_after_honours_a_numeric_zone() -> None:
    # 10:49:57 at +0200 is 08:49:57 GMT
    assert parse_retry_after(b"Sun, 06 Nov 1994 10:49:57 +0200", NOW) == 20.0


def spend(budget: RetryBudget, now: float, times: int) -> int:
    """How many of ``times`` withdrawals at ``now`` the budget allowed."""
    return sum(budget.try_spend(now) for _ in range(times))


def test_with_no_requests_the_floor_allows_min_per_second_times_window() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0, now=0.0)
    assert budget.remaining(0.0) == 100.0
    assert [budget.try_spend(i * 0.09) for i in range(100)] == [True] * 100  # spread over 9 s
    assert not budget.try_spend(9.5)
    assert budget.snapshot(9.5) == {"requests": 0, "retries": 100, "remaining": 0.0}


def test_a_refused_retry_is_not_counted() -> None:
    budget = RetryBudget(min_per_second=1.0, window=10.0)
    assert spend(budget, 1.0, 15) == 10
    assert budget.snapshot(1.0)["retries"] == 10


def test_requests_add_ratio_of_a_retry_each() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0, now=0.0)
    for i in range(1000):
        budget.record_request(i * 0.005)
    assert budget.remaining(5.0) == 300.0
    assert spend(budget, 5.0, 301) == 300  # 200 + the floor
    assert budget.snapshot(5.0) == {"requests": 1000, "retries": 300, "remaining": 0.0}


def test_a_fraction_of_a_retry_is_not_a_retry() -> None:
    budget = RetryBudget(ratio=0.25, min_per_second=0.0, window=10.0)
    budget.record_request(0.0)
    budget.record_request(0.0)
    assert budget.remaining(0.0) == 0.5
    assert not budget.try_spend(0.0)
    budget.record_request(0.0)
    budget.record_request(0.0)
    assert budget.try_spend(0.0)  # 4 * 0.25: exactly one
    assert not budget.try_spend(0.0)


def test_retries_expire_after_the_window_bucket_by_bucket() -> None:
    budget = RetryBudget(min_per_second=10.0, window=10.0, buckets=10)
    assert spend(budget, 0.5, 60) == 60
    assert spend(budget, 5.5, 40) == 40
    assert not budget.try_spend(9.99)
    assert budget.remaining(10.0) == 60.0  # the bucket [0, 1) left the window, [5, 6) did not
    assert spend(budget, 10.0, 61) == 60
    assert budget.remaining(14.99) == 0.0
    assert budget.remaining(15.0) == 40.0  # [5, 6) left too
    assert budget.snapshot(40.0) == {"requests": 0, "retries": 0, "remaining": 100.0}  # a fresh window
    assert spend(budget, 40.0, 101) == 100


def test_requests_expire_after_the_window() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window=10.0)
    for _ in range(1000):
        budget.record_request(0.0)
    assert budget.remaining(9.99) == 300.0
    assert budget.remaining(10.0) == 100.0


def test_a_deposit_lasts_a_whole_window_so_the_next_aligned_window_may_spend_it() -> None:
    # What the bucketing guarantees, and not more: requests in bucket [1, 2) fund retries in
    # bucket [2, 3), so the aligned window [2, 4) holds 5 retries and no request at all.
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=2.0, buckets=2)
    for _ in range(10):
        budget.record_request(1.5)
    assert spend(budget, 2.5, 6) == 5
    assert not budget.try_spend(3.0)  # [2, 4): no deposit left
    assert budget.snapshot(3.0) == {"requests": 0, "retries": 5, "remaining": 0.0}


def test_one_bucket_is_a_fixed_window() -> None:
    budget = RetryBudget(min_per_second=1.0, window=10.0, buckets=1)
    assert spend(budget, 0.0, 11) == 10
    assert not budget.try_spend(9.99)
    assert spend(budget, 10.0, 11) == 10


def test_time_going_backwards_counts_in_the_newest_bucket() -> None:
    budget = RetryBudget(min_per_second=1.0, window=10.0, now=100.0)
    assert spend(budget, 100.0, 10) == 10
    assert not budget.try_spend(50.0)  # not a fresh window in the past
    budget.record_request(50.0)
    assert budget.snapshot(100.0)["requests"] == 1
    assert budget.remaining(109.99) == pytest.approx(0.2)
    assert budget.remaining(110.0) == 10.0


@pytest.mark.parametrize(
    "settings",
    [
        {"ratio": -0.1},
        {"ratio": math.nan},
        {"min_per_second": -1.0},
        {"window": 0.0},
        {"window": math.nan},
        {"buckets": 0},
    ],
)
def test_a_budget_refuses_nonsense_settings(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(**settings)  # type: ignore[arg-type]


QUARTER = 0.25  # times on a grid of quarter seconds, window / buckets too: exact floats


@given(
    ratio=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.25, 1.0]),
    window=st.sampled_from([1.0, 2.0, 4.0]),
    buckets=st.sampled_from([1, 2, 4]),
    start=st.integers(min_value=-8, max_value=8),
    ops=st.lists(st.tuples(st.integers(min_value=-6, max_value=6), st.booleans()), max_size=200),
)
def test_the_budget_spends_exactly_what_its_window_allows(
    ratio: float, min_per_second: float, window: float, buckets: int, start: int, ops: list[tuple[int, bool]]
) -> None:
    # A model: each event is counted in the newest bucket seen (time going back counts in it).
    floor = min_per_second * window
    width = window / buckets
    now = start * QUARTER
    budget = RetryBudget(ratio, min_per_second, window, now, buckets)
    newest = int(now // width)
    requests: Counter[int] = Counter()
    spent: Counter[int] = Counter()

    def total(counts: Counter[int], first: int, last: int) -> int:
        return sum(counts[b] for b in range(first, last + 1))

    for step, is_request in ops:
        now += step * QUARTER
        newest = max(newest, int(now // width))
        if is_request:
            budget.record_request(now)
            requests[newest] += 1
            continue
        first = newest - buckets + 1
        allowed = total(spent, first, newest) + 1 <= floor + ratio * total(requests, first, newest)
        assert budget.try_spend(now) is allowed
        spent[newest] += allowed

    # The guarantee: every aligned window ending with a bucket holding a retry spent no more
    # than its own allowance ...
    for last in (b for b, n in spent.items() if n):
        first = last - buckets + 1
        assert total(spent, first, last) <= floor + ratio * total(requests, first, last)
    # ... and every aligned window no more than one funded by it and the buckets - 1 before.
    if spent:
        for last in range(min(spent), max(spent) + buckets):
            first = last - buckets + 1
            assert total(spent, first, last) <= floor + ratio * total(requests, first - buckets + 1, last)
