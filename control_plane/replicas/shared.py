"""The registry every replica pushes from, rebuilt from etcd's events: pure bookkeeping.

Each replica watches the whole prefix and feeds what it sees here, in revision order, so every
replica holds the same instances (those of its own sessions included: its writes come back through
the watch like anybody's). What the sidecars are pushed is the :class:`Registry` inside, which
never expires anything by itself here: in etcd, leases do.

The lease-expiry safety valve. A replica's instances are under its lease; when the lease runs out
(the replica died, or lost etcd for longer than the TTL) etcd deletes all of them in one revision.
If their sidecars could not reconnect to another replica in time, that is many instances at once,
and, as with self-preservation in the single registry (control_plane/registry.py), the likely cause
is on our side: a replica partitioned from etcd still serving its sidecars, or sidecars slow to fail
over. So when the instances a revision takes by lease expiry, with those already held, are at least
``min_instances`` and more than ``threshold`` of the ready instances, they are held: still pushed,
for ``hold`` seconds (one TTL), or until they register again. Fewer are removed at once. The rule
reads only the event stream, so every replica decides the same for the same revision without
talking to the others. A deletion of a key whose lease belongs to a live replica is that replica
removing it (a goodbye, or its sidecar's lease ran out there) and is applied at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ..registry import (
    DEFAULT_SELF_PRESERVATION_MIN_INSTANCES,
    DEFAULT_SELF_PRESERVATION_THRESHOLD,
    Registry,
)
from .records import INSTANCES, REPLICAS, InstanceRecord, RecordError, ReplicaCard, decode_card, decode_instance

log = logging.getLogger("meshlet.cp.replicas")


@dataclass(frozen=True, slots=True)
class Change:
    """One key's change in one revision, as the store names keys (prefix removed)."""

    path: str
    value: bytes | None  # None: deleted
    lease: int  # of the key as written (0 for a deletion)
    prev_lease: int  # of the key before (0: unknown or none)
    revision: int


class SharedRegistry:
    def __init__(
        self,
        registry: Registry,
        hold: float,
        threshold: float = DEFAULT_SELF_PRESERVATION_THRESHOLD,
        min_instances: int = DEFAULT_SELF_PRESERVATION_MIN_INSTANCES,
    ) -> None:
        self.registry = registry
        self.hold = hold
        self.threshold = threshold
        self.min_instances = min_instances
        self.cards: dict[str, ReplicaCard] = {}  # replica id → its card
        self.held: dict[str, float] = {}  # instance id → when its hold ends
        self.held_reason: str | None = None
        self.bad_records = 0  # records skipped because they did not decode
        self.held_total = 0

    @property
    def live_leases(self) -> set[int]:
        return {card.lease for card in self.cards.values() if card.lease}

    # feeding ------------------------------------------------------------------------------

    def apply(self, changes: Iterable[Change], now: float) -> set[str]:
        """Changes in revision order (a watch batch); the services whose endpoints changed."""
        changed: set[str] = set()
        batch: list[Change] = []
        for change in changes:
            if batch and change.revision != batch[0].revision:
                changed |= self._revision(batch, now)
                batch = []
            batch.append(change)
        if batch:
            changed |= self._revision(batch, now)
        return changed

    def replace_all(self, items: Iterable[tuple[str, bytes, int]], now: float) -> set[str]:
        """A fresh listing (at start, or after a compaction cut the watch): (path, value, lease)
        of every key. What the listing lacks is removed, holds end (their keys are gone for good
        or back), and what it has is registered."""
        cards: dict[str, ReplicaCard] = {}
        instances: dict[str, InstanceRecord] = {}
        for path, value, lease in items:
            if path.startswith(REPLICAS):
                card = self._card(path, value, lease)
                if card is not None:
                    cards[card.id] = card
            elif path.startswith(INSTANCES):
                record = self._record(path, value)
                if record is not None:
                    instances[record.instance.instance_id] = record
        self.cards = cards
        self.held.clear()
        self.held_reason = None
        changed: set[str] = set()
        for instance in self.registry.instances():
            if instance.instance_id not in instances:
                changed |= self.registry.deregister(instance.instance_id)
        for record in instances.values():
            changed |= self._register(record, now)
        return changed

    def release(self, now: float) -> set[str]:
        """End the holds that are due; the services whose endpoints changed."""
        due = [i for i, until in self.held.items() if until <= now]
        changed: set[str] = set()
        for instance_id in due:
            del self.held[instance_id]
            changed |= self.registry.deregister(instance_id)
        if due:
            log.warning("lease-expiry hold over: %d instances removed (%s)", len(due), ", ".join(sorted(due)[:10]))
        if not self.held:
            self.held_reason = None
        return changed

    # internals ----------------------------------------------------------------------------

    def _revision(self, changes: list[Change], now: float) -> set[str]:
        # Cards first: a lease's expiry deletes a replica's card and its instances in one
        # revision, in no particular order.
        changed: set[str] = set()
        for change in changes:
            if change.path.startswith(REPLICAS):
                self._card_change(change)
        lost: list[str] = []
        live = self.live_leases
        for change in changes:
            if not change.path.startswith(INSTANCES):
                continue
            if change.value is not None:
                record = self._record(change.path, change.value)
                if record is not None:
                    self.held.pop(record.instance.instance_id, None)
                    changed |= self._register(record, now)
                continue
            instance_id = change.path.removeprefix(INSTANCES)
            instance = self.registry.get(instance_id)
            if instance is None:
                continue
            if change.prev_lease in live or not instance.ready:
                self.held.pop(instance_id, None)
                changed |= self.registry.deregister(instance_id)
            else:
                lost.append(instance_id)
        if lost:
            changed |= self._lost(lost, now)
        return changed

    def _lost(self, lost: list[str], now: float) -> set[str]:
        population = sum(1 for instance in self.registry.instances() if instance.ready)
        expiring = len(lost) + len(self.held)
        share = expiring / population if population else 0.0
        if expiring >= self.min_instances and share > self.threshold:
            self.held_reason = (
                f"{expiring} of {population} instances ({share:.0%}) lost with a replica's etcd lease, more than "
                f"{self.threshold:.0%}: held for {self.hold:g} s or until their sidecars reconnect"
            )
            log.warning("lease-expiry hold: %s", self.held_reason)
            for instance_id in lost:
                self.held[instance_id] = now + self.hold
            self.held_total += len(lost)
            return set()
        changed: set[str] = set()
        for instance_id in lost:
            changed |= self.registry.deregister(instance_id)
        return changed

    def _register(self, record: InstanceRecord, now: float) -> set[str]:
        changed = self.registry.register(record.instance, now)
        if not record.connected:
            self.registry.disconnected(record.instance.instance_id, now)
        return changed

    def _card_change(self, change: Change) -> None:
        replica = change.path.removeprefix(REPLICAS)
        if change.value is None:
            self.cards.pop(replica, None)
            return
        card = self._card(change.path, change.value, change.lease)
        if card is not None:
            self.cards[card.id] = card

    def _card(self, path: str, value: bytes, lease: int) -> ReplicaCard | None:
        try:
            return decode_card(path, value, lease)
        except RecordError as exc:
            self.bad_records += 1
            log.error("ignoring a replica card: %s", exc)
            return None

    def _record(self, path: str, value: bytes) -> InstanceRecord | None:
        try:
            return decode_instance(path, value)
        except RecordError as exc:
            self.bad_records += 1
            log.error("ignoring an instance in etcd: %s", exc)
            return None
