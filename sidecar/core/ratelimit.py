"""Local rate limits: a token bucket per limit, as Envoy's ``local_ratelimit`` filter, but
refilled continuously (``rate`` tokens a second, up to ``burst``) rather than by a timer's
``tokens_per_fill``. Pure: the time (``now``, float seconds, monotonic) is passed in.

The bucket starts full. A request takes one token or is refused (429, with ``retry_after``
for its ``Retry-After``). Time going backwards, a clock jump, adds nothing: the bucket
refills from the latest time it has seen, so over any sequence of calls it gives at most
``burst + rate * (latest time - creation time)`` tokens.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "_full", "_tokens", "_last")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if not rate > 0 or burst < 1:  # "not >" also refuses NaN
            raise ValueError("a token bucket needs a rate > 0 and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._full = float(burst)
        self._tokens = self._full
        self._last = now  # the latest time seen: the refill is counted up to here

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._full, self._tokens + self.rate * elapsed)
            self._last = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def tokens(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def retry_after(self, now: float) -> float:
        """Seconds from ``now`` until a token is there (0.0 if one is), if nobody takes it first.

        Round it up for a ``Retry-After`` header (whole seconds).
        """
        self._refill(now)
        if self._tokens >= 1:
            return 0.0
        # After a jump back, the refill only starts again at the latest time seen.
        return (self._last - now) + (1 - self._tokens) / self.rate


__all__ = ["TokenBucket"]
