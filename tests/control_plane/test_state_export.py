"""control_plane.state_export: the state file (checked whole before anything is written), the
secrets between a data directory's files and store keys, and export/import on the memory and file
stores. The CLI and a real control plane on an imported data directory: tests/meshlet/test_cli_admin.py."""

from __future__ import annotations

import base64
import json
import os
import random
import stat
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

from control_plane import app, ca, state_export, tokens
from control_plane.state_export import ImportRefused, State, StateFileError, decode, encode, export_state, import_state
from control_plane.store import FileStore, MemoryStore, Store, StoreLocked, new_store_id, open_store

STORE_ID = "0123456789abcdef0123456789abcdef"
ITEMS = {
    "policies/current": b"2",
    "policies/history/00000001": b"\x81\xa1a\x01",
    "policies/history/00000002": b"\x00\xff binary",
    "tokens/abc": b'{"id": "abc"}',
    "secrets/api-token": b"f" * 64 + b"\n",
    "secrets/join-token": b"mjt_0123456789abcdef.secret\n",
    "ca/ca.key": b"-----BEGIN PRIVATE KEY-----\n",
    "ca/ca.crt": b"-----BEGIN CERTIFICATE-----\n",
}
STATE = State(STORE_ID, 57, "2026-12-08T01:00:00Z", ITEMS)


def document(**changes: Any) -> bytes:
    raw = json.loads(encode(STATE))
    raw.update(changes)
    return json.dumps(raw).encode()


def with_item(key: str, text: object) -> bytes:
    raw = json.loads(encode(STATE))
    raw["items"][key] = text
    return json.dumps(raw).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# the file ------------------------------------------------------------------------------------


def test_the_file_is_json_and_decodes_to_what_was_encoded() -> None:
    data = encode(STATE)
    raw = json.loads(data)
    assert {k: raw[k] for k in ("format", "version", "store_id", "revision")} == {
        "format": "meshlet-state",
        "version": 1,
        "store_id": STORE_ID,
        "revision": 57,
    }
    assert raw["items"]["policies/current"] == b64(b"2")
    assert decode(data) == STATE
    seen: list[tuple[int, int]] = []
    decode(data, lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(ITEMS), len(ITEMS))


