"""Sessions end after a maximum age, so that sidecars spread again over the replicas.

A replica that restarts has no sidecars: they all moved to the others. Ending every
session after a maximum age (Istio's ``MAX_CONNECTION_AGE``: 30 min ± 10 %) makes each
sidecar reconnect now and then, to the next address it was given, which rebalances the
load. The jitter keeps sessions that began together from ending together; at most
``ENDED_PER_SWEEP`` are ended per keepalive sweep, so a replica never sheds thousands of
sidecars in one tick.

Ending is graceful: the sidecar is told (an ``error`` with reason ``session-age``) and
closes its end; the control plane closes only a sidecar that has not after ``END_GRACE``.
Its registration stays: the lease covers the reconnect.

Pure: the time and the random numbers are passed in.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque

from .push import Session

MAX_SESSION_AGE = 30 * 60.0  # --max-session-age's default; 0 disables
JITTER = 0.1  # a session's age is MAX_SESSION_AGE × uniform(1 - JITTER, 1 + JITTER)
ENDED_PER_SWEEP = 10  # sessions told to go per keepalive sweep (0.5 s): 20 a second at most
END_GRACE = 5.0  # seconds a sidecar told to go has to close its end before it is closed


def deadline(connected_at: float, age: float, rng: random.Random) -> float:
    """When a session that began at ``connected_at`` is due to end: ``age`` ± ``JITTER``;
    never (infinity) when ``age`` is 0."""
    if age <= 0:
        return float("inf")
    return connected_at + age * rng.uniform(1 - JITTER, 1 + JITTER)


class MaxAge:
    """The sessions' deadlines, soonest first (a heap: a sweep costs what it ends, not the
    number of sessions), and the sessions told to go, until their grace runs out."""

    def __init__(self, age: float, rng: random.Random) -> None:
        self.age = age
        self.rng = rng
        self.ended = 0  # sessions told to go (meshlet_cp_sessions_ended_total{reason="max-age"})
        self._due: list[tuple[float, int, Session]] = []
        self._order = itertools.count()  # ties of deadlines: sessions do not compare
        self._told: deque[tuple[float, Session]] = deque()  # told at, in that order

    def track(self, session: Session, now: float) -> None:
        """A new session: its deadline, from ``now``."""
        end_by = deadline(now, self.age, self.rng)
        if end_by == float("inf"):
            return
        heapq.heappush(self._due, (end_by, next(self._order), session))

    def due(self, now: float, live: int, limit: int = ENDED_PER_SWEEP) -> list[Session]:
        """The sessions to tell to go now (at most ``limit``, the most overdue first), recorded
        as told. ``live``: the sessions open, to let go of the entries of closed ones when they
        outnumber them (a sidecar that reconnects often leaves one per session)."""
        if len(self._due) > 2 * live + 1024:
            self._due = [entry for entry in self._due if not entry[2].closed]
            heapq.heapify(self._due)
        out: list[Session] = []
        while self._due and len(out) < limit and self._due[0][0] <= now:
            session = heapq.heappop(self._due)[2]
            if session.closed:
                continue
            out.append(session)
            self._told.append((now, session))
        self.ended += len(out)
        return out

    def overstayed(self, now: float) -> list[Session]:
        """Sessions told to go more than ``END_GRACE`` ago that are still open: to close."""
        out: list[Session] = []
        while self._told and now - self._told[0][0] > END_GRACE:
            session = self._told.popleft()[1]
            if not session.closed:
                out.append(session)
        return out


__all__ = ["END_GRACE", "ENDED_PER_SWEEP", "JITTER", "MAX_SESSION_AGE", "MaxAge", "deadline"]
