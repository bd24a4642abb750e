"""``meshlet admin export|import``: the control plane's whole state (control_plane/state_export.py)
between stores: from the file store of one machine to etcd, back, or between etcd clusters.

Both read or write the store directly, not through the API: a file store only while its control
plane is stopped (its lock says so), etcd at any time. Progress goes to stderr, and only for work
that takes longer than a second; stdout carries the state file with ``-o -`` and nothing else."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from control_plane.store import Store

T = TypeVar("T")

EXAMPLES = """\
examples:
  meshlet admin export --data-dir .meshlet-cp -o state.json       # a backup (stop the control plane first)
  meshlet admin import --data-dir /srv/new-cp state.json          # restore it, on this machine or another

  # from the file store to etcd, in three commands (the control plane stopped):
  meshlet admin export --data-dir .meshlet-cp -o state.json
  meshlet admin import --store etcd://10.0.0.1:2379,10.0.0.2:2379 state.json
  meshlet control-plane --store etcd://10.0.0.1:2379,10.0.0.2:2379

The file holds the CA key and the tokens: it is written 0600; keep it like a key.
exit codes: 0 done, 1 the operation failed (nothing was written unless it says so), 2 bad usage"""

SECRETS_WARNING = "meshlet: the state contains the CA key and tokens: keep it like a key"
_STORE_HELP = "the store: file (in --data-dir, the default), file:PATH or etcd://HOST:PORT[,HOST:PORT...]"
_DATA_DIR_HELP = (
    "the control plane's data directory: its api-token, join-token and ca/ are part of the state "
    "with a file store (default ./.meshlet-cp)"
)


def add_command(commands: Any) -> argparse.ArgumentParser:
    admin = commands.add_parser(
        "admin",
        help="export or import the control plane's whole state (backups, moving to etcd)",
        description="Move the control plane's state between stores: policies and their history, join-token\n"
        "records, the store id (sidecars keep their policies across the move), the API and join tokens\n"
        "and the CA. With a file store the control plane must be stopped; etcd may be in use.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export",
        help="write the whole state to a file (JSON)",
        description="Write the store's items, its id and the secrets to one file (JSON, values base64),\nmode 0600.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _store_options(export)
    export.add_argument(
        "-o",
        "--output",
        default="-",
        metavar="FILE|-",
        help="where to write it (default -, stdout: a pipe, never a terminal)",
    )
    export.add_argument("--force", action="store_true", help="write over FILE if it exists")
    load = actions.add_parser(
        "import",
        help="load a state file into a store (refused if the store holds anything, unless --force)",
        description="Check the whole file, then write it into the store, keeping its store id. A target\n"
        "that holds anything is refused and named; --force replaces all of it (the target becomes\n"
        "the file's state).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _store_options(load)
    load.add_argument("file", metavar="FILE|-", help="a file `meshlet admin export` wrote (-: stdin)")
    load.add_argument("--force", action="store_true", help="replace whatever the target holds")
    return admin


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default="file", metavar="SPEC", help=_STORE_HELP)
    parser.add_argument("--data-dir", type=Path, default=Path(".meshlet-cp"), metavar="DIR", help=_DATA_DIR_HELP)


class Usage(Exception):
    """Bad usage: exit 2."""


class Failed(Exception):
    """The operation failed: exit 1."""


def run(args: argparse.Namespace) -> int:
    import trio

    action = _export if args.admin_command == "export" else _import
    try:
        summary = trio.run(action, args)
    except Usage as error:
        print(f"meshlet admin {args.admin_command}: {error}", file=sys.stderr)
        return 2
    except Failed as error:
        print(f"meshlet admin {args.admin_command}: {error}", file=sys.stderr)
        return 1
    print(summary, file=sys.stderr)
    return 0


async def _export(args: argparse.Namespace) -> str:
    import trio

    from control_plane import state_export

    opening = _opened(args.store, args.data_dir)  # the spec checked first: bad usage before anything else
    output = _output(args.output, force=args.force)
    source = _describe(args.store, args.data_dir)
    directory = state_export.file_store_directory(args.store, args.data_dir)
    if directory is not None and not (directory / "state.msgpack").exists():
        raise Failed(f"no store in {directory} (no state.msgpack): nothing to export; check --data-dir or --store")
    async with opening as store:
        state = await _failing(state_export.export_state(store, _secrets_dir(args), time.time()))
    data = state_export.encode(state, LazyProgress("encoding"))
    print(SECRETS_WARNING, file=sys.stderr)
    try:
        await trio.to_thread.run_sync(_write_output, output, data, args.force)
    except FileExistsError:
        raise Failed(f"{output} exists: give --force to write over it, or another name") from None
    except OSError as error:
        raise Failed(f"cannot write {output}: {error.strerror or error}") from None
    where = "stdout" if output is None else str(output)
    return f"exported {len(state.items)} keys ({state_export.counts(state.items)}) from {source} to {where}"


async def _import(args: argparse.Namespace) -> str:
    from control_plane import state_export

    opening = _opened(args.store, args.data_dir)  # the spec checked first: bad usage before anything else
    data, name = _read_input(args.file)
    try:
        state = state_export.decode(data, LazyProgress("checking"))
    except state_export.StateFileError as error:
        raise Failed(f"{name}: {error}; nothing was written") from None
    target = _describe(args.store, args.data_dir)
    async with opening as store:
        try:
            revision = await state_export.import_state(store, state, _secrets_dir(args), force=args.force)
        except state_export.ImportRefused as error:
            raise Failed(f"{error}; nothing was written") from None
        except state_export.ImportFailed as error:
            raise Failed(str(error)) from None
    return (
        f"imported {len(state.items)} keys ({state_export.counts(state.items)}) into {target}: "
        f"store id {state.store_id}, revision {revision}"
    )


# the store ------------------------------------------------------------------------------------


def _opened(spec: str, data_dir: Path) -> AbstractAsyncContextManager[Store]:
    """open_store's context manager, with its refusals as Usage or Failed."""
    from control_plane.store import StoreError, StoreLocked, open_store

    if spec == "memory":
        raise Usage("--store memory: a memory store lives and dies with its control plane; name a file or etcd store")
    try:
        opening = open_store(spec, data_dir)
    except ValueError as error:
        raise Usage(f"--store: {error}") from None

    @asynccontextmanager
    async def opened() -> AsyncIterator[Store]:
        try:
            async with opening as store:
                yield store
        except StoreLocked as error:
            raise Failed(f"{error}: stop the control plane first (it holds a file store while it runs)") from None
        except StoreError as error:
            raise Failed(str(error)) from None

    return opened()


