"""The control plane's whole state as one file, to move it between stores (``meshlet admin
export|import``): from the file store of one machine to etcd, back, or between etcd clusters.

What the state is: every item of the store (policies and their history, join-token records,
whatever else is there), the store's id (sidecars remember which store their policies came from:
docs/security.md, "Empty or foreign store"; an import keeps it, so they keep their policies), and
the secrets. A file store keeps the secrets as files in the data directory; a store shared by
replicas (etcd) keeps them as keys, with these names:

* ``<data dir>/api-token``  <->  ``secrets/api-token``
* ``<data dir>/join-token`` <->  ``secrets/join-token``
* ``<data dir>/ca/NAME``    <->  ``ca/NAME`` (control_plane/ca.py: ``ca.key``, ``ca.crt``, ...)

In the file every secret is a key, whatever the store it came from: export adds the files' keys,
and an import into a file store writes them back as files (tokens and keys 0600, certificates
0644 as control_plane/ca.py writes them, the ca directory 0700, each atomically).

The file (:func:`encode`, :func:`decode`) is JSON, so ``jq`` reads it::

    {"format": "meshlet-state", "version": 1, "store_id": "<32 hex>", "revision": 57,
     "exported_at": "2026-12-08T01:00:00Z", "items": {"<key>": "<base64 of the value>", ...}}

It is untrusted input: :func:`decode` checks all of it (format, version, every key a store key,
every value base64 and within bounds, the secrets' names) before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from meshlet.private_files import PrivateFileError, read_private, write_replacing

from .store import Store, check_key, is_live

FORMAT = "meshlet-state"
VERSION = 1

SECRETS_PREFIX = "secrets/"
API_TOKEN_KEY = "secrets/api-token"
JOIN_TOKEN_KEY = "secrets/join-token"
CA_PREFIX = "ca/"

API_TOKEN_FILE = "api-token"  # control_plane/app.py's TOKEN_FILE
JOIN_TOKEN_FILE = "join-token"  # control_plane/tokens.py's JOIN_TOKEN_FILE
CA_DIRECTORY = "ca"  # control_plane/app.py's CA_DIRECTORY
SECRET_FILES = {API_TOKEN_KEY: API_TOKEN_FILE, JOIN_TOKEN_KEY: JOIN_TOKEN_FILE}

# Bounds on untrusted input. A policy apply may carry up to 4 MiB of files (the API's body limit),
# and a history entry keeps them: a value is at most twice that. Fifty such entries fit the file.
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_VALUE_BYTES = 8 * 1024 * 1024
MAX_KEY_BYTES = 1024
MAX_ITEMS = 1_000_000
MAX_SECRET_BYTES = 4096  # a token file is one short line; the CA's files are bounded below
MAX_CA_FILE_BYTES = 1024 * 1024  # control_plane/ca.py's largest, its authority index
_CA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one plain file name: no "/", no ".."
_STORE_ID = re.compile(r"[0-9a-f]{32}")
_FIELDS = {"format", "version", "store_id", "revision", "exported_at", "items"}

Progress = Callable[[int, int], None]  # (done, total): for a progress bar


class StateFileError(Exception):
    """The file is not a state this control plane can import; the message says what is wrong."""


class ImportRefused(Exception):
    """The target is not empty (without --force), or cannot take the state; nothing was written."""


class ImportFailed(Exception):
    """A write failed part way; the message says what was written and what was not."""


@runtime_checkable
class Replaceable(Protocol):
    """A store an import can write: all of its content and its id at once."""

    async def replace_all(self, items: Mapping[str, bytes], store_id: str) -> int: ...


@dataclass(frozen=True)
class State:
    store_id: str
    revision: int  # the source store's, when exported: informational
    exported_at: str  # RFC 3339, UTC
    items: Mapping[str, bytes]  # by key, secrets included


# the file: pure -------------------------------------------------------------------------------


def encode(state: State, progress: Progress | None = None) -> bytes:
    """The state file's bytes."""
    items: dict[str, str] = {}
    total = len(state.items)
    for done, key in enumerate(sorted(state.items), 1):
        items[key] = base64.b64encode(state.items[key]).decode("ascii")
        if progress is not None:
            progress(done, total)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "store_id": state.store_id,
        "revision": state.revision,
        "exported_at": state.exported_at,
        "items": items,
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def decode(data: bytes, progress: Progress | None = None) -> State:
    """The state in a file's bytes, checked whole; StateFileError says what is wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise StateFileError(f"larger than {MAX_FILE_BYTES} bytes: not a state file this control plane wrote")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StateFileError(f"not JSON ({error}): truncated, or not a file `meshlet admin export` wrote") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise StateFileError(f'not a meshlet state file (no "format": "{FORMAT}")')
    version = document.get("version")
    if version != VERSION or isinstance(version, bool):
        raise StateFileError(f"version {version!r}: this meshlet reads version {VERSION} (export it with the same)")
    if set(document) != _FIELDS:
        missing, unknown = sorted(_FIELDS - set(document)), sorted(set(document) - _FIELDS)
        raise StateFileError(f"fields missing: {missing}, unknown: {unknown}")
    store_id, revision, exported_at = document["store_id"], document["revision"], document["exported_at"]
    if not (isinstance(store_id, str) and _STORE_ID.fullmatch(store_id)):
        raise StateFileError(f"store_id {store_id!r} is not 32 hex digits")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise StateFileError(f"revision {revision!r} is not an integer >= 0")
    if not isinstance(exported_at, str) or len(exported_at) > 64:
        raise StateFileError("exported_at is not a time")
    return State(store_id, revision, exported_at, _decode_items(document["items"], progress))


def _decode_items(raw: object, progress: Progress | None) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        raise StateFileError(f"items is a {type(raw).__name__}, not a map of key to base64")
    if len(raw) > MAX_ITEMS:
        raise StateFileError(f"{len(raw)} items: more than {MAX_ITEMS}")
    items: dict[str, bytes] = {}
    for done, (key, text) in enumerate(raw.items(), 1):
        try:
            check_item_key(key)
        except ValueError as error:
            raise StateFileError(str(error)) from None
        if not isinstance(text, str) or len(text) > (MAX_VALUE_BYTES + 2) // 3 * 4:
            raise StateFileError(f"the value of {key!r} is not base64 of at most {MAX_VALUE_BYTES} bytes")
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise StateFileError(f"the value of {key!r} is not base64") from None
        check_secret(key, value)
        items[key] = value
        if progress is not None:
            progress(done, len(raw))
    return items


def check_item_key(key: object) -> str:
    """A store key (control_plane/store.py's rule) of bounded length; a ``ca/`` key names one
    plain file and a ``secrets/`` key a secret this control plane knows. ValueError says why."""
    try:
        key = check_key(key)
    except TypeError as error:
        raise ValueError(str(error)) from None
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"key {key[:40]!r}...: longer than {MAX_KEY_BYTES} bytes")
    if is_live(key):
        raise ValueError(
            f"key {key!r}: what running replicas keep (their registry, cards, leader), not state to import"
        )
    if key.startswith(CA_PREFIX) and not _CA_NAME.fullmatch(key.removeprefix(CA_PREFIX)):
        raise ValueError(f"key {key!r}: a CA file's key is ca/NAME, NAME a plain file name")
    if key.startswith(SECRETS_PREFIX) and key not in SECRET_FILES:
        raise ValueError(f"key {key!r}: not a secret this control plane knows ({', '.join(SECRET_FILES)})")
    return key


def check_secret(key: str, value: bytes) -> None:
    """A token is one line of printable ASCII; a CA file is bounded. StateFileError if not."""
    if key in SECRET_FILES:
        text = value.decode("ascii", errors="replace").strip()
        if len(value) > MAX_SECRET_BYTES or not text or not text.isprintable() or not text.isascii():
            raise StateFileError(f"the value of {key!r} is not a token (one line of printable ASCII)")
    elif key.startswith(CA_PREFIX) and len(value) > MAX_CA_FILE_BYTES:
        raise StateFileError(f"the value of {key!r} is larger than {MAX_CA_FILE_BYTES} bytes: not a CA file")


def is_data_dir_key(key: str) -> bool:
    """Kept as a file in the data directory next to a file store."""
    return key in SECRET_FILES or key.startswith(CA_PREFIX)


def data_dir_path(key: str) -> Path:
    """Where a secret's key is kept under the data directory, relative to it."""
    if key in SECRET_FILES:
        return Path(SECRET_FILES[key])
    return Path(CA_DIRECTORY, key.removeprefix(CA_PREFIX))


def file_mode(key: str) -> int:
    """As control_plane/ca.py and app.py write them: certificates 0644, the rest 0600."""
    return 0o644 if key.startswith(CA_PREFIX) and not key.endswith(".key") else 0o600


def counts(keys: Iterable[str]) -> str:
    """``policies: 1, history: 40, tokens: 2, secrets: 2, ca: 5``: keys by what they hold."""
    kinds = Counter(_kind(key) for key in keys)
    order = ["policies", "history", "tokens", "secrets", "ca"]
    ranked = sorted(kinds, key=lambda kind: (order.index(kind) if kind in order else len(order), kind))
    return ", ".join(f"{kind}: {kinds[kind]}" for kind in ranked)


def _kind(key: str) -> str:
    if key.startswith("policies/history/"):
        return "history"
    return key.split("/", 1)[0]


def file_store_directory(spec: str, data_dir: Path) -> Path | None:
    """The directory of the file store ``spec`` names (control_plane/store.py's open_store), or
    None for another store. Its secrets are files in ``data_dir`` all the same, as the control
    plane keeps them."""
    if spec == "file":
        return data_dir
    if spec.startswith("file:") and spec != "file:":
        return Path(spec.removeprefix("file:")).expanduser()
    return None


def utc_time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# the data directory's files: blocking I/O -----------------------------------------------------


def read_data_dir(data_dir: Path) -> dict[str, bytes]:
    """The secrets kept as files in ``data_dir``, as keys. Every file must be a regular file of
    this user's, no symlink; tokens and keys closed to group and others. PrivateFileError if not."""
    found: dict[str, bytes] = {}
    for key in SECRET_FILES:
        with contextlib.suppress(FileNotFoundError):  # not made yet: nothing to export
            found[key] = _read(data_dir / data_dir_path(key), key, MAX_SECRET_BYTES)
    found.update((CA_PREFIX + name, data) for name, data in read_ca_files(data_dir / CA_DIRECTORY).items())
    return found


def read_ca_files(directory: Path) -> dict[str, bytes]:
    """The CA directory's files by name (none if it does not exist), checked as read_data_dir
    checks them (control_plane/replicas/ shares the same directory through etcd)."""
    found: dict[str, bytes] = {}
    for name in _ca_names(directory):
        with contextlib.suppress(FileNotFoundError):  # gone since the listing
            found[name] = _read(directory / name, CA_PREFIX + name, MAX_CA_FILE_BYTES)
    return found


def _ca_names(directory: Path) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise PrivateFileError(f"{directory}: cannot list the CA directory ({error.strerror})") from None
    # A leading dot: a write in progress or one a crash left (private_files.write_replacing).
    return [name for name in names if not name.startswith(".")]


def _read(path: Path, key: str, limit: int) -> bytes:
    if file_mode(key) == 0o600:
        data = read_private(path, limit, what=f"{key} file")
    else:  # a certificate: anyone may read it, but it must still be a plain file of ours
        data = _read_public(path, limit)
    if len(data) > limit:
        raise PrivateFileError(f"{path} is larger than {limit} bytes: not a file this control plane wrote")
    return data


def _read_public(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.getuid():
            raise PrivateFileError(f"{path} is not a regular file of this user's")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def data_dir_present(data_dir: Path) -> list[str]:
    """The secrets' files that are in ``data_dir``, as keys (not read)."""
    present = [key for key in SECRET_FILES if os.path.lexists(data_dir / data_dir_path(key))]
    return present + [CA_PREFIX + name for name in _ca_names(data_dir / CA_DIRECTORY)]


def write_data_dir(data_dir: Path, files: Mapping[str, bytes], written: list[str]) -> None:
    """Make ``data_dir``'s secrets exactly ``files`` (keys): each written atomically with its
    mode, the ones not in ``files`` removed. ``written`` collects what is done, for a report."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (data_dir / CA_DIRECTORY).mkdir(mode=0o700, exist_ok=True)
    (data_dir / CA_DIRECTORY).chmod(0o700)
    for key in sorted(files):
        write_replacing(data_dir / data_dir_path(key), files[key], file_mode(key))
        written.append(key)
    for key in data_dir_present(data_dir):
        if key not in files:
            (data_dir / data_dir_path(key)).unlink()
            written.append(f"{key} (removed)")


# export and import ----------------------------------------------------------------------------


async def export_state(store: Store, data_dir: Path | None, now: float) -> State:
    """Everything in ``store``; with ``data_dir`` (a file store), the secrets' files too.
    StateFileError when a key is both a file and a store item."""
    revision = await store.revision()
    items = {key: value for key, value in await store.items("") if not is_live(key)}
    if data_dir is not None:
        files = await trio.to_thread.run_sync(read_data_dir, data_dir)
        both = sorted(set(files) & set(items))
        if both:
            raise StateFileError(f"{', '.join(both)}: both a file in {data_dir} and a key in {store.location}")
        items.update(files)
    return State(store.id, revision, utc_time(now), dict(sorted(items.items())))


async def target_contents(store: Store, data_dir: Path | None) -> list[str]:
    """What the target holds (keys), the data directory's secrets with it: empty or not."""
    keys = [key for key, _ in await store.items("") if not is_live(key)]
    if data_dir is not None:
        keys += await trio.to_thread.run_sync(data_dir_present, data_dir)
    return sorted(keys)


async def import_state(store: Store, state: State, data_dir: Path | None, *, force: bool) -> int:
    """Write ``state`` into ``store`` (with ``data_dir``: the secrets as files there), keeping its
    store id; returns the store's new revision. Refused (ImportRefused, nothing written) when the
    target holds anything and not ``force``; with ``force`` the target becomes the state exactly.
    The store's items are one write; the files before it, each atomically: ImportFailed names
    what was written when a write fails part way."""
    if not isinstance(store, Replaceable):
        raise ImportRefused(f"{store.location}: this store cannot be imported into")
    for key in state.items:  # decode checked them; a State made otherwise is checked here
        try:
            check_item_key(key)
        except ValueError as error:
            raise ImportRefused(str(error)) from None
    try:
        present = await target_contents(store, data_dir)
    except (OSError, PrivateFileError) as error:
        raise ImportRefused(f"cannot tell what the target holds: {error}") from None
    if present and not force:
        where = store.location if data_dir is None else f"{store.location} and {data_dir}"
        raise ImportRefused(
            f"the target is not empty: {len(present)} keys ({counts(present)}) in {where}; "
            "import --force replaces all of it"
        )
    items, files = dict(state.items), {}
    if data_dir is not None:
        files = {key: value for key, value in items.items() if is_data_dir_key(key)}
        items = {key: value for key, value in items.items() if key not in files}
    written: list[str] = []
    try:
        if data_dir is not None:
            await trio.to_thread.run_sync(write_data_dir, data_dir, files, written)
        revision = await store.replace_all(items, state.store_id)
    except Exception as error:
        done = f"written: {', '.join(written)}" if written else "nothing was written"
        raise ImportFailed(f"{error} ({done}; the store's items were not; import again with --force)") from error
    return revision
