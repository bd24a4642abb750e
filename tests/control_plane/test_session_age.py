"""Sessions end after a maximum age (control_plane/session_age.py): each its own deadline
(± 10 %), a few per keepalive sweep, the most overdue first; told with an ``error``
(``session-age``) and closed only if the sidecar does not close within the grace."""

from __future__ import annotations

import random

import pytest

from control_plane.push import Session, SessionView
from control_plane.registry import Registry
from control_plane.server import PushServer
from control_plane.session_age import END_GRACE, ENDED_PER_SWEEP, JITTER, MaxAge, deadline
from meshlet import wire

from .test_hub import Recorder


class Fixed(random.Random):
    """uniform() returns its low bound, its high bound, or the next of given fractions of the range."""

    def __init__(self, *fractions: float) -> None:
        super().__init__(0)
        self.fractions = list(fractions)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fractions.pop(0)


def _session(node: str) -> tuple[Session, Recorder]:
    channel = Recorder()
    session = Session(
        node=node,
        service="svc",
        instance_id=node,
        conn=wire.ServerConnection("cp"),
        views={wire.ENDPOINTS: SessionView(), wire.POLICIES: SessionView()},
        connected_at=0.0,
        last_seen=0.0,
        channel=channel,
    )
    return session, channel


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.0, 100.0 + 60.0 * (1 - JITTER)), (0.5, 160.0), (1.0, 100.0 + 60.0 * (1 + JITTER))],
)
def test_a_deadline_is_the_age_from_the_connection_give_or_take_the_jitter(fraction: float, expected: float) -> None:
    assert deadline(100.0, 60.0, Fixed(fraction)) == pytest.approx(expected)


def test_deadlines_spread_over_the_jitter_and_an_age_of_zero_never_ends() -> None:
    rng = random.Random(7)
    ends = [deadline(0.0, 1800.0, rng) for _ in range(1000)]
    assert all(1620.0 <= end <= 1980.0 for end in ends)
    assert min(ends) < 1650.0 and max(ends) > 1950.0  # spread, not one instant
    assert deadline(5.0, 0.0, rng) == float("inf")


def test_a_sweep_ends_at_most_its_share_the_most_overdue_first_and_each_once() -> None:
    ages = MaxAge(10.0, Fixed(*[i / 40 for i in range(40)]))
    sessions = [_session(f"s{i}")[0] for i in range(40)]
    for session in reversed(sessions):  # the last connected has the earliest deadline
        ages.track(session, 0.0)
    first = ages.due(now=100.0, live=40)
    assert len(first) == ENDED_PER_SWEEP
    assert first == list(reversed(sessions))[:ENDED_PER_SWEEP]
    rest = ages.due(100.0, 40, limit=100)
    assert len(rest) == 40 - ENDED_PER_SWEEP and not set(rest) & set(first)
    assert ages.due(200.0, 40) == [] and ages.ended == 40


def test_only_sessions_past_their_deadline_and_still_open_are_ended() -> None:
    ages = MaxAge(10.0, Fixed(0.0, 1.0, 0.0))
    early, late, gone = (_session(n)[0] for n in ("early", "late", "gone"))
    for session in (early, late, gone):
        ages.track(session, 0.0)
    gone.closed = True
    assert ages.due(9.5, 3) == [early]  # late is due at 11
    assert ages.due(11.0, 3) == [late] and ages.ended == 2
    disabled = MaxAge(0.0, Fixed())
    disabled.track(early, 0.0)
    assert disabled.due(1e12, 1) == []


def test_a_session_told_to_go_is_closed_only_after_the_grace() -> None:
    ages = MaxAge(10.0, Fixed(0.0, 0.0))
    stays, leaves = _session("stays")[0], _session("leaves")[0]
    ages.track(stays, 0.0)
    ages.track(leaves, 0.0)
    assert ages.due(9.0, 2) == [stays, leaves]
    leaves.closed = True  # the sidecar closed its end, as told
    assert ages.overstayed(9.0 + END_GRACE) == []
    assert ages.overstayed(9.1 + END_GRACE) == [stays]
    assert ages.overstayed(100.0) == []


def test_entries_of_closed_sessions_are_let_go_when_they_outnumber_the_open_ones() -> None:
    ages = MaxAge(1000.0, random.Random(1))
    for i in range(3000):  # a sidecar that reconnects often: one entry per session
        session = _session(f"s{i}")[0]
        ages.track(session, 0.0)
        session.closed = True
    ages.due(0.0, live=1)
    assert len(ages._due) == 0


def test_the_server_tells_due_sessions_with_a_session_age_error_and_closes_those_that_stay() -> None:
    server = PushServer(Registry(ttl=10.0), max_session_age=60.0, rng=Fixed(*[0.5] * 12))
    channels = []
    for i in range(12):
        session, channel = _session(f"s{i}")
        server.hub.add(session)
        server.max_age.track(session, 0.0)
        channels.append(channel)
    server._end_aged(59.0)
    assert [c.frames for c in channels] == [[]] * 12  # not yet due
    server._end_aged(60.0)
    told = [c for c in channels if c.frames]
    assert len(told) == ENDED_PER_SWEEP and server.max_age.ended == ENDED_PER_SWEEP
    for channel in told:
        (frame,) = channel.frames
        assert isinstance(frame, wire.Error) and frame.reason == wire.SESSION_AGE
    assert not any(c.closed for c in channels)  # the sidecar closes first
    server._end_aged(60.5)
    assert sum(1 for c in channels if c.frames) == 12
    server._end_aged(60.0 + END_GRACE + 0.1)
    assert [c for c in channels if c.closed] == told
