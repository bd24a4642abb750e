"""Where the control plane keeps what must survive a restart: applied policy and static services.

One small interface, :class:`Store`, shaped like etcd's KV API, so the etcd store (a later issue)
maps onto it 1:1: ``get`` is a range on one key, ``put`` a put, ``delete`` a delete-range on one key,
``items(prefix)`` a range from ``prefix`` to ``prefix`` with its last byte + 1, ``revision`` the
header's revision. Keys are ``/``-separated paths (``policies/route/item``); values are bytes, and
callers encode them. Revisions follow etcd too: every put makes one (even of an unchanged value), a
delete only when it removed something, and a store never written to is at revision 0 (a store on
etcd, control_plane/etcd/store.py, has etcd's revisions: the cluster's, which other keys advance).
``swap`` changes several keys in one revision if one key holds what the caller expects.

The registry is not stored: sidecars register again when they reconnect to a restarted control plane.

Every store has an ``id``, 128 random bits in hex, made when the store is created and kept with its
state: sidecars remember which store their policies came from, and a control plane on another store
(an empty data directory, another mesh's) cannot remove them (docs/security.md, "Empty or foreign
store"). A memory store is a new store at every start.

:class:`MemoryStore` is for tests and throwaway demos. :class:`FileStore`, the embedded default, keeps
the state in memory and writes all of it to ``<directory>/state.msgpack`` on every change, before the
change is visible or acknowledged. A write goes to a temporary file in the same directory, which is
fsynced, renamed over the state file and followed by an fsync of the directory, so a crash at any
point leaves either the old state or the new one, never a torn file; leftover temporary files are
removed on open. A state file that cannot be read or decoded stops the open with :class:`StoreError`:
starting empty would silently drop applied configuration. An exclusive lock on ``<directory>/lock``
keeps a second control plane from writing the same directory (each would overwrite the other's
changes). Policy state is small, so rewriting the whole file per change is cheaper than a log.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol

import msgpack
import trio

from meshlet.private_files import fsync_directory, write_replacing

STATE_FILE = "state.msgpack"
LOCK_FILE = "lock"
_TEMP_PREFIX = f".{STATE_FILE}."  # + random + _TEMP_SUFFIX: write_replacing's name for a write in progress
_TEMP_SUFFIX = ".tmp"
DIRECTORY_MODE = 0o700  # the state may hold credentials (certificates come later): owner only
STORE_SPECS = "'memory', 'file' (the data directory), 'file:PATH' or 'etcd://HOST:PORT[,HOST:PORT...][/PREFIX]'"
_STORE_ID = re.compile(r"[0-9a-f]{32}")

log = logging.getLogger("meshlet.cp.store")


# What running replicas keep under an etcd store (control_plane/replicas/records.py): their
# registry, their cards, the leader's key. State, not configuration: `meshlet admin export`
# leaves it out, and an import neither writes nor removes it.
LIVE_PREFIXES = ("registry/", "replicas/")
LIVE_KEYS = ("leader",)


def is_live(key: str) -> bool:
    return key in LIVE_KEYS or key.startswith(LIVE_PREFIXES)


def new_store_id() -> str:
    """A store's id: 128 random bits, hex."""
    return secrets.token_hex(16)


class StoreError(Exception):
    """The store cannot be opened or written: the message names the file and what is wrong."""


class StoreLocked(StoreError):
    """Another process holds the data directory's lock: a control plane runs on it."""


class StoreFull(StoreError):
    """A write failed for want of space (ENOSPC, or the disk quota, EDQUOT): nothing was changed."""


class Store(Protocol):
    location: str  # what error messages name: the state file's path
    id: str  # made when the store was created, never changed: tells this store's data from another's

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> int:
        """Store a value; returns the store's new revision."""
        ...

    async def delete(self, key: str) -> bool:
        """True if the key existed (and a new revision was made)."""
        ...

    async def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        """Every (key, value) whose key starts with ``prefix`` (a plain string prefix), by key."""
        ...

    async def swap(
        self, key: str, expected: bytes | None, puts: Mapping[str, bytes], deletes: Iterable[str] = ()
    ) -> int | None:
        """If ``key``'s value is ``expected`` (None: the key is absent), apply every put and delete
        at once, in one revision, and return the store's revision (a new one if anything changed);
        else change nothing and return None. What several writers of one store (control-plane
        replicas on etcd) change together. A key both put and deleted is a ValueError."""
        ...

    async def revision(self) -> int: ...

    async def aclose(self) -> None: ...


