"""The files every replica must agree on, kept in etcd: the API token, the bootstrap join token and
the CA's directory.

A single control plane keeps these as files in its data directory (0600), and the code that uses
them reads files. Replicas keep that: each has a data directory of its own (an ``emptyDir`` is
enough), and etcd holds the one true copy under ``secrets/api-token``, ``secrets/join-token`` and
``ca/<file>`` (the names ``meshlet admin export`` uses too). At start a replica takes etcd's copy
if there is one; if not, it makes its own as a single control plane would and offers it with a
transaction that succeeds only while etcd has none, so when replicas start together exactly one
copy wins and the others take it. The CA directory goes as one unit (its files only make sense
together). Later changes (a CA rotation) are written by the replica that made them and read again
by every other one from the watch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from meshlet.private_files import write_replacing

from ..state_export import CA_PREFIX, file_mode, read_ca_files
from ..store import Store

log = logging.getLogger("meshlet.cp.replicas")


async def share_file(store: Store, key: str, path: Path) -> bool:
    """Make ``path`` and etcd's ``key`` the same: etcd's copy wins; with none there, ours is offered
    (``path`` must exist). True if the file was replaced by etcd's copy."""
    ours = await trio.to_thread.run_sync(path.read_bytes)
    theirs = await store.get(key)
    if theirs is None:
        if await store.swap(key, None, {key: ours}) is not None:
            log.info("%s: this replica's copy is now every replica's (%s)", path, key)
            return False
        theirs = await store.get(key)
        if theirs is None:  # offered and gone again: somebody deleted it; ours stands
            return False
    if theirs == ours:
        return False
    write_replacing(path, theirs, 0o600)
    log.info("%s: the copy in etcd (%s) replaced this replica's", path, key)
    return True


def write_directory(directory: Path, files: Mapping[str, bytes]) -> bool:
    """Make the CA ``directory`` hold exactly ``files`` (0700; each file with the mode ca.py gives
    it); True if anything changed."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    current = read_ca_files(directory)
    changed = False
    for name, data in files.items():
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"{name!r} is not a file name")
        if current.get(name) != data:
            write_replacing(directory / name, data, file_mode(CA_PREFIX + name))
            changed = True
    for name in set(current) - set(files):
        (directory / name).unlink()
        changed = True
    return changed


async def stored_directory(store: Store, prefix: str) -> dict[str, bytes]:
    return {key.removeprefix(prefix): value for key, value in await store.items(prefix)}


async def share_directory(store: Store, prefix: str, directory: Path, marker: str) -> bool:
    """Make ``directory`` and etcd's ``prefix`` hold the same files, etcd's copy winning; with none
    there, ours (which must exist) is offered whole, on the condition that ``prefix + marker`` is
    still absent. True if the directory was replaced by etcd's copy."""
    theirs = await stored_directory(store, prefix)
    if not theirs:
        ours = read_ca_files(directory)
        puts = {prefix + name: data for name, data in ours.items()}
        if await store.swap(prefix + marker, None, puts) is not None:
            log.info("%s: this replica's copy is now every replica's (%s)", directory, prefix)
            return False
        theirs = await stored_directory(store, prefix)
    changed = write_directory(directory, theirs)
    if changed:
        log.info("%s: the copy in etcd (%s) replaced this replica's", directory, prefix)
    return changed


async def publish_directory(store: Store, prefix: str, directory: Path, marker: str) -> bool:
    """After this replica changed ``directory`` (a CA rotation step), etcd's copy becomes ours, in
    one revision, unless ``prefix + marker`` changed in etcd since this replica read it (another
    replica rotated at the same moment: False, and the watch brings theirs)."""
    ours = read_ca_files(directory)
    theirs = await stored_directory(store, prefix)
    puts = {prefix + name: data for name, data in ours.items() if theirs.get(name) != data}
    deletes = [prefix + name for name in set(theirs) - set(ours)]
    if not puts and not deletes:
        return True
    return await store.swap(prefix + marker, theirs.get(marker), puts, deletes) is not None
