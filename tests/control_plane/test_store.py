"""control_plane.store: one conformance suite for every store, then what only FileStore promises
(survives a restart, atomic writes, refuses a corrupt file, its directory and lock) and open_store."""

from __future__ import annotations

import os
import re
import socket
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane import store as store_module
from control_plane.etcd import Etcd, EtcdUnavailable
from control_plane.etcd.store import EtcdStore
from control_plane.store import (
    FileStore,
    MemoryStore,
    Store,
    StoreError,
    StoreFull,
    decode_state,
    encode_state,
    open_store,
)

from ..etcd_cluster import EtcdCluster

Factory = Callable[[Path], Awaitable[Store]]


async def _memory(_: Path) -> Store:
    return MemoryStore()


async def _file(directory: Path) -> Store:
    return await FileStore.open(directory / "data")


def _etcd(cluster: EtcdCluster) -> Factory:
    async def open_etcd(directory: Path) -> Store:
        # a prefix per directory: a new store each time, the same one again for the same directory
        return await EtcdStore.open(Etcd(cluster.endpoints), f"/test/store/{directory.name}/")

    return open_etcd


FACTORIES = {"memory": _memory, "file": _file}
KINDS = ["etcd", "file", "memory"]


@pytest.fixture(scope="module", params=KINDS)
def factory(request: pytest.FixtureRequest) -> Factory:
    """How to open each kind of store (an etcd store on the module's etcd member)."""
    if request.param == "etcd":
        return _etcd(request.getfixturevalue("etcd1"))
    return FACTORIES[request.param]


@pytest.fixture
async def store(factory: Factory, tmp_path: Path) -> AsyncIterator[Store]:
    s = await factory(tmp_path)
    yield s
    await s.aclose()


# conformance: every store -------------------------------------------------------------------


async def test_empty_store(store: Store) -> None:
    base = await store.revision()
    assert base == 0 or isinstance(store, EtcdStore)  # etcd's revisions are the cluster's
    assert await store.get("policies/route/item") is None
    assert await store.items("") == []
    assert await store.delete("policies/route/item") is False
    assert await store.revision() == base


async def test_put_get_and_revisions(store: Store) -> None:
    base = await store.revision()
    assert await store.put("policies/route/item", b"v1") == base + 1
    assert await store.get("policies/route/item") == b"v1"
    assert await store.put("policies/route/cart", b"c1") == base + 2
    assert await store.put("policies/route/item", b"v2") == base + 3  # an overwrite is a new revision
    assert await store.put("policies/route/item", b"v2") == base + 4  # so is an unchanged value (as etcd)
    assert await store.get("policies/route/item") == b"v2"
    assert await store.put("empty", b"") == base + 5
    assert await store.get("empty") == b""  # an empty value is a value, not a missing key
    assert await store.revision() == base + 5


async def test_delete(store: Store) -> None:
    base = await store.put("services/db", b"x")
    assert await store.delete("services/db") is True
    assert await store.revision() == base + 1
    assert await store.get("services/db") is None
    assert await store.delete("services/db") is False  # nothing removed: no new revision
    assert await store.revision() == base + 1
    assert await store.put("services/db", b"y") == base + 2


async def test_items_by_prefix_sorted_by_key(store: Store) -> None:
    for key in ["policies/route/item", "services/db", "policies/route/cart", "policies/routes/x", "policies/a"]:
        await store.put(key, key.encode())
    assert [k for k, _ in await store.items("")] == [
        "policies/a",
        "policies/route/cart",
        "policies/route/item",
        "policies/routes/x",
        "services/db",
    ]
    assert await store.items("policies/route/") == [
        ("policies/route/cart", b"policies/route/cart"),
        ("policies/route/item", b"policies/route/item"),
    ]
    # a plain string prefix, as etcd's range: without the '/' it matches routes/ too
    assert [k for k, _ in await store.items("policies/route")] == [
        "policies/route/cart",
        "policies/route/item",
        "policies/routes/x",
    ]
    assert await store.items("nothing/") == []
    assert await store.items("services/db") == [("services/db", b"services/db")]


