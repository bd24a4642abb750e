"""Applied policy: versions by content, history, rollback, nothing changed on error,
and what survives a restart (the file store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from control_plane.policies import PolicyStore
from control_plane.store import MemoryStore, StoreError, open_store
from meshlet.policy import PolicyError

BILLING = "kind: Service\nname: billing\nendpoints: [10.0.0.7:8443]\n"
BILLING_2 = "kind: Service\nname: billing\nendpoints: [10.0.0.7:8443, 10.0.0.8:8443]\n"
ROUTE = "kind: Route\nname: item\nhost: item\nrules:\n  - {name: all, destinations: [{service: item}]}\n"


async def test_apply_versions_by_content_and_reports_what_changed() -> None:
    policies = PolicyStore(MemoryStore())
    first = await policies.apply([("a.yaml", BILLING)], source="test", now=1.0)
    assert (
        first.applied
        and first.previous == ""
        and [c.to_json() for c in first.changes] == [{"kind": "Service", "name": "billing", "change": "added"}]
    )
    again = await policies.apply([("renamed.yaml", BILLING)], source="test", now=2.0)
    assert not again.applied and again.version == first.version and again.changes == ()
    second = await policies.apply([("a.yaml", BILLING_2), ("r.yaml", ROUTE)], source="test", now=3.0)
    assert second.applied and second.previous == first.version
    assert [(c.kind, c.name, c.what) for c in second.changes] == [
        ("Route", "item", "added"),
        ("Service", "billing", "changed"),
    ]
    third = await policies.apply([("r.yaml", ROUTE)], source="test", now=4.0)  # billing left out: removed
    assert [(c.name, c.what) for c in third.changes] == [("billing", "removed")]
    assert [v.seq for v in await policies.history()] == [3, 2, 1]


async def test_an_invalid_apply_changes_nothing() -> None:
    policies = PolicyStore(MemoryStore())
    good = await policies.apply([("a.yaml", BILLING)], source="test", now=1.0)
    with pytest.raises(PolicyError):
        await policies.apply([("a.yaml", BILLING_2), ("bad.yaml", "kind: Service\nname: BAD\n")], source="t", now=2.0)
    assert policies.version == good.version and len(await policies.history()) == 1
    assert set(policies.resources()) == {"Service/billing"}


async def test_a_dry_run_shows_the_diff_and_keeps_what_runs() -> None:
    policies = PolicyStore(MemoryStore())
    await policies.apply([("a.yaml", BILLING)], source="test", now=1.0)
    dry = await policies.apply([("a.yaml", BILLING_2)], source="test", now=2.0, dry_run=True)
    assert not dry.applied and dry.version != policies.version
    assert [(c.name, c.what) for c in dry.changes] == [("billing", "changed")]
    assert len(await policies.history()) == 1


async def test_rollback_is_a_new_entry_with_the_old_version() -> None:
    policies = PolicyStore(MemoryStore())
    first = await policies.apply([("a.yaml", BILLING)], source="test", now=1.0)
    await policies.apply([("a.yaml", BILLING_2)], source="test", now=2.0)
    back = await policies.rollback(first.version[:6], now=3.0)
    assert back.applied and back.version == first.version == policies.version
    newest = (await policies.history())[0]
    assert newest.seq == 3 and newest.source == f"rollback to {first.version}"
    with pytest.raises(PolicyError, match="not in the history"):
        await policies.rollback("ffffffff", now=4.0)


async def test_applied_policy_survives_a_restart(tmp_path: Path) -> None:
    async with open_store("file", tmp_path) as store:
        policies = PolicyStore(store)
        applied = await policies.apply([("a.yaml", BILLING), ("r.yaml", ROUTE)], source="test", now=1.0)
    async with open_store("file", tmp_path) as store:
        again = PolicyStore(store)
        await again.load()
        assert again.version == applied.version
        assert set(again.resources()) == {"Service/billing", "Route/item"}
        assert (await again.history())[0].files == (("a.yaml", BILLING), ("r.yaml", ROUTE))


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"\xc1" + raw[1:],  # not msgpack
        lambda raw: raw[: len(raw) // 2],  # cut short
        lambda raw: b"\x93\x01\x02\x03",  # msgpack, but a list where an entry belongs
        lambda raw: raw.replace(b"files", b"filez"),  # a field missing
    ],
)
async def test_a_damaged_history_entry_names_the_file_and_what_to_do(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    async with open_store("file", tmp_path) as store:
        policies = PolicyStore(store)
        await policies.apply([("a.yaml", BILLING)], source="test", now=1.0)
        await policies.apply([("a.yaml", BILLING_2)], source="test", now=2.0)
        key = "policies/history/00000001"
        await store.put(key, damage(await store.get(key)))
        expected = f"{tmp_path / 'state.msgpack'}: corrupt entry '{key}': "
        with pytest.raises(StoreError, match="restore the file from a backup") as info:
            await policies.history()
        assert str(info.value).startswith(expected)
        with pytest.raises(StoreError) as info:
            await policies.rollback("v", now=3.0)
        assert str(info.value).startswith(expected)
        await store.put("policies/history/00000002", damage(await store.get("policies/history/00000002")))
    async with open_store("file", tmp_path) as store:
        with pytest.raises(StoreError) as info:
            await PolicyStore(store).load()  # the running version: at start
        assert str(info.value).startswith(f"{tmp_path / 'state.msgpack'}: corrupt entry 'policies/history/00000002'")


async def test_a_failed_switch_leaves_no_history_entry_behind() -> None:
    class FailingCurrent(MemoryStore):
        async def swap(self, key: str, expected: bytes | None, puts: Any, deletes: Any = ()) -> int | None:
            raise StoreError("no space left on device: test")

    store = FailingCurrent()
    policies = PolicyStore(store)
    with pytest.raises(StoreError):
        await policies.apply([("a.yaml", BILLING)], source="test", now=1.0)
    assert await policies.history() == [] and policies.version == ""


async def test_an_apply_that_lost_the_race_goes_on_top_of_the_winner() -> None:
    """Two replicas on one store: the second read the policy before the first applied."""
    store = MemoryStore()
    first, second = PolicyStore(store), PolicyStore(store)
    await first.load()
    await second.load()
    won = await first.apply([("a.yaml", BILLING)], source="replica a", now=1.0)
    late = await second.apply([("b.yaml", ROUTE)], source="replica b", now=2.0)
    assert won.applied and late.applied and late.previous == won.version
    assert [(v.seq, v.source) for v in await second.history()] == [(2, "replica b"), (1, "replica a")]
    await first.load()
    assert first.version == second.version == late.version


async def test_an_apply_of_what_the_winner_applied_changes_nothing() -> None:
    store = MemoryStore()
    first, second = PolicyStore(store), PolicyStore(store)
    won = await first.apply([("a.yaml", BILLING)], source="replica a", now=1.0)
    same = await second.apply([("a.yaml", BILLING)], source="replica b", now=2.0)
    assert not same.applied and same.version == won.version
    assert len(await second.history()) == 1


async def test_an_apply_that_keeps_losing_gives_up_with_the_reason() -> None:
    class Busy(MemoryStore):
        async def swap(self, key: str, expected: bytes | None, puts: Any, deletes: Any = ()) -> int | None:
            return None  # somebody else always applied first

    policies = PolicyStore(Busy())
    with pytest.raises(StoreError, match="apply again"):
        await policies.apply([("a.yaml", BILLING)], source="test", now=1.0)
    assert policies.version == ""
