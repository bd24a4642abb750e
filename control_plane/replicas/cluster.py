"""What a replica is made of, put together for control_plane/app.py."""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from meshlet.wire import POLICIES

from .. import ca
from ..ca_rotation import Rotation
from ..etcd.store import EtcdStore
from ..policies import PolicyStore
from ..registry import Registry
from ..server import PushServer
from ..state_export import CA_PREFIX
from ..store import Store, StoreError
from ..token_records import TokenBook
from .engine import Replica, replica_id
from .registrar import Writer, WriteThrough
from .shared import SharedRegistry
from .shared_files import publish_directory, stored_directory, write_directory

log = logging.getLogger("meshlet.cp.replicas")


class Cluster:
    """What a replica is made of, before and after the push server exists."""

    def __init__(self, store: EtcdStore, ttl: float, rng: random.Random | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.rng = rng or random.SystemRandom()
        self.id = replica_id(socket.gethostname(), self.rng)
        self.shared = SharedRegistry(Registry(ttl=ttl), hold=ttl)
        self.writer = Writer(store, lambda: 0 if self._replica is None else self._replica.lease)
        self.registrar = WriteThrough(Registry(ttl=ttl), self.writer, self.id)
        self._replica: Replica | None = None
        self._ca_dir: Path | None = None  # our own CA's, published when it changes (None: an operator's)
        self._ca_changed = trio.Event()

    @classmethod
    def of(cls, store: Store, ttl: float) -> Cluster | None:
        """Replicas if the store is etcd; None for a single control plane."""
        return cls(store, ttl) if isinstance(store, EtcdStore) else None

    def replica(
        self,
        push: PushServer,
        *,
        policies: PolicyStore,
        book: TokenBook,
        ca_dir: Path | None,
        authority: Callable[[], ca.Authority],
        rotation: Rotation,
    ) -> Replica:
        async def reload_policies() -> None:
            before = push.wanted(POLICIES)
            await policies.load()
            push.policies_changed(before)

        async def reload_ca() -> None:
            if ca_dir is None:
                return  # an operator's root: each replica has it from its own files
            if write_directory(ca_dir, await stored_directory(self.store, CA_PREFIX)):
                log.info("the CA changed in etcd (another replica rotated it): now trusted and used here")
                rotation.install(authority())  # its bundle pushed; the leader times the next step from it

        replica = Replica(
            self.store,
            push,
            self.shared,
            self.registrar,
            self.writer,
            replica_id=self.id,
            ttl=self.ttl,
            reloaders={"policies/": reload_policies, "tokens/": book.load, CA_PREFIX: reload_ca},
            rng=self.rng,
        )
        replica.leader_jobs = [rotation.run, replica.compact]
        self._replica, self._ca_dir = replica, ca_dir
        return replica

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The replica (started: its registry, policies and leader as etcd has them) and the
        publishing of this replica's CA changes."""
        assert self._replica is not None, "Cluster.replica() first"
        async with trio.open_nursery() as nursery:
            await nursery.start(self._replica.run)
            if self._ca_dir is not None:
                nursery.start_soon(self._publish_ca, self._ca_dir)
            task_status.started()

    def on_ca_change(self, then: Callable[[], None]) -> Callable[[], None]:
        """The CA changed here (a rotation step): ``then``, and publish it to etcd."""

        def changed() -> None:
            then()
            self._ca_changed.set()

        return changed

    async def _publish_ca(self, ca_dir: Path) -> None:
        while True:
            await self._ca_changed.wait()
            self._ca_changed = trio.Event()
            try:
                if not await publish_directory(self.store, CA_PREFIX, ca_dir, ca.CERT_FILE):
                    log.warning("the CA changed in etcd while this replica rotated it: etcd's copy stands")
            except StoreError as exc:
                log.error("etcd: the CA rotation could not be written (%s); other replicas keep the old CA", exc)