@pytest.mark.parametrize("key", ["", "/policies", "policies/", "policies//item", "/"])
async def test_bad_keys(store: Store, key: str) -> None:
    base = await store.revision()
    with pytest.raises(ValueError, match="is not a '/'-separated path"):
        await store.put(key, b"x")
    with pytest.raises(ValueError):
        await store.get(key)
    with pytest.raises(ValueError):
        await store.delete(key)
    with pytest.raises(ValueError):
        await store.swap(key, None, {})
    with pytest.raises(ValueError):
        await store.swap("k", None, {key: b"x"})
    assert await store.revision() == base


async def test_bad_types(store: Store) -> None:
    base = await store.revision()
    with pytest.raises(TypeError, match="callers encode"):
        await store.put("k", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.put("k", bytearray(b"x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.get(b"k")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.items(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.swap("k", "text", {})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.swap("k", None, {"k": "text"})  # type: ignore[dict-item]
    assert await store.revision() == base


async def test_closed_store(store: Store) -> None:
    await store.put("k", b"v")
    await store.aclose()
    await store.aclose()  # idempotent
    calls = (store.get("k"), store.put("k", b"w"), store.delete("k"), store.items(""), store.revision())
    for call in (*calls, store.swap("k", b"v", {"k": b"w"})):
        with pytest.raises(trio.ClosedResourceError):
            await call


async def test_concurrent_puts_all_land(store: Store) -> None:
    base = await store.revision()
    revisions: list[int] = []

    async def put(n: int) -> None:
        revisions.append(await store.put(f"k/{n:02d}", str(n).encode()))

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(put, n)
    assert sorted(revisions) == list(range(base + 1, base + 21))
    assert len(await store.items("k/")) == 20
    assert await store.revision() == base + 20


async def test_swap(store: Store) -> None:
    base = await store.revision()
    # absent expected: creates, several keys in one revision
    assert await store.swap("leader", None, {"leader": b"a", "policies/x": b"1", "policies/y": b"2"}) == base + 1
    assert await store.swap("leader", None, {"leader": b"b"}) is None  # present now: nothing changes
    assert await store.get("leader") == b"a"
    assert await store.swap("leader", b"b", {"leader": b"c"}) is None  # another value: nothing changes
    assert await store.revision() == base + 1
    # puts and deletes together; the compared key need not change
    assert await store.swap("leader", b"a", {"policies/z": b"3"}, ["policies/x", "policies/missing"]) == base + 2
    assert await store.items("policies/") == [("policies/y", b"2"), ("policies/z", b"3")]
    assert await store.swap("leader", b"a", {}, ["policies/missing"]) == base + 2  # nothing to do: same revision
    assert await store.swap("leader", b"a", {}, ["leader"]) == base + 3
    assert await store.get("leader") is None
    assert await store.swap("gone", b"", {"x": b"1"}) is None  # an empty value is not an absent key
    assert await store.revision() == base + 3


async def test_swap_refuses_a_key_both_put_and_deleted(store: Store) -> None:
    with pytest.raises(ValueError, match=r"cannot both put and delete \['a'\]"):
        await store.swap("k", None, {"a": b"1"}, ["a"])
    assert await store.get("a") is None


async def test_concurrent_swaps_one_wins(store: Store) -> None:
    """Ten writers swap the same key from the same value: exactly one applies."""
    await store.put("version", b"1")
    results: list[int | None] = []

    async def swap(n: int) -> None:
        results.append(await store.swap("version", b"1", {"version": b"2", f"by/{n}": b"x"}))

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(swap, n)
    assert sum(r is not None for r in results) == 1
    assert len(await store.items("by/")) == 1 and await store.get("version") == b"2"


_keys = st.sampled_from(["a", "a/b", "a/c", "ab", "b/a", "policies/route/item"])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _keys, st.binary(max_size=8)),
        st.tuples(st.just("delete"), _keys, st.just(b"")),
        st.tuples(st.just("swap"), _keys, st.sampled_from([b"", b"\x00", b"swapped"])),
    ),
    max_size=15,
)


