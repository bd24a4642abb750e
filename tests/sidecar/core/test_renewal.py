"""sidecar.core.renewal: when to renew, what a certificate is at a time, and the back-off
after a failed renewal, on fake times and a fixed rng."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.renewal import RETRY_CAP, renew_after_rotation, renew_at, retry_delay, state

HOUR = 3600.0
DAY = 24 * HOUR
T0 = 1_800_000_000.0  # a not_before


class Fixed(random.Random):
    """An rng whose random() is always ``value``: the ends of every jitter."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (0.0, T0 + 16 * HOUR),  # no jitter: 2/3 of 24 h
        (0.5, T0 + 16 * HOUR - 0.05 * DAY),
        (0.999999, T0 + 16 * HOUR - 0.0999999 * DAY),  # the most jitter: 13.6 h
    ],
)
def test_renew_at_two_thirds_less_jitter(draw: float, expected: float) -> None:
    assert renew_at(T0, T0 + DAY, Fixed(draw)) == pytest.approx(expected)


@pytest.mark.parametrize(("not_before", "not_after"), [(T0, T0), (T0, T0 - 1), (T0, float("inf")), (float("nan"), T0)])
def test_renew_at_refuses_a_validity_that_does_not_end_after_it_starts(not_before: float, not_after: float) -> None:
    with pytest.raises(ValueError, match="must end after it starts"):
        renew_at(not_before, not_after, Fixed(0.0))


@given(
    st.floats(0, 4e9),
    st.floats(1e-3, 400 * DAY),
    st.integers(0, 2**32),
)
def test_renew_at_is_within_the_window(not_before: float, lifetime: float, seed: int) -> None:
    not_after = not_before + lifetime
    at = renew_at(not_before, not_after, random.Random(seed))
    span = not_after - not_before
    assert not_before <= at < not_after
    assert at <= not_before + span * 2 / 3 + 1e-6 * span
    assert at >= not_before + span * (2 / 3 - 0.10) - 1e-6 * span


def test_renew_at_spreads_a_fleet() -> None:
    rng = random.Random(5)
    times = [renew_at(T0, T0 + DAY, rng) for _ in range(1000)]
    assert max(times) - min(times) > 0.09 * DAY  # the whole jitter window is used


RENEW = T0 + 16 * HOUR
STATES = [
    # now, expected
    (T0 - 60, "valid"),  # not valid yet: a clock behind the CA's; renewing would not help
    (T0, "valid"),
    (RENEW - 0.001, "valid"),
    (RENEW, "renew"),
    (T0 + DAY - 0.001, "renew"),
    (T0 + DAY, "expired"),
    (T0 + 10 * DAY, "expired"),
]


@pytest.mark.parametrize(("now", "expected"), STATES)
def test_state(now: float, expected: str) -> None:
    assert state(now, T0, T0 + DAY, RENEW) == expected


def test_state_refuses_a_backwards_validity() -> None:
    with pytest.raises(ValueError):
        state(T0, T0 + DAY, T0, RENEW)


EXPIRY = T0 + DAY
RETRIES = [
    # attempt, now, draw, expected delay
    (1, RENEW, 0.5, 0.5),  # base 1 s: uniform in [0, 1)
    (2, RENEW, 0.5, 1.0),
    (3, RENEW, 0.5, 2.0),
    (6, RENEW, 0.5, 16.0),
    (7, RENEW, 0.5, 30.0),  # 64 s, capped at 60 s
    (10_000, RENEW, 0.999, 0.999 * RETRY_CAP),  # no overflow, still the cap
    (0, RENEW, 0.5, 0.5),  # below 1 counts as 1
    (-5, RENEW, 0.5, 0.5),
    (1, RENEW, 0.0, 0.0),  # full jitter reaches 0
    (8, EXPIRY - 10, 0.5, 10.0),  # would be 30 s: cut to expiry
    (8, EXPIRY - 10, 0.1, 6.0),  # shorter than the time left: as drawn
    (8, EXPIRY - 0.5, 0.9, 0.5),
    (8, EXPIRY, 0.5, 30.0),  # expired: plain back-off, keep asking
    (8, EXPIRY + HOUR, 0.5, 30.0),
]


@pytest.mark.parametrize(("attempt", "now", "draw", "expected"), RETRIES)
def test_retry_delay(attempt: int, now: float, draw: float, expected: float) -> None:
    assert retry_delay(attempt, now, EXPIRY, Fixed(draw)) == pytest.approx(expected)


def test_retry_delay_takes_base_and_cap() -> None:
    assert retry_delay(3, RENEW, EXPIRY, Fixed(0.5), base=0.1, cap=10.0) == pytest.approx(0.2)
    assert retry_delay(30, RENEW, EXPIRY, Fixed(0.5), base=0.1, cap=10.0) == pytest.approx(5.0)


@given(st.integers(-10, 5000), st.floats(0, 2 * DAY), st.integers(0, 2**32))
def test_retry_delay_bounds(attempt: int, elapsed: float, seed: int) -> None:
    now = T0 + elapsed
    delay = retry_delay(attempt, now, EXPIRY, random.Random(seed))
    assert 0.0 <= delay <= RETRY_CAP
    if now < EXPIRY:
        assert now + delay <= EXPIRY


def test_a_failing_renewal_keeps_trying_until_expiry_and_after() -> None:
    """The loop a sidecar runs: from the renewal time, retries on a fake clock never skip
    past expiry, so one lands exactly at or before it, and they continue after."""
    rng = random.Random(3)
    now, attempt, times = RENEW, 0, []
    while now < EXPIRY + HOUR:
        attempt += 1
        now += retry_delay(attempt, now, EXPIRY, rng)
        times.append(now)
    before = [t for t in times if t <= EXPIRY]
    assert before and EXPIRY - before[-1] <= RETRY_CAP
    assert any(t > EXPIRY for t in times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) <= RETRY_CAP


@pytest.mark.parametrize(
    ("lifetime", "draw", "now", "expected"),
    [
        (HOUR, 0.0, T0 + 10, T0 + 10),  # at once
        (HOUR, 0.5, T0 + 10, T0 + 10 + 180),  # within 10 % of the lifetime
        (DAY, 0.5, T0 + 10, T0 + 10 + 150),  # within 5 minutes at most
        (HOUR, 0.999, T0 + HOUR - 5, T0 + HOUR),  # never past the certificate's end
    ],
)
def test_renew_after_rotation_is_soon_and_spread(lifetime: float, draw: float, now: float, expected: float) -> None:
    assert renew_after_rotation(now, T0, T0 + lifetime, Fixed(draw)) == pytest.approx(expected)
