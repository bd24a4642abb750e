"""A replica's sessions written through to a real etcd (one member): batches, the lease guard
that keeps a replica's late news from undoing another's takeover, and writes that wait."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from control_plane.etcd import Etcd, prefix_end
from control_plane.etcd.store import TXN_OPS, EtcdStore
from control_plane.registry import Instance, Registry
from control_plane.replicas.records import INSTANCES, decode_instance
from control_plane.replicas.registrar import Writer, WriteThrough

from ..etcd_cluster import EtcdCluster

TTL = 10.0
BOUND = 10.0


@pytest.fixture
async def store(etcd1: EtcdCluster, tmp_path: Path) -> AsyncIterator[EtcdStore]:
    opened = await EtcdStore.open(Etcd(etcd1.endpoints), f"/test/registrar/{tmp_path.name}/")
    yield opened
    await opened.aclose()


class Side:
    """One replica's registrar and writer, its lease granted, its writer running."""

    def __init__(self, store: EtcdStore, name: str, lease: int) -> None:
        self.lease = lease
        self.writer = Writer(store, lambda: self.lease)
        self.registrar = WriteThrough(Registry(ttl=TTL), self.writer, name)


async def side(store: EtcdStore, name: str, nursery: trio.Nursery) -> Side:
    lease = await store.etcd.grant(30)
    made = Side(store, name, lease.id)
    nursery.start_soon(made.writer.run)
    return made


def instance(n: int, ready: bool = True) -> Instance:
    return Instance("item", f"item-{n}", f"10.0.0.{n % 250 + 1}:15006", f"10.0.0.{n % 250 + 1}:15090", ready=ready)


