"""Retries: how long to wait before one, what a ``Retry-After`` asks for, and whether the
budget allows one. Pure: the time (``now``, float seconds) and the randomness (``rng``) are
passed in.

* ``backoff``: AWS's "full jitter", as Envoy's retry back-off (base 25 ms, cap 250 ms):
  retry ``n`` (1, 2, ...) waits uniformly in ``[0, min(cap, base * 2 ** (n - 1)))``.
* ``parse_retry_after``: RFC 9110 §10.2.3, delay-seconds or an HTTP-date, as seconds from
  now; the caller decides what is too long (Envoy drops a header over its ``max_interval``).
* ``RetryBudget``: Linkerd's retry budget (linkerd2-proxy's, tower's ``TpsBudget``): every
  original request deposits ``ratio`` of a retry, and ``min_per_second`` retries a second
  are allowed on top, so retries add at most ``ratio`` load plus a floor, however sick the
  upstream. Deposits and withdrawals live for one window (``ttl`` in Linkerd).

The budget's window is a ring of ``buckets`` buckets of ``window / buckets`` seconds: at
``now`` it holds the bucket ``now`` falls in and the ``buckets - 1`` before it, so it spans
``window`` seconds aligned to bucket boundaries (at least ``window - window / buckets`` of
the past). What that guarantees, precisely: for every such window ``W`` ending with a
bucket in which a retry was spent, the retries spent in ``W`` never exceed
``min_per_second * window + ratio * (requests in W)``. A window ending with a bucket
without a retry may hold retries funded by requests from before it (a deposit lasts a whole
window, in Linkerd too), so for every aligned window the bound holds with the requests of
the window and of the ``buckets - 1`` buckets before it.
"""

from __future__ import annotations

import random
from datetime import UTC
from email.utils import parsedate_to_datetime

# 2.0 ** 1024 overflows; 2.0 ** 1023 times any sane base is past any sane cap.
_MAX_DOUBLINGS = 1023
# The longest HTTP-date, RFC 850's "Wednesday, 09-Nov-94 08:49:37 GMT", has 33 characters.
_MAX_DATE = 64


def backoff(retry: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first; below 1 counts as 1).

    Uniform in ``[0, min(cap, base * 2 ** (retry - 1)))`` (``rng.random()`` times the
    ceiling): never negative, never above ``cap``, whatever the retry number.
    """
    doublings = min(max(retry - 1, 0), _MAX_DOUBLINGS)
    ceiling = max(0.0, min(cap, base * 2.0**doublings))  # a float product overflows to inf, not an error
    return ceiling * rng.random()


def parse_retry_after(value: bytes, now_epoch: float) -> float | None:
    """A ``Retry-After`` value as seconds from ``now_epoch`` (Unix time), or None if invalid.

    Delay-seconds (``1*DIGIT``; one too large for a float is ``inf``), or an HTTP-date as
    ``email.utils`` reads one: IMF-fixdate, the obsolete RFC 850 and asctime forms, and the
    other RFC 5322 dates it accepts (a numeric zone; no zone, as asctime, is GMT). A date in
    the past is ``0.0``. Not capped: the caller decides what is too long.
    """
    value = value.strip()
    if value.isdigit():  # bytes.isdigit: ASCII digits only, so no sign, "_", or other scripts
        return float(value)
    if not value or len(value) > _MAX_DATE or not value.isascii():
        return None
    try:
        when = parsedate_to_datetime(value.decode("ascii"))
    except (ValueError, TypeError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch)


class RetryBudget:
    """Linkerd's retry budget over a rolling window of buckets (see the module docstring).

    ``record_request`` deposits for one original request; ``try_spend`` withdraws one retry
    if ``retries + 1 <= min_per_second * window + ratio * requests`` over the window, and
    counts nothing when it refuses. Time going backwards counts in the newest bucket.
    """

    __slots__ = (
        "ratio",
        "min_per_second",
        "window",
        "_floor",
        "_width",
        "_requests",
        "_retries",
        "_epoch",
        "_total_requests",
        "_total_retries",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        now: float = 0.0,
        buckets: int = 10,
    ) -> None:
        if not ratio >= 0 or not min_per_second >= 0:  # "not >=" also refuses NaN
            raise ValueError("a retry budget's ratio and min_per_second must be >= 0")
        if not window > 0 or buckets < 1:
            raise ValueError("a retry budget needs a window > 0 and at least one bucket")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._floor = min_per_second * window
        self._width = window / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._epoch = int(now // self._width)  # the number of the newest bucket, from time 0
        self._total_requests = 0  # the sums over the ring, so a check costs no loop
        self._total_retries = 0

    def _advance(self, now: float) -> int:
        """Expire the buckets that left the window; the index of the bucket to count in."""
        epoch = int(now // self._width)
        n = len(self._requests)
        passed = epoch - self._epoch
        if passed > 0:
            requests, retries = self._requests, self._retries
            if passed >= n:
                for i in range(n):
                    requests[i] = retries[i] = 0
                self._total_requests = self._total_retries = 0
            else:
                for e in range(self._epoch + 1, epoch + 1):
                    i = e % n
                    self._total_requests -= requests[i]
                    self._total_retries -= retries[i]
                    requests[i] = retries[i] = 0
            self._epoch = epoch
        return self._epoch % n

    def record_request(self, now: float) -> None:
        """Count one original request (not a retry): a deposit of ``ratio`` of a retry."""
        i = self._advance(now)
        self._requests[i] += 1
        self._total_requests += 1

    def try_spend(self, now: float) -> bool:
        """Withdraw one retry if the budget allows it; False (and nothing counted) if not."""
        i = self._advance(now)
        if self._total_retries + 1 > self._floor + self.ratio * self._total_requests:
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True

    def remaining(self, now: float) -> float:
        """Retries the window still allows (a fraction means: not one yet)."""
        self._advance(now)
        return max(0.0, self._floor + self.ratio * self._total_requests - self._total_retries)

    def snapshot(self, now: float) -> dict[str, float]:
        """The window's counts, for ``meshlet explain``."""
        self._advance(now)
        return {
            "requests": self._total_requests,
            "retries": self._total_retries,
            "remaining": self.remaining(now),
        }


__all__ = ["RetryBudget", "backoff", "parse_retry_after"]