def check_key(key: object) -> str:
    """A key is a non-empty ``/``-separated path with no empty segment: ``policies/route/item``."""
    if not isinstance(key, str):
        raise TypeError(f"a store key is a str, not {type(key).__name__}")
    if not key or key.startswith("/") or key.endswith("/") or "//" in key:
        raise ValueError(f"store key {key!r} is not a '/'-separated path like 'policies/route/item'")
    return key


def _check_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"a store value is bytes (callers encode), not {type(value).__name__}")
    return value


def _checked_state(items: Mapping[str, bytes], store_id: str) -> dict[str, bytes]:
    if not (isinstance(store_id, str) and _STORE_ID.fullmatch(store_id)):
        raise ValueError(f"store id {store_id!r} is not 32 hex digits")
    return {check_key(key): _check_value(value) for key, value in items.items()}


def check_swap(
    key: str, expected: bytes | None, puts: Mapping[str, bytes], deletes: Iterable[str]
) -> tuple[dict[str, bytes], list[str]]:
    """A swap's arguments checked: (the puts, the deletes), each key a path, no key in both."""
    check_key(key)
    if expected is not None:
        _check_value(expected)
    checked = {check_key(k): _check_value(v) for k, v in puts.items()}
    removed = [check_key(k) for k in deletes]
    both = sorted(set(checked) & set(removed))
    if both:
        raise ValueError(f"a swap cannot both put and delete {both}")
    return checked, list(dict.fromkeys(removed))


def swapped(items: dict[str, bytes], puts: dict[str, bytes], deletes: list[str]) -> dict[str, bytes] | None:
    """``items`` after the puts and deletes, or None when they change nothing (no new revision)."""
    if not puts and not any(k in items for k in deletes):
        return None
    after = dict(items)
    after.update(puts)
    for key in deletes:
        after.pop(key, None)
    return after


class MemoryStore:
    """A dict and a revision counter. Loses everything when the process ends."""

    location = "the memory store"  # what error messages name

    def __init__(self, store_id: str | None = None) -> None:
        self.id = store_id or new_store_id()
        self._items: dict[str, bytes] = {}
        self._revision = 0
        self._closed = False

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        await trio.lowlevel.checkpoint()
        self._check_open()
        return self._items.get(key)

    async def put(self, key: str, value: bytes) -> int:
        check_key(key)
        _check_value(value)
        await trio.lowlevel.checkpoint()
        self._check_open()
        self._revision += 1
        self._items[key] = value
        return self._revision

    async def delete(self, key: str) -> bool:
        check_key(key)
        await trio.lowlevel.checkpoint()
        self._check_open()
        if key not in self._items:
            return False
        self._revision += 1
        del self._items[key]
        return True

    async def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        if not isinstance(prefix, str):
            raise TypeError(f"a key prefix is a str, not {type(prefix).__name__}")
        await trio.lowlevel.checkpoint()
        self._check_open()
        return sorted((k, v) for k, v in self._items.items() if k.startswith(prefix))

    async def swap(
        self, key: str, expected: bytes | None, puts: Mapping[str, bytes], deletes: Iterable[str] = ()
    ) -> int | None:
        checked, removed = check_swap(key, expected, puts, deletes)
        await trio.lowlevel.checkpoint()
        self._check_open()
        if self._items.get(key) != expected:
            return None
        after = swapped(self._items, checked, removed)
        if after is not None:
            self._items, self._revision = after, self._revision + 1
        return self._revision

    async def revision(self) -> int:
        await trio.lowlevel.checkpoint()
        self._check_open()
        return self._revision

    async def replace_all(self, items: Mapping[str, bytes], store_id: str) -> int:
        """Make the store hold exactly ``items``, under the id ``store_id`` (another store's,
        restored by ``meshlet admin import``), in one revision; returns it."""
        checked = _checked_state(items, store_id)
        await trio.lowlevel.checkpoint()
        self._check_open()
        self._items, self.id = checked, store_id
        self._revision += 1
        return self._revision

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the store is closed")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [keys: {len(self._items)}, revision: {self._revision}]>"