@settings(max_examples=40, deadline=None)
@given(ops=_ops, prefix=st.sampled_from(["", "a", "a/", "b", "policies/"]))
def test_matches_a_dict_model(factory: Factory, ops: list[tuple[str, str, bytes]], prefix: str) -> None:
    """Random puts, deletes and swaps against a dict and an etcd-like revision; a store opened
    again after them holds the same."""

    async def main(directory: Path) -> None:
        model: dict[str, bytes] = {}
        s = await factory(directory)
        revision = await s.revision()
        for op, key, value in ops:
            if op == "put":
                revision += 1
                model[key] = value
                assert await s.put(key, value) == revision
            elif op == "swap":  # expects the value the op carries (b"": absent), puts one key, deletes another
                expected = value or None
                other = "a/b" if key != "a/b" else "a/c"
                puts = {key: b"swapped"} if expected else {}
                result = await s.swap(key, expected, puts, [other])
                if model.get(key) == expected:
                    revision += bool(puts) or other in model  # nothing changed: no new revision
                    model.update(puts)
                    model.pop(other, None)
                    assert result == revision
                else:
                    assert result is None
            else:
                existed = model.pop(key, None) is not None
                revision += existed
                assert await s.delete(key) is existed
            assert await s.get(key) == model.get(key)
        expected = sorted((k, v) for k, v in model.items() if k.startswith(prefix))
        assert await s.items(prefix) == expected
        assert await s.revision() == revision
        await s.aclose()
        if not isinstance(s, MemoryStore) or isinstance(s, FileStore):
            again = await factory(directory)
            assert await again.items("") == sorted(model.items())
            assert await again.revision() >= revision  # etcd's: the id's store may have moved on
            assert again.id == s.id
            await again.aclose()

    with tempfile.TemporaryDirectory() as directory:
        trio.run(main, Path(directory))


# FileStore ----------------------------------------------------------------------------------


async def test_file_store_survives_a_restart(tmp_path: Path) -> None:
    s = await FileStore.open(tmp_path)
    await s.put("policies/route/item", b"v1")
    await s.put("services/db", b"db")
    await s.put("gone", b"x")
    await s.delete("gone")
    await s.aclose()

    again = await FileStore.open(tmp_path)
    assert await again.items("") == [("policies/route/item", b"v1"), ("services/db", b"db")]
    assert await again.revision() == 4
    assert await again.put("services/cache", b"c") == 5  # revisions go on, never back
    await again.aclose()


async def test_the_state_file_format(tmp_path: Path) -> None:
    s = await FileStore.open(tmp_path)
    await s.put("b", b"2")
    await s.put("a", b"\x00\xff")
    state = msgpack.unpackb((tmp_path / "state.msgpack").read_bytes(), raw=False)
    assert state == {"id": s.id, "revision": 2, "items": {"a": b"\x00\xff", "b": b"2"}}
    assert list(state["items"]) == ["a", "b"]  # sorted: equal state, equal bytes
    assert stat.S_IMODE((tmp_path / "state.msgpack").stat().st_mode) == 0o600
    await s.aclose()


async def test_every_change_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    s = await FileStore.open(tmp_path)
    await s.put("k", b"v")
    assert decode_state((tmp_path / "state.msgpack").read_bytes(), "f") == ({"k": b"v"}, 1, s.id)
    await s.delete("k")
    assert decode_state((tmp_path / "state.msgpack").read_bytes(), "f") == ({}, 2, s.id)
    await s.aclose()


async def test_a_missing_file_starts_empty_with_a_new_id_written_at_once(tmp_path: Path) -> None:
    s = await FileStore.open(tmp_path)
    assert await s.items("") == [] and await s.revision() == 0
    assert re.fullmatch("[0-9a-f]{32}", s.id)
    assert decode_state((tmp_path / "state.msgpack").read_bytes(), "f") == ({}, 0, s.id)
    await s.aclose()
    again = await FileStore.open(tmp_path)
    assert again.id == s.id  # the same store after a restart
    await again.aclose()
    other = await FileStore.open(tmp_path / "elsewhere")
    assert other.id != s.id  # another directory, another store
    await other.aclose()