async def _failing(work: Awaitable[T]) -> T:
    """Refusals of an export (a secret file that cannot be trusted) as Failed."""
    from control_plane.state_export import StateFileError
    from meshlet.private_files import PrivateFileError

    try:
        return await work
    except (StateFileError, PrivateFileError) as error:
        raise Failed(f"{error}; nothing was written") from None


def _secrets_dir(args: argparse.Namespace) -> Path | None:
    """With a file store, the secrets are files in the data directory; elsewhere, store keys."""
    from control_plane.state_export import file_store_directory

    return args.data_dir if file_store_directory(args.store, args.data_dir) is not None else None


def _describe(spec: str, data_dir: Path) -> str:
    return f"file:{data_dir}" if spec == "file" else spec


# the file -------------------------------------------------------------------------------------


def _output(text: str, *, force: bool) -> Path | None:
    """The export's path (None: stdout), checked before the store is opened."""
    if text == "-":
        if sys.stdout.isatty():
            raise Usage("the state holds secrets: write it to a file (-o FILE) or a pipe, not a terminal")
        return None
    path = Path(text)
    if os.path.lexists(path) and not force:
        raise Failed(f"{path} exists: give --force to write over it, or another name")
    return path


def _write_output(path: Path | None, data: bytes, force: bool) -> None:
    from meshlet.private_files import write_new, write_replacing

    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif force:
        write_replacing(path, data)  # 0600
    else:
        write_new(path, data)  # 0600, never over a file made since the check


def _read_input(text: str) -> tuple[bytes, str]:
    """The state file's bytes (bounded), and its name for messages."""
    from control_plane.state_export import MAX_FILE_BYTES

    if text == "-":
        if sys.stdin.isatty():
            raise Usage("FILE is -, but stdin is a terminal: pipe the state in, or name the file")
        data, name = sys.stdin.buffer.read(MAX_FILE_BYTES + 1), "stdin"
    else:
        name = text
        try:
            with open(text, "rb") as file:
                mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
                data = file.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            raise Failed(f"cannot read {text}: {error.strerror or error}") from None
        if mode & 0o077:
            print(
                f"meshlet: {text} is open to group or others (mode {mode:04o}): it holds the CA key; chmod 600 {text}",
                file=sys.stderr,
            )
    return data, name  # decode refuses more than MAX_FILE_BYTES


class LazyProgress:
    """A progress bar on stderr that appears only once the work has taken longer than
    ``delay`` seconds: a small state is done before a bar would be worth drawing."""

    def __init__(self, what: str, *, delay: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.delay = delay
        self.clock = clock
        self.started = clock()
        self.bar: Any = None  # rich.progress.Progress, once shown
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if done % 1024 and done != total:  # the clock is read once per 1024 items
                return
            if done == total or self.clock() - self.started < self.delay:
                return
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=total)
        self.bar.update(self.task, completed=done)
        if done == total:
            self.bar.stop()
