"""control_plane.etcd on three real etcd members: a watch resumes on another member when its
member dies, with every revision exactly once and in order; without quorum writes fail within a
bound and the watch says why; after a restart both resume with nothing lost."""

from __future__ import annotations

import signal

import pytest
import trio

from control_plane.etcd import Etcd, EtcdUnavailable, Watch

from ..etcd_cluster import EtcdCluster

WAIT = 30.0  # the bound on an election plus a reconnect, on a loaded machine
TIMEOUT = 2.0  # per request: a put stalled on a lost leader moves on to the next member sooner
PREFIX = b"/test/cluster/"


class Collector:
    """Reads a watch in the background: every event's revision, in the order delivered."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.revisions: list[int] = []
        self.keys: set[bytes] = set()
        self._batch = trio.Event()

    async def run(self) -> None:
        async for batch in self.watch:
            for event in batch.events:
                self.revisions.append(event.kv.mod_revision)
                self.keys.add(event.kv.key)
            self._batch.set()
            self._batch = trio.Event()

    async def until(self, revision: int) -> None:
        with trio.fail_after(WAIT):
            while self.watch.last_revision < revision:
                await self._batch.wait()


async def write(etcd: Etcd, key: bytes) -> int:
    """Put, retrying while the cluster elects a leader (a retry may make one more revision)."""
    with trio.fail_after(WAIT):
        while True:
            try:
                return await etcd.put(key, b"v")
            except EtcdUnavailable:
                continue


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
async def test_the_leader_dies_during_writes(etcd3: EtcdCluster, signum: int) -> None:
    leader = await etcd3.leader()
    others = [m.client_url for m in etcd3.members if m.name != leader]
    on_leader = [etcd3.member(leader).client_url, *others]  # the watch starts on the member to die
    async with Etcd(on_leader, timeout=TIMEOUT) as watcher, Etcd(others, timeout=TIMEOUT) as writer:
        start = await write(writer, PREFIX + b"start")
        async with trio.open_nursery() as nursery, watcher.watch(PREFIX, start) as watch:
            collector = Collector(watch)
            nursery.start_soon(collector.run)
            written = [start]
            for n in range(30):
                if n == 10:
                    await collector.until(written[-1])
                    await etcd3.kill(leader, signum)
                written.append(await write(writer, PREFIX + b"%02d" % n))
            await collector.until(written[-1])
            nursery.cancel_scope.cancel()
        assert watch.reconnects >= 1  # it moved off the member that died
    # exactly once and in order: only this test writes, so etcd's revisions are contiguous
    assert collector.revisions == list(range(start, collector.revisions[-1] + 1))
    assert set(written) <= set(collector.revisions)
    assert len(collector.keys) == 31


async def test_quorum_lost_then_restored(etcd3: EtcdCluster) -> None:
    async with Etcd(etcd3.endpoints, timeout=TIMEOUT) as etcd:
        start = await write(etcd, PREFIX + b"before")
        async with trio.open_nursery() as nursery, etcd.watch(PREFIX, start) as watch:
            collector = Collector(watch)
            nursery.start_soon(collector.run)
            await collector.until(start)
            assert watch.connected
            down = [m.name for m in etcd3.members[:2]]
            for name in down:
                await etcd3.kill(name, signal.SIGKILL)

            with trio.fail_after(WAIT):  # each member tried, the last one waits TIMEOUT at most
                with pytest.raises(EtcdUnavailable) as info:
                    await etcd.put(PREFIX + b"lost", b"v")
            message = str(info.value)
            for m in etcd3.members:
                assert m.client_url in message  # every member named, with why
            assert "cannot connect" in message
            with trio.fail_after(WAIT):
                while watch.connected:  # noqa: ASYNC110 - the member left has no leader: the stream fails
                    await trio.sleep(0.02)  # (the collector's task sees it; a bounded poll of its state)
            assert watch.error != ""

            for name in down:
                await etcd3.start(name)
            after = [await write(etcd, PREFIX + b"after%d" % n) for n in range(5)]
            await collector.until(after[-1])
            assert watch.connected and watch.error == ""
            nursery.cancel_scope.cancel()
    assert collector.revisions == list(range(start, after[-1] + 1))
