"""One control-plane replica on etcd: its lease, its card, the watch that keeps it in step with
the others, and the leader's jobs.

Every replica is the same: it serves any sidecar, writes its sessions' instances through to etcd
(registrar.py), and rebuilds what it pushes from one watch on the whole prefix (shared.py for the
registry; the policies, join tokens and CA material are read again when another replica changes
them). So a change applied on one replica reaches the sidecars of another one watch event later.

Tasks, all in :meth:`Replica.run`'s nursery:

* the lease: granted at start with the registry's TTL, kept alive every third of it. When etcd
  says it is gone (this replica was cut off from etcd for longer than the TTL, and its instances
  with it), a new one is granted and every open session's instance written again;
* the card (``replicas/<id>``), written at start and when the number of sessions changes;
* the watch: a listing of the prefix, then a watch from the next revision, resumed on another
  member by the client; a compaction past our revision means a new listing;
* the election: a replica campaigns whenever there is no leader (a transaction that creates
  ``leader`` under its lease only if it is absent); the leader runs the jobs that must happen
  once: CA rotation steps and etcd compaction. When the leader dies its lease runs out, the key
  goes, and the others campaign;
* holds: the lease-expiry safety valve's holds end (shared.py).

While etcd is unreachable (a member down is handled by the client; quorum lost is not) nothing
is lost and nothing is removed: sessions stay, sidecars keep what they were pushed (fail-static),
registry writes wait in the writer and the watch resumes where it stopped; ``meshlet status``
says what is wrong.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from meshlet import __version__

from ..etcd import Compacted, Compare, EtcdError, Event, LeaseNotFound, Op, Watch
from ..etcd.store import EtcdStore
from ..server import PushServer
from .records import INSTANCES, LEADER, REPLICAS, ReplicaCard, decode_leader
from .registrar import RETRY_FIRST, RETRY_MAX, Writer, WriteThrough, sessions_ttl
from .shared import Change, SharedRegistry

log = logging.getLogger("meshlet.cp.replicas")

T = TypeVar("T")

CARD_INTERVAL = 2.0  # how often a replica looks whether its card needs writing again
RELEASE_INTERVAL = 1.0
COMPACT_INTERVAL = 300.0  # the leader compacts etcd's history this often ...
COMPACT_RETENTION = 3600.0  # ... keeping this much of it (a watch cut off for longer lists again)

# Subtrees whose change makes a replica read something again (besides the registry and cards).
Reloader = Callable[[], Awaitable[None]]


class Replica:
    def __init__(
        self,
        store: EtcdStore,
        push: PushServer,
        shared: SharedRegistry,
        registrar: WriteThrough,
        writer: Writer,
        *,
        replica_id: str,
        ttl: float,
        reloaders: dict[str, Reloader] | None = None,
        leader_jobs: list[Callable[[], Awaitable[None]]] | None = None,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.etcd = store.etcd
        self.push = push
        self.shared = shared
        self.registrar = registrar
        self.writer = writer
        self.id = replica_id
        self.ttl = ttl
        self.reloaders = dict(reloaders or {})  # subtree prefix ("policies/") → what reads it again
        self.leader_jobs = list(leader_jobs or [])
        self.rng = rng or random.SystemRandom()
        self.wall = wall
        self.started = wall()
        self.lease = 0
        self.leader = ""  # the leader's replica id, as the watch last said ("" while there is none)
        self.revision = 0  # of the last event applied
        self.addresses = ("", "")  # push and API HOST:PORT, for the card (set_addresses)
        self.lease_error = ""
        self.relists = 0
        self._leader_changed = trio.Event()
        self._card_due = trio.Event()
        self._dirty: dict[str, trio.Event] = {prefix: trio.Event() for prefix in self.reloaders}
        self._card_written: tuple[int, int, tuple[str, str]] | None = None  # (lease, sessions, addresses) in etcd
        self._watch: Watch | None = None  # while one is open

    @property
    def is_leader(self) -> bool:
        return bool(self.leader) and self.leader == self.id

    @property
    def watching(self) -> bool:
        """A watch on etcd is open now."""
        return bool(self._watch is not None and self._watch.connected)

    # running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._new_lease(first=True)
        revision = await self._list()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.writer.run)
            nursery.start_soon(self._keep_lease)
            nursery.start_soon(self._cards)
            nursery.start_soon(self._follow, revision)
            nursery.start_soon(self._release_holds)
            nursery.start_soon(self._elect)
            for prefix, reload in self.reloaders.items():
                nursery.start_soon(self._reload_on_change, prefix, reload)
            task_status.started()

    async def leave(self) -> None:
        """A clean stop: the card goes now and the leadership is handed on; the instances stay
        under the lease until it runs out, so the sidecars reconnect to another replica before
        anybody's endpoints change."""
        with trio.move_on_after(2) as scope:
            scope.shield = True
            try:
                await self.etcd.delete(self.store.key(REPLICAS + self.id))
                if self.is_leader:
                    leader = self.store.key(LEADER)
                    await self.etcd.txn([Compare.value(leader, self.id.encode())], [Op.delete(leader)])
            except EtcdError as exc:
                log.warning("etcd: could not leave cleanly (%s); the lease will run out instead", exc)

    # the lease ----------------------------------------------------------------------------

    async def _new_lease(self, *, first: bool = False) -> None:
        """A lease (at start: etcd must answer now; later: until it does), then the card and,
        after a lost lease, every open session's instance under it."""

        async def grant() -> int:
            return (await self.etcd.grant(sessions_ttl(self.ttl))).id

        def failed(why: str) -> None:
            self.lease_error = why

        self.lease = await grant() if first else await retried("grant a lease", grant, failed)
        self.lease_error = ""
        await self._write_card()
        if not first:
            rewritten = self.registrar.rewrite_all()
            log.warning("etcd: a new lease %x; %d instances of open sessions written again", self.lease, rewritten)

    async def _keep_lease(self) -> None:
        while True:
            await trio.sleep(self.ttl / 3)
            try:
                await self.etcd.keepalive(self.lease)
                self.lease_error = ""
            except LeaseNotFound:
                log.warning(
                    "etcd: this replica's lease %x is gone (cut off from etcd for longer than the TTL)", self.lease
                )
                await self._new_lease()
            except EtcdError as exc:
                self.lease_error = str(exc)
                log.warning("etcd: lease keepalive failed: %s", exc)

    # the card -----------------------------------------------------------------------------

    def card(self) -> ReplicaCard:
        return ReplicaCard(
            self.id, self.addresses[0], self.addresses[1], __version__, self.started, len(self.push.hub.sessions)
        )

    async def _write_card(self) -> None:
        card = self.card()
        await self.etcd.put(self.store.key(REPLICAS + self.id), card.encode(), lease=self.lease)
        self._card_written = (self.lease, card.sessions, self.addresses)

    def set_addresses(self, push: str, api: str) -> None:
        """Where sidecars and `meshlet status` reach this replica, once its listeners are bound."""
        self.addresses = (push, api)
        self._card_due.set()

    async def _cards(self) -> None:
        while True:
            with trio.move_on_after(CARD_INTERVAL):
                await self._card_due.wait()
            self._card_due = trio.Event()
            if self._card_written != (self.lease, len(self.push.hub.sessions), self.addresses):
                try:
                    await self._write_card()
                except EtcdError as exc:
                    log.debug("etcd: card not written: %s", exc)

    # following etcd -----------------------------------------------------------------------

    async def _list(self) -> int:
        """Read the whole prefix and rebuild from it; its revision."""
        revision, kvs = await retried(
            f"list {self.store.location}", lambda: self.etcd.range_prefix(self.store.prefix.encode())
        )
        items = [(path, kv.value, kv.lease) for kv in kvs if (path := self._path(kv.key))]
        now = trio.current_time()
        self.push.changed(self.shared.replace_all(items, now))
        leader = next((value for path, value, _ in items if path == LEADER), None)
        self._set_leader("" if leader is None else decode_leader(leader))
        for event in self._dirty.values():
            event.set()
        self.revision = revision
        return revision

    async def _follow(self, revision: int) -> None:
        while True:
            try:
                async with self.etcd.watch(self.store.prefix.encode(), revision + 1) as watch:
                    self._watch = watch
                    async for batch in watch:
                        self._apply(batch.events)
                        revision = max(revision, batch.revision)
                        self.revision = revision
            except Compacted as exc:
                self.relists += 1
                log.warning("etcd: history compacted past revision %d (%s): listing again", revision + 1, exc)
                revision = await self._list()
            finally:
                self._watch = None

    def _apply(self, events: tuple[Event, ...]) -> None:
        changes: list[Change] = []
        for event in events:
            path = self._path(event.kv.key)
            if not path:
                continue
            value = event.kv.value if event.type == "put" else None
            prev_lease = event.prev_kv.lease if event.prev_kv is not None else 0
            if path.startswith((INSTANCES, REPLICAS)):
                changes.append(Change(path, value, event.kv.lease, prev_lease, event.kv.mod_revision))
            elif path == LEADER:
                self._set_leader("" if value is None else decode_leader(value))
            else:
                for prefix, dirty in self._dirty.items():
                    if path.startswith(prefix):
                        dirty.set()
        if changes:
            self.push.changed(self.shared.apply(changes, trio.current_time()))

    def _path(self, key: bytes) -> str:
        """A key's store path; "" (skipped, logged) for a key that is not one, written by
        something else."""
        try:
            return self.store.path(key)
        except ValueError as exc:
            self.shared.bad_records += 1
            log.error("etcd: ignoring %s", exc)
            return ""

    async def _reload_on_change(self, prefix: str, reload: Reloader) -> None:
        while True:
            await self._dirty[prefix].wait()
            self._dirty[prefix] = trio.Event()
            try:
                await reload()
            except Exception:  # noqa: BLE001 - one bad read must not stop the replica: logged, the old state kept
                log.exception("etcd: reading %s again failed; keeping what this replica had", prefix)

    async def _release_holds(self) -> None:
        while True:
            await trio.sleep(RELEASE_INTERVAL)
            self.push.changed(self.shared.release(trio.current_time()))

    # the leader ---------------------------------------------------------------------------

    def _set_leader(self, leader: str) -> None:
        if leader != self.leader:
            was = self.is_leader
            self.leader = leader
            if self.is_leader and not was:
                log.info("this replica (%s) leads: it runs the CA rotation and compaction", self.id)
            elif was:
                log.warning("this replica (%s) no longer leads (now: %s)", self.id, leader or "nobody")
            self._leader_changed.set()

    async def _elect(self) -> None:
        while True:
            if not self.leader:
                await self._campaign()
            if self.is_leader:
                async with trio.open_nursery() as jobs:
                    for job in self.leader_jobs:
                        jobs.start_soon(job)
                    while self.is_leader:
                        await self._leader_change()
                    jobs.cancel_scope.cancel()
            elif self.leader:
                await self._leader_change()

    async def _leader_change(self) -> None:
        await self._leader_changed.wait()
        self._leader_changed = trio.Event()

    async def _campaign(self) -> None:
        key = self.store.key(LEADER)
        try:
            result = await self.etcd.txn(
                [Compare.create_revision(key, 0)], [Op.put(key, self.id.encode(), lease=self.lease)]
            )
        except EtcdError as exc:
            log.debug("etcd: campaign failed: %s", exc)
            with trio.move_on_after(1.0):
                await self._leader_change()
            return
        if result.succeeded:
            self._set_leader(self.id)  # the watch says so too, a moment later
        else:
            with trio.move_on_after(1.0):  # somebody leads: the watch will say who
                await self._leader_change()

    async def compact(self) -> None:
        """A leader job: compact etcd's history (compact_history)."""
        await compact_history(self.etcd, lambda: self.revision)

    # status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        watch = self._watch
        cards = sorted(self.shared.cards.values(), key=lambda card: card.id)
        return {
            "id": self.id,
            "leader": self.leader,
            "revision": self.revision,
            "replicas": [
                {
                    **card.to_json(),
                    "lease": f"{card.lease:x}",
                    "leader": card.id == self.leader,
                    "self": card.id == self.id,
                }
                for card in cards
            ],
            "etcd": {
                "endpoints": list(self.etcd.endpoints),
                "watching": self.watching,
                "watch_error": "" if watch is None else watch.error,
                "lease_error": self.lease_error,
                "writes_waiting": self.writer.backlog,
                "write_error": self.writer.error,
                "relists": self.relists,
            },
            "held": len(self.shared.held),
            "held_reason": self.shared.held_reason,
            "bad_records": self.shared.bad_records,
        }

    async def members(self) -> list[dict[str, Any]]:
        """etcd's members as each answers (for ``meshlet status``)."""
        return [
            {
                "endpoint": member.endpoint,
                "member_id": member.member_id,
                "leader": bool(member.member_id) and member.member_id == member.leader,
                "raft_term": member.raft_term,
                "revision": member.revision,
                "db_size": member.db_size,
                "version": member.version,
                "error": member.error,
            }
            for member in await self.etcd.status()
        ]


