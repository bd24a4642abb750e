"""The control plane's :class:`~control_plane.store.Store` on etcd: every key under one prefix
(``/meshlet/`` unless told), the store id at ``<prefix>store-id``.

A path ``policies/route/item`` is the etcd key ``/meshlet/policies/route/item``; values are kept
as they are. Revisions are etcd's own (global to the cluster, so they start above 0 and other
writers of the same etcd advance them); ``swap`` is one etcd transaction. An etcd error becomes
:class:`StoreError` naming the store and why (the etcd error is its cause). ``etcd`` is the client
itself, for what the store does not cover (leases, watches, elections).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Iterable, Mapping
from typing import TypeVar

import trio

from ..store import StoreError, check_key, check_swap, is_live, new_store_id
from .client import Etcd
from .codec import prefix_end
from .types import Compare, EtcdError, EtcdUnavailable, Op

DEFAULT_PREFIX = "/meshlet/"
TXN_OPS = 128  # etcd's --max-txn-ops default
STORE_ID = "store-id"  # the path of the store's id: reserved, never an item
_STORE_ID = re.compile(r"[0-9a-f]{32}")

log = logging.getLogger("meshlet.cp.store")

T = TypeVar("T")


class EtcdStore:
    """Open with ``await EtcdStore.open(etcd, prefix)``; ``aclose`` closes the client too."""

    def __init__(self, etcd: Etcd, prefix: str, store_id: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.id = store_id
        self.location = f"etcd {','.join(etcd.endpoints)} prefix {prefix}"
        self._closed = False

    @classmethod
    async def open(cls, etcd: Etcd, prefix: str = DEFAULT_PREFIX) -> EtcdStore:
        """The store under ``prefix``: its id read, or made when there is none (one transaction,
        so two stores opening the same empty prefix at once agree on one). The store owns the
        client: closing the store closes it, and so does a failed open."""
        store = cls(etcd, check_prefix(prefix), "")
        try:
            await store._read_id()
        except BaseException:
            with trio.CancelScope(shield=True):
                await etcd.aclose()
            raise
        return store

    async def _read_id(self) -> None:
        key = self.key(STORE_ID)
        made = new_store_id()
        result = await self._etcd(
            self.etcd.txn([Compare.create_revision(key, 0)], [Op.put(key, made.encode())], [Op.range(key)])
        )
        if result.succeeded:
            log.info("%s: a new store, id %s", self.location, made)
            self.id = made
            return
        kvs = result.responses[0].kvs if result.responses else ()
        found = kvs[0].value if kvs else b""
        if not _STORE_ID.fullmatch(found.decode("ascii", "replace")):
            raise StoreError(
                f"{self.location}: the store id at {key.decode()!r} is {found[:64]!r}, not 32 hex digits "
                "(another program's key? remove it, or choose another prefix)"
            )
        self.id = found.decode()

    def key(self, path: str) -> bytes:
        """The etcd key of a store path."""
        return self._prefix + check_key(path).encode()

    def path(self, key: bytes) -> str:
        """The store path of an etcd key under the prefix."""
        if not key.startswith(self._prefix):
            raise ValueError(f"etcd key {key!r} is not under the store's prefix {self.prefix!r}")
        try:
            return check_key(key[len(self._prefix) :].decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"etcd key {key!r} is not a store path ({e})") from None

    async def get(self, key: str) -> bytes | None:
        etcd_key = self._item_key(key)
        await self._check_open()
        _, kvs = await self._etcd(self.etcd.range(etcd_key))
        return kvs[0].value if kvs else None

    async def put(self, key: str, value: bytes) -> int:
        etcd_key = self._item_key(key)
        if not isinstance(value, bytes):
            raise TypeError(f"a store value is bytes (callers encode), not {type(value).__name__}")
        await self._check_open()
        return await self._etcd(self.etcd.put(etcd_key, value))

    async def delete(self, key: str) -> bool:
        etcd_key = self._item_key(key)
        await self._check_open()
        _, deleted = await self._etcd(self.etcd.delete(etcd_key))
        return deleted > 0

    async def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        if not isinstance(prefix, str):
            raise TypeError(f"a key prefix is a str, not {type(prefix).__name__}")
        await self._check_open()
        start = self._prefix + prefix.encode()
        _, kvs = await self._etcd(self.etcd.range(start, prefix_end(start)))
        found = []
        for kv in kvs:
            try:
                path = self.path(kv.key)
            except ValueError as e:
                raise StoreError(f"{self.location}: {e} (written by another program?)") from None
            if path != STORE_ID:
                found.append((path, kv.value))
        return found  # etcd returns them by key, and the prefix is common: by path

    async def swap(
        self, key: str, expected: bytes | None, puts: Mapping[str, bytes], deletes: Iterable[str] = ()
    ) -> int | None:
        checked, removed = check_swap(key, expected, puts, deletes)
        for path in (key, *checked, *removed):
            self._item_key(path)
        await self._check_open()
        etcd_key = self.key(key)
        compare = Compare.create_revision(etcd_key, 0) if expected is None else Compare.value(etcd_key, expected)
        ops = [Op.put(self.key(k), v) for k, v in checked.items()] + [Op.delete(self.key(k)) for k in removed]
        result = await self._etcd(self.etcd.txn([compare], ops))
        return result.revision if result.succeeded else None

    async def revision(self) -> int:
        await self._check_open()
        revision, _ = await self._etcd(self.etcd.range(self.key(STORE_ID), keys_only=True))
        return revision

    async def replace_all(self, items: Mapping[str, bytes], store_id: str) -> int:
        """Make the prefix hold exactly ``items`` under the id ``store_id`` (``meshlet admin
        import``), leaving what running replicas keep there (``is_live``) alone. etcd takes at
        most TXN_OPS operations a transaction, so a large state is several revisions: a failure
        part way says how far it got (importing again with --force finishes it)."""
        if not (isinstance(store_id, str) and _STORE_ID.fullmatch(store_id)):
            raise ValueError(f"store id {store_id!r} is not 32 hex digits")
        for path, value in items.items():
            self._item_key(path)  # ValueError: not a path, or the id's own key
            if not isinstance(value, bytes):
                raise TypeError(f"a store value is bytes (callers encode), not {type(value).__name__}")
            if is_live(path):
                raise ValueError(f"{path!r} is what running replicas keep, not configuration: it is never imported")
        checked = dict(items)
        old = [path for path, _ in await self.items("") if not is_live(path) and path not in checked]
        ops = [Op.put(self.key(STORE_ID), store_id.encode())]
        ops += [Op.delete(self.key(path)) for path in old]
        ops += [Op.put(self.key(path), value) for path, value in checked.items()]
        revision = done = 0
        for start in range(0, len(ops), TXN_OPS):
            chunk = ops[start : start + TXN_OPS]
            try:
                revision = (await self._etcd(self.etcd.txn((), chunk))).revision
            except StoreError as e:
                raise StoreError(f"{e} (the import wrote {done} of {len(ops)} changes)") from e
            done += len(chunk)
        self.id = store_id
        return revision

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self.etcd.aclose()
        await trio.lowlevel.checkpoint()

    def _item_key(self, path: str) -> bytes:
        key = self.key(path)
        if path == STORE_ID:
            raise ValueError(f"store key {STORE_ID!r} is reserved: it holds the store's id")
        return key

    async def _check_open(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the store is closed")

    async def _etcd(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except EtcdUnavailable as e:
            raise StoreError(f"{self.location}: etcd is unavailable: {e}") from e
        except EtcdError as e:
            raise StoreError(f"{self.location}: {e}") from e

    def __repr__(self) -> str:
        return f"<EtcdStore {self.location!r} [id: {self.id}]>"


_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def check_prefix(prefix: str) -> str:
    """A key prefix like ``/meshlet/`` or ``/a/b`` (kept as ``/a/b/``); ValueError otherwise."""
    segments = prefix.strip("/").split("/")
    if not prefix.startswith("/") or not all(_SEGMENT.fullmatch(s) for s in segments) or "//" in prefix:
        raise ValueError(
            f"etcd key prefix {prefix!r} is not a path like /meshlet or /a/b (letters, digits, '.', '_', '-')"
        )
    return "/" + "/".join(segments) + "/"
