"""Circuit breakers (docs/policy.md), as Hystrix and resilience4j have them. Pure: the time ``now``
(float seconds, monotonic) is always passed in; nothing here reads a clock or sleeps.

One breaker per destination (built from a validated ``CircuitBreaker`` policy,
meshlet/policy.py), asked by the outbound sidecar before every call:

* CLOSED: every call is admitted. Calls are counted in a rolling window (``window`` seconds,
  a ring of ``buckets`` buckets of ``window / buckets`` seconds): calls, failures, slow calls
  (duration >= ``slow_threshold``; a slow failure counts as both). Buckets are dropped lazily,
  as ``record``/``snapshot`` see the time move, so a call counts for between
  ``window - window / buckets`` and ``window`` seconds. It opens when the window holds at least
  ``min_requests`` calls and failures / calls >= ``failure_ratio``, or (with a
  ``slow_threshold``) slow / calls >= ``slow_ratio``.
* OPEN: every call is rejected until ``open_for`` seconds after it opened; then the next
  ``admit`` moves it to HALF_OPEN (no timer: ``state`` stays OPEN until that admit).
* HALF_OPEN: ``half_open_requests`` trial calls in all are admitted, the rest rejected. A trial
  that fails (or is slow, with a ``slow_threshold``) opens it again at once; when every trial
  has succeeded it closes, with an empty window.

Every transition starts a new generation, and ``admit`` hands out the generation as its permit:
``record`` ignores a permit from an older one, so a call admitted while CLOSED that ends during
HALF_OPEN is never taken for a trial, and a trial ending after the breaker reopened changes
nothing. ``release`` gives back a trial slot for a call that ended with no outcome (the client
went away). Each permit must be recorded or released once, not both.

``force``: ``"open"`` rejects everything (state OPEN); ``"closed"`` admits everything and keeps
counting (for the metrics) but never opens.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2  # the values are the metric meshlet_circuit_state


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    window: float = 10.0
    buckets: int = 10
    min_requests: int = 20
    failure_ratio: float = 0.5
    open_for: float = 5.0
    half_open_requests: int = 1
    slow_threshold: float | None = None
    slow_ratio: float = 1.0
    force: str | None = None  # "open" | "closed" | None

    def __post_init__(self) -> None:
        if not self.window > 0 or self.buckets < 1:
            raise ValueError("a breaker needs window > 0 and buckets >= 1")
        if self.min_requests < 1 or self.half_open_requests < 1:
            raise ValueError("a breaker needs min_requests >= 1 and half_open_requests >= 1")
        if self.force not in (None, "open", "closed"):
            raise ValueError(f"force must be 'open', 'closed' or None, not {self.force!r}")


class _Window:
    """Counts over the last ``buckets`` buckets: a ring, with running totals."""

    __slots__ = ("_width", "_origin", "_epoch", "_calls", "_failures", "_slow", "calls", "failures", "slow")

    def __init__(self, window: float, buckets: int, now: float) -> None:
        self._width = window / buckets
        self._origin = now
        self._epoch = 0  # the bucket number (since _origin) of the newest bucket
        self._calls = [0] * buckets
        self._failures = [0] * buckets
        self._slow = [0] * buckets
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def advance(self, now: float) -> int:
        """Drop the buckets that ``now`` leaves behind; the ring index of ``now``'s bucket."""
        epoch = int((now - self._origin) // self._width)
        n = len(self._calls)
        newest = self._epoch
        if epoch <= newest:  # a ``now`` a little behind another task's: the newest bucket
            return newest % n
        if epoch - newest >= n:
            self._zero()
        else:
            calls, failures, slow = self._calls, self._failures, self._slow
            while newest < epoch:
                newest += 1
                i = newest % n
                self.calls -= calls[i]
                self.failures -= failures[i]
                self.slow -= slow[i]
                calls[i] = failures[i] = slow[i] = 0
        self._epoch = epoch
        return epoch % n

    def add(self, now: float, failed: bool, slow: bool) -> None:
        i = self.advance(now)
        self._calls[i] += 1
        self.calls += 1
        if failed:
            self._failures[i] += 1
            self.failures += 1
        if slow:
            self._slow[i] += 1
            self.slow += 1

    def clear(self, now: float) -> None:
        self.advance(now)
        self._zero()

    def _zero(self) -> None:
        n = len(self._calls)
        self._calls[:] = self._failures[:] = self._slow[:] = [0] * n
        self.calls = self.failures = self.slow = 0


class CircuitBreaker:
    """One destination's breaker. ``on_transition(old, new)`` is called after each change."""

    __slots__ = (
        "config",
        "_on_transition",
        "_state",
        "_generation",
        "_window",
        "_reopen_at",
        "_trials",
        "_succeeded",
        "_slow_threshold",
    )

    def __init__(
        self,
        config: BreakerConfig,
        now: float,
        on_transition: Callable[[State, State], None] | None = None,
    ) -> None:
        self.config = config
        self._on_transition = on_transition
        self._generation = 0
        self._window = _Window(config.window, config.buckets, now)
        self._trials = 0  # HALF_OPEN: permits handed out (and not released) in this generation
        self._succeeded = 0  # HALF_OPEN: of them, recorded as successes
        # None and +inf both mean "no call is slow": one comparison on the request path.
        self._slow_threshold = math.inf if config.slow_threshold is None else config.slow_threshold
        if config.force == "open":
            self._state = State.OPEN
            self._reopen_at = math.inf
        else:
            self._state = State.CLOSED
            self._reopen_at = 0.0

    @property
    def state(self) -> State:
        """As of the last ``admit``/``record``: OPEN stays OPEN until an admit after ``open_for``."""
        return self._state

    @property
    def forced(self) -> str | None:
        return self.config.force

    def admit(self, now: float) -> int | None:
        """A permit for one call (pass it to ``record`` or ``release``), or None: rejected."""
        state = self._state
        if state is State.CLOSED:
            return self._generation
        if state is State.OPEN:
            if now < self._reopen_at:
                return None
            self._move(State.HALF_OPEN, now)
        if self._trials >= self.config.half_open_requests:
            return None
        self._trials += 1
        return self._generation

    def record(self, now: float, permit: int, failed: bool, duration: float) -> None:
        """The outcome of an admitted call; one from an earlier generation changes nothing."""
        if permit != self._generation:
            return
        state = self._state
        slow = duration >= self._slow_threshold
        if state is State.CLOSED:
            window = self._window
            window.add(now, failed, slow)
            if self.config.force is None and self._tripped(window):
                self._move(State.OPEN, now)
        elif state is State.HALF_OPEN and self._succeeded < self._trials:
            if failed or slow:
                self._move(State.OPEN, now)
                return
            self._succeeded += 1
            if self._succeeded >= self.config.half_open_requests:
                self._move(State.CLOSED, now)

    def release(self, permit: int) -> None:
        """An admitted call ended with no outcome: a HALF_OPEN trial slot is free again."""
        if permit == self._generation and self._state is State.HALF_OPEN and self._trials > self._succeeded:
            self._trials -= 1

    def retry_after(self, now: float) -> float:
        """Seconds until an OPEN breaker lets a trial through; 0 if not OPEN. Forced open never
        does: then ``open_for``, as a hint for a ``Retry-After``, not a promise."""
        if self._state is not State.OPEN:
            return 0.0
        if self.config.force == "open":
            return self.config.open_for
        return max(0.0, self._reopen_at - now)

    def snapshot(self, now: float) -> dict[str, Any]:
        """For ``meshlet explain`` and the admin endpoint. Drops expired buckets, changes no state."""
        window = self._window
        window.advance(now)
        calls = window.calls
        state = self._state
        waiting = state is State.OPEN and self.config.force is None
        return {
            "state": state.name.lower(),
            "forced": self.config.force,
            "calls": calls,
            "failures": window.failures,
            "slow": window.slow,
            "failure_rate": window.failures / calls if calls else 0.0,
            "slow_rate": window.slow / calls if calls else 0.0,
            "min_requests": self.config.min_requests,
            "half_open_in_s": self.retry_after(now) if waiting else None,  # None: not OPEN, or forced
            "trials_left": self.config.half_open_requests - self._trials if state is State.HALF_OPEN else 0,
        }

    def _tripped(self, window: _Window) -> bool:
        calls = window.calls
        config = self.config
        if calls < config.min_requests:
            return False
        # Divisions, not products: 3/30 == 0.1 but 0.1 * 30 > 3.
        if window.failures / calls >= config.failure_ratio:
            return True
        return config.slow_threshold is not None and window.slow / calls >= config.slow_ratio

    def _move(self, new: State, now: float) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        if new is State.OPEN:
            self._reopen_at = now + self.config.open_for
            self._window.clear(now)
        elif new is State.HALF_OPEN:
            self._trials = self._succeeded = 0
        else:
            self._window.clear(now)
        if self._on_transition is not None:
            self._on_transition(old, new)


__all__ = ["BreakerConfig", "CircuitBreaker", "State"]
