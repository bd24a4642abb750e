"""The replica engine's pure-enough parts: its id, and the leader's compaction job on a fake clock."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from control_plane.etcd import EtcdUnavailable
from control_plane.replicas.engine import compact_history, replica_id
from control_plane.replicas.records import REPLICA_ID


@pytest.mark.parametrize(
    ("hostname", "start"),
    [("vm-1", "vm-1-"), ("Control_Plane.example.com", "control-plane.example.com-"), ("", "cp-"), ("---", "cp-")],
)
def test_a_replica_id_is_its_host_and_some_randomness(hostname: str, start: str) -> None:
    made = replica_id(hostname, random.Random(7))
    assert made.startswith(start) and REPLICA_ID.fullmatch(made)
    assert made != replica_id(hostname, random.Random(8))  # a restarted replica is a new one


class FakeEtcd:
    def __init__(self, fail: int = 0) -> None:
        self.compacted: list[tuple[float, int]] = []
        self.fail = fail

    async def compact(self, revision: int) -> None:
        if self.fail:
            self.fail -= 1
            raise EtcdUnavailable("no etcd member answered /v3/kv/compaction")
        self.compacted.append((trio.current_time(), revision))


async def test_the_leader_compacts_to_what_the_history_was_a_retention_ago(
    autojump_clock: trio.testing.MockClock,
) -> None:
    etcd = FakeEtcd(fail=1)
    revision = 100

    def now_revision() -> int:
        return revision

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(compact_history, etcd, now_revision, 60.0, 10.0)
        await trio.sleep(5.0)
        for _ in range(12):  # the revision grows by 10 every interval, between the job's samples
            revision += 10
            await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    # Nothing before a whole retention has passed; then, every interval, the revision of 60 s
    # earlier. The first try failed (etcd away): it was tried again at the next interval.
    assert [(round(at - start), rev) for at, rev in etcd.compacted] == [
        (70, 110),
        (80, 120),
        (90, 130),
        (100, 140),
        (110, 150),
        (120, 160),
    ]