class FileStore(MemoryStore):
    """:class:`MemoryStore` plus ``<directory>/state.msgpack``, rewritten atomically on every change.

    Open with ``await FileStore.open(directory)``; the constructor takes an already loaded state."""

    def __init__(self, directory: Path, items: dict[str, bytes], revision: int, lock_fd: int, store_id: str) -> None:
        super().__init__(store_id)
        self.directory = directory
        self.path = directory / STATE_FILE
        self.location = str(self.path)
        self._items = items
        self._revision = revision
        self._lock_fd = lock_fd
        self._write_lock = trio.Lock()  # one write at a time, each of the then-current state

    @classmethod
    async def open(cls, directory: Path) -> FileStore:
        """Create the directory (mode 0700) if needed, take its lock and load the state file."""
        directory = Path(directory)
        items, revision, lock_fd, store_id = await trio.to_thread.run_sync(_open_directory, directory)
        return cls(directory, items, revision, lock_fd, store_id)

    async def put(self, key: str, value: bytes) -> int:
        check_key(key)
        _check_value(value)
        async with self._write_lock:
            self._check_open()
            items = dict(self._items)  # committed only once it is on disk: readers never see it earlier
            items[key] = value
            return await self._commit(items, self._revision + 1)

    async def delete(self, key: str) -> bool:
        check_key(key)
        async with self._write_lock:
            self._check_open()
            if key not in self._items:
                return False
            items = dict(self._items)
            del items[key]
            await self._commit(items, self._revision + 1)
            return True

    async def replace_all(self, items: Mapping[str, bytes], store_id: str) -> int:
        """As MemoryStore's, in one state write: the old state or the new one, never a mix."""
        checked = _checked_state(items, store_id)
        async with self._write_lock:
            self._check_open()
            revision = self._revision + 1
            await trio.to_thread.run_sync(_write_state, self.path, checked, revision, store_id)
            self._items, self._revision, self.id = checked, revision, store_id
            return revision

    async def swap(
        self, key: str, expected: bytes | None, puts: Mapping[str, bytes], deletes: Iterable[str] = ()
    ) -> int | None:
        checked, removed = check_swap(key, expected, puts, deletes)
        async with self._write_lock:
            self._check_open()
            if self._items.get(key) != expected:
                return None
            after = swapped(self._items, checked, removed)
            if after is None:
                return self._revision
            return await self._commit(after, self._revision + 1)  # one state write for all of it

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):  # the lock file must be released even when cancelled
            async with self._write_lock:  # let a write in progress finish
                os.close(self._lock_fd)

    async def _commit(self, items: dict[str, bytes], revision: int) -> int:
        # Not abandoned on cancel: the write completes, and memory then matches the file.
        await trio.to_thread.run_sync(_write_state, self.path, items, revision, self.id)
        self._items, self._revision = items, revision
        return revision

    def __repr__(self) -> str:
        return f"<FileStore {str(self.path)!r} [id: {self.id}, keys: {len(self._items)}, revision: {self._revision}]>"


def open_store(spec: str, data_dir: Path) -> AbstractAsyncContextManager[Store]:
    """The store a spec names, for ``async with`` (closed on exit).

    ``memory``; ``file`` (a FileStore in ``data_dir``); ``file:PATH`` (a FileStore in PATH, relative
    to the working directory, ``~`` expanded); ``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`` (an
    etcd cluster's members, the keys under PREFIX, ``/meshlet/`` by default). A bad spec raises
    ``ValueError`` here, at the call, so a command line is checked before anything starts; an etcd
    that cannot be reached is a ``StoreError`` when the store is opened."""
    if spec == "memory":
        return _opened(None)
    if spec == "file":
        return _opened(Path(data_dir))
    if spec.startswith("file:") and spec != "file:":
        return _opened(Path(spec.removeprefix("file:")).expanduser())
    if spec.startswith("etcd://"):
        endpoints, prefix = parse_etcd_spec(spec)
        return _opened_etcd(spec, endpoints, prefix)
    raise ValueError(f"store {spec!r} is not one of {STORE_SPECS}")


_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")
_PREFIX = re.compile(r"(/[A-Za-z0-9._-]+)+/?")


def parse_etcd_spec(spec: str) -> tuple[list[str], str]:
    """``etcd://H:P[,H:P...][/PREFIX]`` → (the members' URLs, the key prefix, ending in ``/``)."""
    members, slash, path = spec.removeprefix("etcd://").partition("/")
    example = "etcd://127.0.0.1:2379 or etcd://10.0.0.1:2379,10.0.0.2:2379/meshlet"
    if not members:
        raise ValueError(f"store {spec!r}: no etcd member: give HOST:PORT[,HOST:PORT...], as in {example}")
    endpoints = []
    for member in members.split(","):
        match = _HOST_PORT.fullmatch(member)
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"store {spec!r}: etcd member {member!r} is not HOST:PORT, as in {example}")
        endpoints.append(f"http://{member}")
    prefix = "/" + path if slash else "/meshlet/"
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"store {spec!r}: the key prefix {prefix!r} is not a path like /meshlet or /a/b "
            f"(letters, digits, '.', '_', '-'), as in {example}"
        )
    return endpoints, prefix.rstrip("/") + "/"