async def test_a_state_file_without_an_id_gets_one_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state file an older build wrote keeps its items and is given an id at its first load."""
    (tmp_path / "state.msgpack").write_bytes(_state({"revision": 3, "items": {"k": b"v"}}))
    s = await FileStore.open(tmp_path)
    assert await s.get("k") == b"v" and await s.revision() == 3
    assert f"the store had no id; it is {s.id} from now on" in caplog.text
    assert decode_state((tmp_path / "state.msgpack").read_bytes(), "f") == ({"k": b"v"}, 3, s.id)
    await s.aclose()
    caplog.clear()
    again = await FileStore.open(tmp_path)
    assert again.id == s.id and "no id" not in caplog.text
    await again.aclose()


def test_a_memory_store_is_a_new_store_each_time() -> None:
    assert MemoryStore().id != MemoryStore().id


async def test_no_temporary_file_remains(tmp_path: Path) -> None:
    s = await FileStore.open(tmp_path)
    for n in range(5):
        await s.put(f"k/{n}", b"v")
    await s.delete("k/0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock", "state.msgpack"]
    await s.aclose()


async def test_a_crash_before_the_rename_leaves_the_last_good_state(tmp_path: Path) -> None:
    s = await FileStore.open(tmp_path)
    await s.put("k", b"good")
    await s.aclose()
    # what a crash between writing the temporary file and renaming it leaves behind
    stray = tmp_path / ".state.msgpack.x7f3k2.tmp"
    stray.write_bytes(encode_state({"k": b"newer but never committed"}, 2, s.id)[:9])

    again = await FileStore.open(tmp_path)
    assert await again.get("k") == b"good"
    assert await again.revision() == 1
    assert not stray.exists()  # cleaned up on open
    await again.aclose()


async def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await FileStore.open(tmp_path)
    await s.put("k", b"old")

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", crash)
    with pytest.raises(StoreFull) as info:
        await s.put("k", b"new")
    assert str(info.value) == (
        f"no space left on device: {tmp_path / 'state.msgpack'} "
        "(nothing was changed; free space on its file system and retry)"
    )
    with pytest.raises(StoreError):
        await s.delete("k")
    monkeypatch.setattr(store_module.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(13, "Denied")))
    with pytest.raises(StoreError) as info:  # any other failure: named as it is, not as a full disk
        await s.put("k", b"new")
    assert not isinstance(info.value, StoreFull)
    assert str(info.value) == f"{tmp_path / 'state.msgpack'}: cannot write the state file: Denied"
    monkeypatch.undo()

    assert await s.get("k") == b"old"  # memory was not changed either
    assert await s.revision() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock", "state.msgpack"]  # temp removed
    await s.aclose()
    again = await FileStore.open(tmp_path)
    assert await again.get("k") == b"old"
    await again.aclose()


def _state(payload: object) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


@pytest.mark.parametrize(
    "data, what",
    [
        (b"", "it is empty"),
        (b"\xc1", "not msgpack"),  # 0xc1 is never used
        (_state({"revision": 2, "items": {"k": b"v"}})[:-3], "not msgpack"),  # truncated
        (_state({"revision": 1, "items": {}}) + b"\x00", "not msgpack"),  # trailing bytes
        (b"garbage that is not msgpack at all", "not msgpack"),
        (_state([1, {}]), "a list where a map of revision and items belongs"),
        (_state({"revision": 1}), "fields ['revision'], expected ['id', 'items', 'revision']"),
        (_state({"revision": 1, "items": {}, "extra": 1}), "fields ['extra', 'items', 'revision']"),
        (_state({"id": "ab" * 15, "revision": 1, "items": {}}), "id 'ababababababababababababababab' is not 32 hex"),
        (_state({"id": 7, "revision": 1, "items": {}}), "id 7 is not 32 hex digits"),
        (_state({"revision": -1, "items": {}}), "revision -1 is not an integer >= 0"),
        (_state({"revision": "3", "items": {}}), "revision '3' is not an integer"),
        (_state({"revision": True, "items": {}}), "revision True is not an integer"),
        (_state({"revision": 1, "items": [1]}), "items is a list, not a map"),
        (_state({"revision": 1, "items": {"k": "text"}}), "the value of 'k' is a str, not bytes"),
        (_state({"revision": 1, "items": {"/k": b"v"}}), "store key '/k' is not a '/'-separated path"),
        (_state({"revision": 1, "items": {b"k": b"v"}}), "a store key is a str, not bytes"),
        (_state({"revision": 0, "items": {"k": b"v"}}), "items at revision 0"),
    ],
)
async def test_a_corrupt_state_file_is_refused(tmp_path: Path, data: bytes, what: str) -> None:
    path = tmp_path / "state.msgpack"
    path.write_bytes(data)
    with pytest.raises(StoreError) as info:
        await FileStore.open(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: corrupt state file: ")
    assert what in message
    assert path.read_bytes() == data  # left as it was, for a human to look at
    # the failed open released the lock: fixing the file is enough
    path.write_bytes(_state({"revision": 1, "items": {"k": b"v"}}))
    s = await FileStore.open(tmp_path)
    assert await s.get("k") == b"v"
    await s.aclose()


async def test_an_unreadable_state_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.msgpack").mkdir()  # reading a directory fails whatever our privileges
    with pytest.raises(StoreError) as info:
        await FileStore.open(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'state.msgpack'}: cannot read the state file: ")


async def test_the_directory_is_created_owner_only(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "data"
    old = os.umask(0o022)
    try:
        s = await FileStore.open(directory)
    finally:
        os.umask(old)
    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    await s.put("k", b"v")
    await s.aclose()


async def test_the_directory_mode_does_not_depend_on_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)  # would make it r-x only
    try:
        s = await FileStore.open(tmp_path / "data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    await s.put("k", b"v")  # and it is writable
    await s.aclose()


async def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o750)
    s = await FileStore.open(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o750  # the operator's choice
    await s.aclose()


async def test_a_file_where_the_directory_belongs(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a directory"):
        await FileStore.open(tmp_path / "data")


async def test_one_store_per_directory(tmp_path: Path) -> None:
    s = await FileStore.open(tmp_path)
    with pytest.raises(StoreError) as info:
        await FileStore.open(tmp_path)
    assert str(info.value) == f"{tmp_path / 'lock'}: the data directory is in use by another store (locked)"
    await s.aclose()
    again = await FileStore.open(tmp_path)  # closing released it
    await again.aclose()


async def test_close_waits_for_a_write_in_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await FileStore.open(tmp_path)
    go = threading.Event()
    write = store_module._write_state

    def slow_write(*args: Any) -> None:
        go.wait(10)
        write(*args)

    monkeypatch.setattr(store_module, "_write_state", slow_write)
    closed = False

    async def close() -> None:
        nonlocal closed
        await s.aclose()
        closed = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.put, "k", b"v")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert not closed  # waiting for the write
        go.set()
    assert closed
    assert decode_state((tmp_path / "state.msgpack").read_bytes(), "f") == ({"k": b"v"}, 1, s.id)
    again = await FileStore.open(tmp_path)  # the lock was released
    assert await again.get("k") == b"v"
    await again.aclose()


def test_repr(tmp_path: Path) -> None:
    assert repr(MemoryStore()) == "<MemoryStore [keys: 0, revision: 0]>"

    async def main() -> None:
        s = await FileStore.open(tmp_path)
        await s.put("k", b"v")
        assert repr(s) == f"<FileStore {str(tmp_path / 'state.msgpack')!r} [id: {s.id}, keys: 1, revision: 1]>"
        await s.aclose()

    trio.run(main)


# open_store ---------------------------------------------------------------------------------


async def test_open_store_memory(tmp_path: Path) -> None:
    async with open_store("memory", tmp_path) as s:
        assert isinstance(s, MemoryStore) and not isinstance(s, FileStore)
        await s.put("k", b"v")
    with pytest.raises(trio.ClosedResourceError):
        await s.get("k")
    assert list(tmp_path.iterdir()) == []


async def test_open_store_file_in_the_data_directory(tmp_path: Path) -> None:
    async with open_store("file", tmp_path / "data") as s:
        assert isinstance(s, FileStore)
        assert s.path == tmp_path / "data" / "state.msgpack"
        await s.put("k", b"v")
    async with open_store("file", tmp_path / "data") as s:  # closed on exit: opens again
        assert await s.get("k") == b"v"


async def test_open_store_file_at_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_store(f"file:{tmp_path / 'elsewhere'}", tmp_path / "data") as s:
        assert isinstance(s, FileStore) and s.directory == tmp_path / "elsewhere"
    monkeypatch.chdir(tmp_path)
    async with open_store("file:relative/dir", Path("/nonexistent")) as s:
        assert isinstance(s, FileStore)
        await s.put("k", b"v")
    assert (tmp_path / "relative" / "dir" / "state.msgpack").exists()


@pytest.mark.parametrize(
    "spec", ["", "mem", "Memory", "memory:", "file:", "files", "etcd:127.0.0.1:2379", "sqlite:x.db", " memory"]
)
def test_open_store_rejects_unknown_specs(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(spec, tmp_path)  # at the call: a command line is checked before anything starts
    assert str(info.value) == (
        f"store {spec!r} is not one of 'memory', 'file' (the data directory), 'file:PATH' "
        "or 'etcd://HOST:PORT[,HOST:PORT...][/PREFIX]'"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "spec, endpoints, prefix",
    [
        ("etcd://127.0.0.1:2379", ["http://127.0.0.1:2379"], "/meshlet/"),
        ("etcd://a:1,b.example:2,[::1]:3", ["http://a:1", "http://b.example:2", "http://[::1]:3"], "/meshlet/"),
        ("etcd://h:2379/mesh", ["http://h:2379"], "/mesh/"),
        ("etcd://h:2379/a/b_c.d-e/", ["http://h:2379"], "/a/b_c.d-e/"),
    ],
)
def test_etcd_specs(spec: str, endpoints: list[str], prefix: str) -> None:
    assert store_module.parse_etcd_spec(spec) == (endpoints, prefix)


@pytest.mark.parametrize(
    "spec, what",
    [
        ("etcd://", "no etcd member: give HOST:PORT[,HOST:PORT...]"),
        ("etcd:///meshlet", "no etcd member"),
        ("etcd://h", "etcd member 'h' is not HOST:PORT"),
        ("etcd://h:", "etcd member 'h:' is not HOST:PORT"),
        ("etcd://h:0", "etcd member 'h:0' is not HOST:PORT"),
        ("etcd://h:65536", "etcd member 'h:65536' is not HOST:PORT"),
        ("etcd://h:1,,g:2", "etcd member '' is not HOST:PORT"),
        ("etcd://h:1,", "etcd member '' is not HOST:PORT"),
        ("etcd://http://h:1", "etcd member 'http:' is not HOST:PORT"),
        ("etcd://h:1/", "the key prefix '/' is not a path like /meshlet or /a/b"),
        ("etcd://h:1//a", "the key prefix '//a' is not a path"),
        ("etcd://h:1/a//b", "the key prefix '/a//b' is not a path"),
        ("etcd://h:1/a b", "the key prefix '/a b' is not a path"),
    ],
)
def test_bad_etcd_specs(tmp_path: Path, spec: str, what: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(spec, tmp_path)
    assert str(info.value).startswith(f"store {spec!r}: {what}")
    assert "as in etcd://127.0.0.1:2379" in str(info.value)  # the fix: what a good one looks like


# EtcdStore ----------------------------------------------------------------------------------


async def test_open_store_etcd(etcd1: EtcdCluster, tmp_path: Path) -> None:
    spec = "etcd://" + ",".join(e.removeprefix("http://") for e in etcd1.endpoints) + "/test/open"
    async with open_store(spec, tmp_path) as s:
        assert isinstance(s, EtcdStore)
        assert s.location == f"etcd {etcd1.endpoints[0]} prefix /test/open/"
        revision = await s.put("policies/route/item", b"v")
        first_id = s.id
    with pytest.raises(trio.ClosedResourceError):
        await s.get("policies/route/item")
    async with Etcd(etcd1.endpoints) as etcd:  # the layout: the prefix, then the path
        _, kvs = await etcd.range_prefix(b"/test/open/")
    assert [(kv.key, kv.value) for kv in kvs] == [
        (b"/test/open/policies/route/item", b"v"),
        (b"/test/open/store-id", first_id.encode()),
    ]
    async with open_store(spec, tmp_path) as s:  # the same store again
        assert s.id == first_id and await s.get("policies/route/item") == b"v"
        assert await s.revision() >= revision
    assert list(tmp_path.iterdir()) == []  # nothing in the data directory


async def test_two_stores_opening_one_empty_prefix_agree_on_the_id(etcd1: EtcdCluster) -> None:
    stores: list[EtcdStore] = []

    async def open_one() -> None:
        stores.append(await EtcdStore.open(Etcd(etcd1.endpoints), "/test/agree/"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(open_one)
    assert len({s.id for s in stores}) == 1 and re.fullmatch("[0-9a-f]{32}", stores[0].id)
    other = await EtcdStore.open(Etcd(etcd1.endpoints), "/test/agree-not/")
    assert other.id != stores[0].id  # another prefix, another store
    for s in [*stores, other]:
        await s.aclose()


async def test_the_store_id_key_is_reserved_and_checked(etcd1: EtcdCluster) -> None:
    s = await EtcdStore.open(Etcd(etcd1.endpoints), "/test/reserved/")
    assert s.key("policies/a") == b"/test/reserved/policies/a" and s.path(b"/test/reserved/policies/a") == "policies/a"
    with pytest.raises(ValueError, match="is reserved"):
        await s.put("store-id", b"x")
    assert await s.items("") == []  # the id is no item
    await s.etcd.put(b"/test/reserved/store-id", b"not an id")
    with pytest.raises(StoreError, match=r"the store id at '/test/reserved/store-id' is b'not an id', not 32 hex"):
        await EtcdStore.open(Etcd(etcd1.endpoints), "/test/reserved/")
    await s.etcd.put(b"/test/reserved/x//y", b"another program's")
    with pytest.raises(StoreError, match="is not a store path"):
        await s.items("")
    await s.aclose()


async def test_etcd_down(tmp_path: Path) -> None:
    with socket.socket() as a, socket.socket() as b:  # two ports nothing listens on
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = a.getsockname()[1], b.getsockname()[1]
        spec = f"etcd://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        with pytest.raises(StoreError) as info:
            async with open_store(spec, tmp_path):
                pass
    message = str(info.value)
    assert message.startswith(f"etcd http://127.0.0.1:{ports[0]},http://127.0.0.1:{ports[1]} prefix /meshlet/: ")
    assert message.count("cannot connect") == 2  # every member, and why
    assert message.endswith(f"(is etcd running? {spec})")


async def test_an_etcd_failure_is_a_store_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
        s = EtcdStore(Etcd([endpoint]), "/test/failure/", "0" * 32)  # as if etcd went away after the open
        for call in (s.get("k"), s.put("k", b"v"), s.delete("k"), s.items(), s.swap("k", None, {}), s.revision()):
            with pytest.raises(StoreError) as info:
                await call
            assert str(info.value).startswith(f"etcd {endpoint} prefix /test/failure/: etcd is unavailable: ")
            assert isinstance(info.value.__cause__, EtcdUnavailable)
    await s.aclose()