BIG = "A" * ((state_export.MAX_VALUE_BYTES + 2) // 3 * 4 + 4)
BAD_FILES = [
    ("truncated", encode(STATE)[:-40], "not JSON"),
    ("empty", b"", "not JSON"),
    ("not utf-8", b"\xff\xfe{}", "not JSON"),
    ("a list", b"[]", "not a meshlet state file"),
    ("another format", document(format="etcd-snapshot"), "not a meshlet state file"),
    ("a newer version", document(version=2), "version 2: this meshlet reads version 1"),
    ("version true", document(version=True), "version True"),
    ("an unknown field", document(extra=1), "unknown: ['extra']"),
    ("a bad store id", document(store_id="xyz"), "store_id 'xyz' is not 32 hex digits"),
    ("a negative revision", document(revision=-1), "revision -1"),
    ("items a list", document(items=[]), "items is a list"),
    ("an empty segment", with_item("policies//x", b64(b"v")), "'policies//x' is not a '/'-separated path"),
    ("a leading slash", with_item("/policies", b64(b"v")), "'/policies' is not a '/'-separated path"),
    ("a CA file out of its directory", with_item("ca/../../etc/passwd", b64(b"v")), "a CA file's key is ca/NAME"),
    ("a hidden CA file", with_item("ca/.ca.key.tmp", b64(b"v")), "a CA file's key is ca/NAME"),
    ("an unknown secret", with_item("secrets/other", b64(b"v")), "not a secret this control plane knows"),
    ("a long key", with_item("k/" + "x" * 2000, b64(b"v")), "longer than 1024 bytes"),
    ("bad base64", with_item("policies/current", "not base64!"), "the value of 'policies/current' is not base64"),
    ("a number for a value", with_item("policies/current", 7), "is not base64 of at most"),
    ("an oversized value", with_item("policies/current", BIG), "is not base64 of at most"),
    ("a token of two lines", with_item("secrets/api-token", b64(b"a\nb")), "is not a token"),
    ("an empty token", with_item("secrets/join-token", ""), "is not a token"),
    ("an oversized CA file", with_item("ca/ca.crt", b64(b"x" * (1024 * 1024 + 1))), "larger than 1048576 bytes"),
]


@pytest.mark.parametrize(("data", "message"), [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_a_bad_file_is_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(StateFileError) as info:
        decode(data)
    assert message in str(info.value)


def test_a_file_over_the_limit_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_export, "MAX_FILE_BYTES", 100)
    with pytest.raises(StateFileError, match="larger than 100 bytes"):
        decode(encode(STATE))


@pytest.mark.parametrize(
    ("key", "path", "mode"),
    [
        ("secrets/api-token", "api-token", 0o600),
        ("secrets/join-token", "join-token", 0o600),
        ("ca/ca.key", "ca/ca.key", 0o600),
        ("ca/next.key", "ca/next.key", 0o600),
        ("ca/ca.crt", "ca/ca.crt", 0o644),
        ("ca/authority.json", "ca/authority.json", 0o644),
    ],
)
def test_each_secret_has_a_file_and_its_mode(key: str, path: str, mode: int) -> None:
    assert state_export.is_data_dir_key(key)
    assert state_export.data_dir_path(key) == Path(path)
    assert state_export.file_mode(key) == mode


def test_the_names_are_the_control_planes() -> None:
    assert state_export.API_TOKEN_FILE == app.TOKEN_FILE
    assert state_export.JOIN_TOKEN_FILE == tokens.JOIN_TOKEN_FILE
    assert state_export.CA_DIRECTORY == app.CA_DIRECTORY
    names = {ca.KEY_FILE, ca.CERT_FILE, ca.AUTHORITY_FILE, ca.NEXT_KEY_FILE, ca.NEXT_CERT_FILE}
    for name in names:
        state_export.check_item_key("ca/" + name)
    assert not state_export.is_data_dir_key("policies/current")


def test_counts_group_keys_by_what_they_hold() -> None:
    assert state_export.counts(ITEMS) == "policies: 1, history: 2, tokens: 1, secrets: 2, ca: 2"
    assert state_export.counts(["services/a", "policies/current"]) == "policies: 1, services: 1"


# the stores' replace_all ---------------------------------------------------------------------


async def test_replace_all_takes_the_items_and_the_id(tmp_path: Path) -> None:
    for store in (MemoryStore(), await FileStore.open(tmp_path / "data")):
        await store.put("old/key", b"gone")
        revision = await store.replace_all({"policies/current": b"1"}, STORE_ID)
        assert (revision, store.id) == (2, STORE_ID)
        assert await store.items("") == [("policies/current", b"1")]
        with pytest.raises(ValueError, match="not 32 hex digits"):
            await store.replace_all({}, "nope")
        with pytest.raises(ValueError, match="not a '/'-separated path"):
            await store.replace_all({"a//b": b""}, STORE_ID)
        assert await store.revision() == 2  # nothing changed
        await store.aclose()
    reopened = await FileStore.open(tmp_path / "data")  # one state write, the id with it
    assert (reopened.id, await reopened.items("")) == (STORE_ID, [("policies/current", b"1")])
    await reopened.aclose()


# export and import ---------------------------------------------------------------------------


async def test_round_trip_through_memory() -> None:
    source = MemoryStore()
    for key, value in ITEMS.items():
        await source.put(key, value)
    state = await export_state(source, None, now=1_800_000_000.0)
    assert (state.store_id, state.revision, state.exported_at) == (source.id, 8, "2027-01-15T08:00:00Z")
    assert dict(state.items) == ITEMS  # secrets as keys: a store with no data directory

    target = MemoryStore()
    revision = await import_state(target, decode(encode(state)), None, force=False)
    assert (revision, target.id) == (1, source.id)
    assert dict(await target.items("")) == ITEMS


def make_data_dir(data_dir: Path) -> dict[str, bytes]:
    """A data directory as a control plane leaves it: its tokens and CA files."""
    app.api_token(data_dir)
    tokens.bootstrap_token_file(data_dir)
    ca.open_authority(data_dir / "ca", "meshlet.local", time.time(), random.Random(1))
    return {
        "secrets/api-token": (data_dir / "api-token").read_bytes(),
        "secrets/join-token": (data_dir / "join-token").read_bytes(),
        "ca/ca.key": (data_dir / "ca" / "ca.key").read_bytes(),
        "ca/ca.crt": (data_dir / "ca" / "ca.crt").read_bytes(),
    }


async def test_round_trip_file_to_file(tmp_path: Path) -> None:
    secrets = make_data_dir(tmp_path / "a")
    source = await FileStore.open(tmp_path / "a")
    await source.put("policies/current", b"1")
    await source.put("tokens/t1", b"{}")
    (tmp_path / "a" / "ca" / ".ca.key.x.tmp").write_bytes(b"a write a crash left")  # not exported
    state = await export_state(source, tmp_path / "a", now=0.0)
    await source.aclose()
    assert dict(state.items) == {"policies/current": b"1", "tokens/t1": b"{}", **secrets}

    target = await FileStore.open(tmp_path / "b")
    await import_state(target, decode(encode(state)), tmp_path / "b", force=False)
    await target.aclose()
    b = tmp_path / "b"
    assert {key: (b / state_export.data_dir_path(key)).read_bytes() for key in secrets} == secrets
    modes = {path: stat.S_IMODE(os.stat(b / path).st_mode) for path in ("api-token", "join-token", "ca", "ca/ca.key")}
    assert modes == {"api-token": 0o600, "join-token": 0o600, "ca": 0o700, "ca/ca.key": 0o600}
    assert stat.S_IMODE(os.stat(b / "ca" / "ca.crt").st_mode) == 0o644

    reopened = await FileStore.open(b)  # the id and items survive: one state write
    assert reopened.id == state.store_id
    assert await reopened.items("") == [("policies/current", b"1"), ("tokens/t1", b"{}")]
    await reopened.aclose()
    assert app.api_token(b) == secrets["secrets/api-token"].decode().strip()  # the control plane reads them back
    ca.open_authority(b / "ca", "meshlet.local", time.time(), random.Random(2))


async def test_a_target_that_is_not_empty_is_refused_without_force(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "b")  # a control plane started once: its tokens and CA
    (tmp_path / "b" / "ca" / "next.key").write_bytes(b"a staged root's key")
    (tmp_path / "b" / "ca" / "next.key").chmod(0o600)
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    target = await FileStore.open(tmp_path / "b")
    await target.put("policies/current", b"9")
    with pytest.raises(ImportRefused) as info:
        await import_state(target, STATE, tmp_path / "b", force=False)
    assert str(info.value) == (
        f"the target is not empty: 6 keys (policies: 1, secrets: 2, ca: 3) in {target.location} and {tmp_path / 'b'}; "
        "import --force replaces all of it"
    )
    for path, data in before.items():
        assert path.read_bytes() == data
    assert await target.items("") == [("policies/current", b"9")]

    await import_state(target, STATE, tmp_path / "b", force=True)  # the target becomes the state exactly
    assert target.id == STORE_ID
    assert sorted(k for k, _ in await target.items("")) == sorted(
        k for k in ITEMS if not state_export.is_data_dir_key(k)
    )
    assert sorted(os.listdir(tmp_path / "b" / "ca")) == ["ca.crt", "ca.key"]  # next.key was not in the state
    assert (tmp_path / "b" / "api-token").read_bytes() == ITEMS["secrets/api-token"]
    await target.aclose()


async def test_export_refuses_a_secret_file_it_cannot_trust(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "a")
    (tmp_path / "a" / "api-token").chmod(0o644)
    async with _store(tmp_path / "a") as store:
        with pytest.raises(Exception, match="open to group or others"):
            await export_state(store, tmp_path / "a", now=0.0)
    (tmp_path / "a" / "api-token").unlink()
    (tmp_path / "a" / "api-token").symlink_to(tmp_path / "a" / "join-token")
    async with _store(tmp_path / "a") as store:
        with pytest.raises(Exception, match="cannot open"):
            await export_state(store, tmp_path / "a", now=0.0)


async def test_a_file_store_in_use_is_locked(tmp_path: Path) -> None:
    first = await FileStore.open(tmp_path / "a")
    with pytest.raises(StoreLocked, match="in use by another store"):
        await FileStore.open(tmp_path / "a")
    await first.aclose()


def _store(directory: Path) -> AbstractAsyncContextManager[Store]:
    return open_store("file", directory)


def test_an_empty_state_round_trips() -> None:
    state = State(new_store_id(), 0, "", {})
    assert decode(encode(state)) == state


async def test_a_store_that_cannot_be_replaced_is_refused() -> None:
    class Plain:  # the Store protocol without replace_all
        location, id = "a plain store", STORE_ID

        async def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
            await trio.lowlevel.checkpoint()
            return []

    with pytest.raises(ImportRefused, match="a plain store: this store cannot be imported into"):
        await import_state(Plain(), STATE, None, force=False)  # type: ignore[arg-type]


async def test_a_target_whose_data_dir_cannot_be_read_is_refused(tmp_path: Path) -> None:
    target = await FileStore.open(tmp_path / "b")
    (tmp_path / "b" / "ca").write_bytes(b"a file where the CA directory belongs")
    with pytest.raises(ImportRefused, match="cannot tell what the target holds"):
        await import_state(target, STATE, tmp_path / "b", force=True)
    bad = State(STORE_ID, 1, "", {"ca/../api-token": b"x"})  # not from decode: checked all the same
    with pytest.raises(ImportRefused, match="a CA file's key is ca/NAME"):
        await import_state(target, bad, None, force=True)
    assert await target.items("") == []
    await target.aclose()