async def retried(what: str, call: Callable[[], Awaitable[T]], failed: Callable[[str], None] | None = None) -> T:
    """``call()``'s answer, asked again with backoff (RETRY_FIRST doubling to RETRY_MAX) for as
    long as etcd cannot give it; each failure logged, and told to ``failed``."""
    delay = RETRY_FIRST
    while True:
        try:
            return await call()
        except EtcdError as exc:
            if failed is not None:
                failed(str(exc))
            log.warning("etcd: cannot %s (%s); retrying in %.1f s", what, exc, delay)
            await trio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)


class Compactor(Protocol):
    async def compact(self, revision: int) -> None: ...


async def compact_history(
    etcd: Compactor,
    revision: Callable[[], int],
    retention: float = COMPACT_RETENTION,
    interval: float = COMPACT_INTERVAL,
) -> None:
    """Every ``interval``, compact etcd's history to the revision it was at ``retention`` ago (a
    watch cut off for longer than that lists again). A failure is logged and tried next time."""
    samples: deque[tuple[float, int]] = deque()  # (when, revision), oldest first
    while True:
        now = trio.current_time()
        samples.append((now, revision()))
        due = 0
        while samples and samples[0][0] <= now - retention:
            due = samples.popleft()[1]
        if due > 0:
            try:
                await etcd.compact(due)
                log.info("etcd: history compacted to revision %d", due)
            except EtcdError as exc:
                log.warning("etcd: compaction to revision %d failed: %s", due, exc)
        await trio.sleep(interval)


def replica_id(hostname: str, rng: random.Random) -> str:
    """A replica's id: its host name (lowercased, what a key may hold) and 6 random hex digits,
    new at every start (a restarted replica is a new one: its old lease is not its to renew)."""
    name = "".join(c if c.isalnum() or c in ".-" else "-" for c in hostname.lower()).strip("-.")[:40] or "cp"
    return f"{name}-{rng.getrandbits(24):06x}"
