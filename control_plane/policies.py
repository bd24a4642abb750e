"""Applied policy: versions, history, rollback, kept in the store.

An apply takes the whole set of policy files (GitOps style: what is applied is what
runs; a document left out is removed), validates all of it (meshlet/policy.py),
and if anything differs from what runs, records a new version:

* a version is the content hash of the documents, so applying the same set again changes
  nothing and a rollback to a version yields that same version string;
* the store keeps each version's files (their text, as applied) under
  ``policies/history/<seq>`` and the current one's number under ``policies/current``;
  the last ``HISTORY_LIMIT`` versions are kept;
* a rollback re-applies an older version's files as a new entry of the history (like
  ``kubectl rollout undo``), validated again.

Time is passed in (wall-clock seconds, for people to read); nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from meshlet import wire
from meshlet.policy import PolicyError, load_documents
from meshlet.schema import Document

from .collectors import collector_problems
from .store import Store, StoreError

HISTORY_LIMIT = 50
APPLY_ATTEMPTS = 5  # an apply that loses the race to other replicas' this often gives up
_CURRENT = "policies/current"
_HISTORY = "policies/history/"


@dataclass(frozen=True)
class Version:
    seq: int
    version: str
    applied_at: float  # Unix time
    source: str  # who or what applied it ("meshlet apply -f routes/", "rollback to ...")
    files: tuple[tuple[str, str], ...]  # (name, text) as applied

    def to_json(self, *, with_files: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "version": self.version,
            "applied_at": self.applied_at,
            "source": self.source,
            "files": [name for name, _ in self.files],
        }
        if with_files:
            out["texts"] = {name: text for name, text in self.files}
        return out


@dataclass(frozen=True)
class Change:
    """One document's fate in an apply: added, changed or removed."""

    kind: str
    name: str
    what: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "change": self.what}


@dataclass(frozen=True)
class ApplyResult:
    version: str
    previous: str
    changes: tuple[Change, ...]
    applied: bool  # False: a dry run, or nothing changed

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "previous": self.previous,
            "changes": [c.to_json() for c in self.changes],
            "applied": self.applied,
        }


def documents_version(documents: list[Document]) -> str:
    return wire.content_version(sorted(([d.kind, d.name, _body(d)] for d in documents), key=lambda x: x[:2]))


def _body(document: Document) -> dict[str, Any]:
    return document.model_dump(mode="json")


