"""A replica's sessions, written through to etcd.

The push server's sessions change :class:`WriteThrough` as they would change a registry
(control_plane/registry.py ``Registrar``). It keeps this replica's sessions in a registry of its own,
``mine``, with the single control plane's rules: a lease renewed by any message, a dropped channel
that keeps its instance until the TTL runs out, self-preservation when many lapse together. Each
change that the rest of the mesh sees is handed to a :class:`Writer`, which puts it in etcd; what the
sidecars are pushed then comes back from etcd's watch (control_plane/replicas/shared.py), the same on
every replica.

The writer keeps the latest wanted state per instance, not a log: while etcd is slow or away, many
changes of one instance become one write. Registrations are written unconditionally (a sidecar that
moved here from another replica takes its key over, under this replica's lease), in transactions of
up to :data:`TXN_OPS` puts. Everything after a registration (readiness, a dropped channel, a goodbye,
an expiry) is written only if the key is still under this replica's lease: a sidecar that has moved
on to another replica is that replica's, and this one's late news must not undo it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..etcd import Compare, EtcdError, Op
from ..etcd.store import TXN_OPS, EtcdStore
from ..registry import ExpiryResult, Instance, Registry
from .records import encode_instance, instance_key

log = logging.getLogger("meshlet.cp.replicas")

GUARDED_AT_ONCE = 16  # conditional writes in flight together
RETRY_FIRST = 0.2
RETRY_MAX = 5.0


@dataclass(slots=True)
class _Wanted:
    value: bytes | None  # None: delete
    guarded: bool  # only while the key is under this replica's lease


class Writer:
    def __init__(self, store: EtcdStore, lease: Callable[[], int]) -> None:
        self.store = store
        self.lease = lease  # this replica's lease now (it changes when etcd lost it)
        self._wanted: dict[str, _Wanted] = {}
        self._wake = trio.Event()
        self.error = ""  # why the last write failed ("" once one succeeds)
        self.written_total = 0
        self.superseded_total = 0  # guarded writes dropped: another replica holds the key now

    @property
    def backlog(self) -> int:
        return len(self._wanted)

    def put(self, instance_id: str, value: bytes, *, guarded: bool) -> None:
        old = self._wanted.get(instance_id)
        # A registration still waiting makes what follows it unconditional too: it is all ours.
        self._wanted[instance_id] = _Wanted(value, guarded and (old is None or old.guarded))
        self._wake.set()

    def delete(self, instance_id: str) -> None:
        # Always guarded, even right after a registration still waiting here: then nothing of
        # ours may be in etcd, and the key, if any, is another replica's.
        self._wanted[instance_id] = _Wanted(None, True)
        self._wake.set()

    async def run(self) -> None:
        delay = RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._wanted = self._wanted, {}
            try:
                await self._write(batch)
            except EtcdError as exc:
                self.error = str(exc)
                log.warning("etcd: %d registry writes wait (%s); retrying in %.1f s", len(batch), exc, delay)
                for instance_id, wanted in batch.items():
                    self._wanted.setdefault(instance_id, wanted)  # anything newer wins
                self._wake.set()
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            self.error = ""
            delay = RETRY_FIRST

    async def _write(self, batch: dict[str, _Wanted]) -> None:
        lease = self.lease()
        free = [(i, w.value) for i, w in batch.items() if not w.guarded and w.value is not None]
        for start in range(0, len(free), TXN_OPS):
            chunk = free[start : start + TXN_OPS]
            ops = [Op.put(self.store.key(instance_key(i)), value, lease=lease) for i, value in chunk]
            await self.store.etcd.txn((), ops)
            for instance_id, _ in chunk:
                del batch[instance_id]
            self.written_total += len(chunk)
        guarded = [(i, w.value) for i, w in batch.items() if w.guarded]
        if not guarded:
            return
        limiter = trio.CapacityLimiter(GUARDED_AT_ONCE)
        failures: list[EtcdError] = []

        async def write(instance_id: str, value: bytes | None) -> None:
            async with limiter:
                try:
                    await self._guarded(instance_id, value, lease)
                except EtcdError as exc:
                    failures.append(exc)
                    return
                del batch[instance_id]

        async with trio.open_nursery() as nursery:
            for instance_id, value in guarded:
                nursery.start_soon(write, instance_id, value)
        if failures:
            raise failures[0]

    async def _guarded(self, instance_id: str, value: bytes | None, lease: int) -> None:
        key = self.store.key(instance_key(instance_id))
        op = Op.delete(key) if value is None else Op.put(key, value, lease=lease)
        result = await self.store.etcd.txn([Compare.lease(key, lease)], [op])
        if result.succeeded:
            self.written_total += 1
        else:
            self.superseded_total += 1
            log.debug("%s: held by another replica now; this replica's change is dropped", instance_id)


class WriteThrough:
    """The push server's registrar on a replica (see the module doc)."""

    def __init__(self, mine: Registry, writer: Writer, replica: str) -> None:
        self.mine = mine
        self.writer = writer
        self.replica = replica

    @property
    def self_preservation_reason(self) -> str | None:
        return self.mine.self_preservation_reason

    def register(self, instance: Instance, now: float) -> set[str]:
        self.mine.register(instance, now)
        self.writer.put(instance.instance_id, encode_instance(instance, self.replica, True), guarded=False)
        return set()

    def restore(self, instance: Instance, now: float) -> set[str]:
        self.mine.restore(instance, now)
        self.writer.put(instance.instance_id, encode_instance(instance, self.replica, True), guarded=False)
        return set()

    def renew(self, instance_id: str, now: float) -> None:
        self.mine.renew(instance_id, now)

    def set_ready(self, instance_id: str, ready: bool, now: float) -> set[str]:
        if self.mine.set_ready(instance_id, ready, now):
            self._write(instance_id)
        return set()

    def disconnected(self, instance_id: str, now: float) -> set[str]:
        self.mine.disconnected(instance_id, now)
        if instance_id in self.mine:
            self._write(instance_id)
        return set()

    def deregister(self, instance_id: str) -> set[str]:
        if instance_id in self.mine:
            self.mine.deregister(instance_id)
            self.writer.delete(instance_id)
        return set()

    def expire(self, now: float) -> ExpiryResult:
        result = self.mine.expire(now)
        for instance_id in result.removed:
            self.writer.delete(instance_id)
        return ExpiryResult(result.removed, frozenset(), result.held, result.self_preservation)

    def rewrite_all(self) -> int:
        """After this replica's lease was lost (and with it every key under it): write every
        instance of an open session again, under the new lease. Those whose channel dropped are
        left to their sidecars (which reconnect, here or elsewhere)."""
        count = 0
        for instance in self.mine.instances():
            if self.mine.is_connected(instance.instance_id):
                self.writer.put(instance.instance_id, encode_instance(instance, self.replica, True), guarded=False)
                count += 1
        return count

    def _write(self, instance_id: str) -> None:
        instance = self.mine.get(instance_id)
        if instance is not None:
            value = encode_instance(instance, self.replica, self.mine.is_connected(instance_id))
            self.writer.put(instance_id, value, guarded=True)


def sessions_ttl(ttl: float) -> int:
    """An etcd lease's TTL in whole seconds (etcd's minimum is 2)."""
    return max(2, math.ceil(ttl))