async def until(what: str, check: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll ``check`` (a condition on the writer, or on etcd) until it holds; fail after BOUND."""
    with trio.move_on_after(BOUND):
        while True:
            held = check()
            if held if isinstance(held, bool) else await held:
                return
            await trio.sleep(0.02)
    pytest.fail(f"not within {BOUND:g} s: {what}")


async def stored(store: EtcdStore) -> dict[str, tuple[bytes, int]]:
    """instance id → (record, lease) as etcd has them."""
    start = store.key(INSTANCES.rstrip("/")) + b"/"
    _, kvs = await store.etcd.range(start, prefix_end(start))
    return {store.path(kv.key).removeprefix(INSTANCES): (kv.value, kv.lease) for kv in kvs}


async def test_registrations_go_out_in_transactions_under_the_lease(store: EtcdStore, nursery: trio.Nursery) -> None:
    a = await side(store, "cp-a", nursery)
    count = 2 * TXN_OPS + 10
    for n in range(count):
        assert a.registrar.register(instance(n), 0.0) == set()  # the change comes back from the watch
    await until("every registration written", lambda: a.writer.written_total == count)
    held = await stored(store)
    assert len(held) == count and {lease for _, lease in held.values()} == {a.lease}
    record = decode_instance(INSTANCES + "item-7", held["item-7"][0])
    assert record.instance == instance(7) and record.replica == "cp-a" and record.connected


async def test_late_news_from_a_replica_never_undoes_a_takeover(store: EtcdStore, nursery: trio.Nursery) -> None:
    a = await side(store, "cp-a", nursery)
    b = await side(store, "cp-b", nursery)
    a.registrar.register(instance(1), 0.0)
    await until("cp-a's registration written", lambda: a.writer.written_total == 1)
    b.registrar.register(instance(1), 1.0)  # the sidecar moved to cp-b
    await until("cp-b's registration written", lambda: b.writer.written_total == 1)
    # cp-a hears late that the channel dropped, then expires it: neither may touch cp-b's key.
    a.registrar.disconnected("item-1", 2.0)
    a.registrar.deregister("item-1")
    await until("cp-a's writes settled", lambda: a.writer.backlog == 0 and a.writer.superseded_total >= 1)
    value, lease = (await stored(store))["item-1"]
    assert lease == b.lease and decode_instance(INSTANCES + "item-1", value).replica == "cp-b"


async def test_readiness_and_goodbye_are_written_while_the_key_is_ours(store: EtcdStore, nursery: trio.Nursery) -> None:
    a = await side(store, "cp-a", nursery)
    a.registrar.register(instance(1, ready=False), 0.0)
    a.registrar.set_ready("item-1", True, 1.0)
    await until("written", lambda: a.writer.backlog == 0 and a.writer.written_total >= 1)
    assert decode_instance(INSTANCES + "item-1", (await stored(store))["item-1"][0]).instance.ready
    a.registrar.disconnected("item-1", 2.0)

    async def disconnected() -> bool:
        return not decode_instance(INSTANCES + "item-1", (await stored(store))["item-1"][0]).connected

    await until("the dropped channel in etcd", disconnected)
    a.registrar.deregister("item-1")

    async def gone() -> bool:
        return await stored(store) == {}

    await until("the goodbye in etcd", gone)
    assert a.writer.superseded_total == 0  # every write was this replica's to make


async def test_an_expiry_in_this_replica_deletes_its_key(store: EtcdStore, nursery: trio.Nursery) -> None:
    a = await side(store, "cp-a", nursery)
    a.registrar.register(instance(1), 0.0)
    await until("the registration written", lambda: a.writer.written_total == 1)
    a.registrar.disconnected("item-1", 1.0)
    result = a.registrar.expire(TTL + 1)
    assert result.removed == ("item-1",) and result.changed == frozenset()
    await until("the expiry written", lambda: a.writer.backlog == 0 and a.writer.written_total >= 2)

    async def none_left() -> bool:
        return not await stored(store)

    await until("the key deleted", none_left)


async def test_a_registration_gone_before_it_was_written_writes_nothing(
    store: EtcdStore, nursery: trio.Nursery
) -> None:
    other = await side(store, "cp-b", nursery)
    other.registrar.register(instance(1), 0.0)  # another replica holds item-1
    await until("cp-b's registration written", lambda: other.writer.written_total == 1)
    a = Side(store, "cp-a", (await store.etcd.grant(30)).id)  # its writer not running yet
    a.registrar.register(instance(1), 1.0)
    a.registrar.deregister("item-1")  # gone before the registration went out
    nursery.start_soon(a.writer.run)
    await until("cp-a's writes settled", lambda: a.writer.backlog == 0 and a.writer.superseded_total == 1)
    assert (await stored(store))["item-1"][1] == other.lease


async def test_after_a_new_lease_only_open_sessions_are_written_again(store: EtcdStore, nursery: trio.Nursery) -> None:
    a = await side(store, "cp-a", nursery)
    a.registrar.register(instance(1), 0.0)
    a.registrar.register(instance(2), 0.0)
    a.registrar.disconnected("item-2", 0.5)
    await until("written", lambda: a.writer.backlog == 0 and a.writer.written_total >= 2)
    await store.etcd.revoke(a.lease)  # etcd deletes both keys with the lease
    a.lease = (await store.etcd.grant(30)).id
    assert a.registrar.rewrite_all() == 1
    await until("rewritten", lambda: a.writer.backlog == 0)

    async def only_the_open_one() -> bool:
        return set(await stored(store)) == {"item-1"}

    await until("only item-1 written again", only_the_open_one)
    assert (await stored(store))["item-1"][1] == a.lease


async def test_writes_wait_while_etcd_is_away(tmp_path: Path, nursery: trio.Nursery) -> None:
    # No member: the writer keeps what it was asked to write and says why it waits.
    etcd = Etcd(["http://127.0.0.1:1"], timeout=0.5)
    away = EtcdStore(etcd, "/test/away/", "0" * 32)
    writer = Writer(away, lambda: 1)
    nursery.start_soon(writer.run)
    WriteThrough(Registry(ttl=TTL), writer, "cp-a").register(instance(1), 0.0)
    await until("the failure is reported", lambda: bool(writer.error))
    assert writer.backlog == 1 and "127.0.0.1:1" in writer.error
    await etcd.aclose()
