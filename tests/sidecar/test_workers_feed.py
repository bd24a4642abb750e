"""When a --workers supervisor with a control plane answers a push (sidecar/workers.py,
Feed.settled): once every live worker applied it; with a worker's reason when one refused it;
a worker gone is not waited for; one that does not answer is not waited for forever."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sidecar import workers
from sidecar.app import SidecarOptions
from sidecar.workers import Feed, Worker


def _feed(count: int) -> tuple[Feed, list[Worker]]:
    options = SidecarOptions(service="user", app=("127.0.0.1", 1), control_plane=[("127.0.0.1", 1)], data_dir=None)
    team = [Worker(i) for i in range(count)]
    feed = Feed(options, team)
    for worker in team:
        worker.outbox, _ = trio.open_memory_channel[bytes](workers.OUTBOX)
    feed.seq = 3
    return feed, team


async def _settle_while(feed: Feed, step: object) -> str:
    answers: list[str] = []

    async def settle() -> None:
        answers.append(await feed.settled())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle)
        await trio.testing.wait_all_tasks_blocked()
        for change in step:  # type: ignore[attr-defined]
            assert answers == []  # not before every live worker answered
            change()
            feed.changed()
            await trio.testing.wait_all_tasks_blocked()
    return answers[0]


async def test_a_push_is_answered_once_every_live_worker_applied_it() -> None:
    feed, team = _feed(3)

    def gone() -> None:
        team[2].outbox = None  # died: its restart gets the current configuration anyway

    def applied(index: int) -> object:
        return lambda: setattr(team[index], "applied", 3)

    assert await _settle_while(feed, [applied(0), gone, applied(1)]) == ""


async def test_a_worker_that_refused_it_makes_it_a_nack_with_its_reason() -> None:
    feed, team = _feed(2)
    team[0].applied = 3

    def refused() -> None:
        team[1].refused = (3, "ConfigError: bad")

    assert await _settle_while(feed, [refused]) == "worker 1: ConfigError: bad"


async def test_a_worker_that_does_not_answer_is_not_waited_for_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "APPLY_TIMEOUT", 0.05)
    feed, team = _feed(2)
    team[0].applied = 3
    assert await feed.settled() == "worker(s) [1] did not apply it within 0.05s (restarted)"