class PolicyStore:
    """What runs now (documents, version) and the history behind it. ``allowed_collectors``:
    the span collectors a MeshConfig may name (control_plane/collectors.py; empty: any)."""

    def __init__(self, store: Store, allowed_collectors: tuple[tuple[str, int | None], ...] = ()) -> None:
        self.store = store
        self.allowed_collectors = allowed_collectors
        self.current: Version | None = None
        self.documents: list[Document] = []
        self.version = ""  # of the empty set until something is applied

    async def load(self) -> None:
        """Read the current version back (after a restart); it is validated again."""
        raw = await self.store.get(_CURRENT)
        if raw is None:
            return
        try:
            seq = int(raw.decode())
        except (UnicodeDecodeError, ValueError):
            raise _corrupt(self.store, _CURRENT, f"{raw[:40]!r} is not a version number") from None
        current = await self._read(seq)
        if current is None:
            raise PolicyError([f"store: policies/current names version {raw.decode()}, which is not in the history"])
        self.documents = self._checked(load_documents(current.files))
        self.current = current
        self.version = current.version

    async def apply(
        self, files: list[tuple[str, str]], *, source: str, now: float, dry_run: bool = False
    ) -> ApplyResult:
        """Validate ``files`` (all of the policy); PolicyError changes nothing."""
        documents = self._checked(load_documents(files))
        version = documents_version(documents) if documents else ""
        changes = diff(self.documents, documents)
        if dry_run or version == self.version:
            return ApplyResult(version, self.version, changes, applied=False)
        for _ in range(APPLY_ATTEMPTS):
            seq = (self.current.seq if self.current else 0) + 1
            entry = Version(seq, version, now, source, tuple(files))
            expected = None if self.current is None else str(self.current.seq).encode()
            # The entry and the switch to it in one revision, and only if nobody (another replica)
            # applied since this one read the current version.
            puts = {f"{_HISTORY}{seq:08d}": _encode(entry), _CURRENT: str(seq).encode()}
            if await self.store.swap(_CURRENT, expected, puts) is not None:
                break
            await self.load()  # another replica applied meanwhile: this apply goes on top of theirs
            changes = diff(self.documents, documents)
            if version == self.version:
                return ApplyResult(version, self.version, changes, applied=False)
        else:
            raise StoreError(
                f"{self.store.location}: the policy changed {APPLY_ATTEMPTS} times while this apply ran; apply again"
            )
        for key, _ in (await self.store.items(_HISTORY))[:-HISTORY_LIMIT]:
            await self.store.delete(key)
        previous = self.version
        self.current, self.documents, self.version = entry, documents, version
        return ApplyResult(version, previous, changes, applied=True)

    async def history(self) -> list[Version]:
        """Every version kept, newest first. StoreError (naming the file and the entry) if one
        cannot be read."""
        entries = [_decode(raw, self.store, key) for key, raw in await self.store.items(_HISTORY)]
        return sorted(entries, key=lambda v: v.seq, reverse=True)

    async def rollback(self, version: str, *, now: float) -> ApplyResult:
        """Apply an earlier version's files again (a new history entry)."""
        for entry in await self.history():
            if entry.version == version or (len(version) >= 4 and entry.version.startswith(version)):
                return await self.apply(list(entry.files), source=f"rollback to {entry.version}", now=now)
        known = ", ".join(dict.fromkeys(v.version or "(empty)" for v in await self.history())) or "none"
        raise PolicyError([f"version {version!r} is not in the history (latest: {known})"])

    def _checked(self, documents: list[Document]) -> list[Document]:
        """``documents``, or PolicyError if this control plane may not run them."""
        problems = collector_problems(documents, self.allowed_collectors)
        if problems:
            raise PolicyError(problems)
        return documents

    async def _read(self, seq: int) -> Version | None:
        key = f"{_HISTORY}{seq:08d}"
        raw = await self.store.get(key)
        return None if raw is None else _decode(raw, self.store, key)

    def resources(self) -> dict[str, tuple[str, Any]]:
        """What every sidecar should hold of type ``policies``: "Kind/name" → (version, body)."""
        out: dict[str, tuple[str, Any]] = {}
        for document in self.documents:
            body = _body(document)
            out[f"{document.kind}/{document.name}"] = (wire.content_version(body), body)
        return out


def diff(before: list[Document], after: list[Document]) -> tuple[Change, ...]:
    old = {(d.kind, d.name): _body(d) for d in before}
    new = {(d.kind, d.name): _body(d) for d in after}
    changes = [Change(k, n, "added") for (k, n) in new if (k, n) not in old]
    changes += [Change(k, n, "changed") for (k, n), body in new.items() if (k, n) in old and old[(k, n)] != body]
    changes += [Change(k, n, "removed") for (k, n) in old if (k, n) not in new]
    return tuple(sorted(changes, key=lambda c: (c.kind, c.name)))


def _encode(entry: Version) -> bytes:
    encoded: bytes = msgpack.packb(  # msgpack is untyped
        {
            "seq": entry.seq,
            "version": entry.version,
            "applied_at": entry.applied_at,
            "source": entry.source,
            "files": [list(f) for f in entry.files],
        },
        use_bin_type=True,
    )
    return encoded


def _decode(raw: bytes, store: Store, key: str) -> Version:
    """A history entry; StoreError naming the file and the entry when its bytes are damaged."""
    try:
        data = msgpack.unpackb(raw, raw=False)
        files = data["files"]
        if not isinstance(files, list) or not all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f) for f in files
        ):
            raise ValueError("files is not a list of [name, text] pairs")
        return Version(
            int(data["seq"]),
            _text(data["version"], "version"),
            float(data["applied_at"]),
            _text(data["source"], "source"),
            tuple((name, text) for name, text in files),
        )
    except Exception as exc:  # msgpack raises several types for damaged bytes; so do the lookups
        raise _corrupt(store, key, f"{type(exc).__name__}: {exc}") from None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is a {type(value).__name__}, not a string")
    return value


def _corrupt(store: Store, key: str, what: str) -> StoreError:
    return StoreError(
        f"{store.location}: corrupt entry {key!r}: {what} (restore the file from a backup; or stop the "
        "control plane, move the file away and apply the policy again: the history is lost)"
    )


__all__ = ["ApplyResult", "Change", "PolicyStore", "Version", "diff", "documents_version"]