@asynccontextmanager
async def _opened(directory: Path | None) -> AsyncIterator[Store]:
    store: Store = MemoryStore() if directory is None else await FileStore.open(directory)
    try:
        yield store
    finally:
        await store.aclose()


@asynccontextmanager
async def _opened_etcd(spec: str, endpoints: list[str], prefix: str) -> AsyncIterator[Store]:
    from .etcd import Etcd  # here: the file store does not load httpx
    from .etcd.store import EtcdStore

    etcd = Etcd(endpoints)
    try:
        store = await EtcdStore.open(etcd, prefix)
    except BaseException as e:
        with trio.CancelScope(shield=True):
            await etcd.aclose()
        if isinstance(e, StoreError):
            raise StoreError(f"{e} (is etcd running? {spec})") from e.__cause__
        raise
    try:
        yield store
    finally:
        await store.aclose()


# file I/O: blocking, run in a worker thread ---------------------------------------------------


def _open_directory(directory: Path) -> tuple[dict[str, bytes], int, int, str]:
    try:
        if not directory.exists():
            directory.mkdir(mode=DIRECTORY_MODE, parents=True)
            directory.chmod(DIRECTORY_MODE)  # whatever the umask
            fsync_directory(directory.parent)
        elif not directory.is_dir():
            raise StoreError(f"{directory}: exists and is not a directory")
        lock_path = directory / LOCK_FILE
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(f"{directory}: cannot open the data directory: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(f"{lock_path}: the data directory is in use by another store (locked)") from None
        for stray in directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):  # a write a crash interrupted
            with contextlib.suppress(OSError):
                stray.unlink()
        path = directory / STATE_FILE
        items, revision, store_id = _read_state(path)
        if not store_id:  # a new store, or a state file written before stores had ids
            store_id = new_store_id()
            _write_state(path, items, revision, store_id)  # kept from the first start on
            if revision:
                log.warning("%s: the store had no id; it is %s from now on", path, store_id)
            else:
                log.info("%s: a new store, id %s", path, store_id)
    except BaseException:
        os.close(lock_fd)
        raise
    return items, revision, lock_fd, store_id


def _read_state(path: Path) -> tuple[dict[str, bytes], int, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, 0, ""
    except OSError as e:
        raise StoreError(f"{path}: cannot read the state file: {e.strerror or e}") from e
    return decode_state(data, path)


def decode_state(data: bytes, path: Path | str) -> tuple[dict[str, bytes], int, str]:
    """The items, revision and store id ("" in a file written before stores had ids) in a state
    file's bytes; ``StoreError`` names the file and the fault."""

    def bad(what: str) -> StoreError:
        return StoreError(
            f"{path}: corrupt state file: {what} (restore it from a backup, or move it away to start empty)"
        )

    if not data:
        raise bad("it is empty")
    try:
        state = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several types for truncated or malformed input
        raise bad(f"not msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise bad(f"a {type(state).__name__} where a map of revision and items belongs")
    if set(state) - {"id"} != {"revision", "items"}:
        raise bad(f"fields {sorted(map(str, state))}, expected ['id', 'items', 'revision']")
    revision, items, store_id = state["revision"], state["items"], state.get("id", "")
    if "id" in state and not (isinstance(store_id, str) and _STORE_ID.fullmatch(store_id)):
        raise bad(f"id {store_id!r} is not 32 hex digits")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise bad(f"revision {revision!r} is not an integer >= 0")
    if not isinstance(items, dict):
        raise bad(f"items is a {type(items).__name__}, not a map")
    for key, value in items.items():
        try:
            check_key(key)
        except (TypeError, ValueError) as e:
            raise bad(str(e)) from None
        if not isinstance(value, bytes):
            raise bad(f"the value of {key!r} is a {type(value).__name__}, not bytes")
    if items and revision == 0:
        raise bad("items at revision 0")
    return items, revision, store_id


def encode_state(items: dict[str, bytes], revision: int, store_id: str) -> bytes:
    state = {"id": store_id, "revision": revision, "items": dict(sorted(items.items()))}
    data: bytes = msgpack.packb(state, use_bin_type=True)
    return data  # (msgpack is untyped)


def _write_state(path: Path, items: dict[str, bytes], revision: int, store_id: str) -> None:
    data = encode_state(items, revision, store_id)
    try:
        write_replacing(path, data)  # 0600, whole or not at all, the rename durable
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(
                f"no space left on device: {path} (nothing was changed; free space on its file system and retry)"
            ) from e
        raise StoreError(f"{path}: cannot write the state file: {e.strerror or e}") from e
