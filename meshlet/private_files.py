"""Files only this process may read: the CA key, the join token, a sidecar's key and
certificate, and their like (both sides use them: the control plane and the sidecar).

Reading checks the open file (``fstat``), so it cannot be swapped between the check and the
read: it must be a regular file, closed to group and others, and (in the data directory)
this process's user's and not a symlink a neighbour planted there. Writing makes a file 0600
from the first byte, whatever the umask, and whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path


class PrivateFileError(Exception):
    """The file cannot be trusted or read; the message says what to do."""


def read_private(path: Path, limit: int, *, what: str, in_data_dir: bool = True) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (the caller decides what too long means).
    ``in_data_dir``: refuse a symlink and another user's file (an operator's file, say a
    Kubernetes secret mount, may be either). FileNotFoundError passes through."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if in_data_dir else 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise PrivateFileError(f"{path}: cannot open the {what} ({error.strerror})") from None
    try:
        status = os.fstat(fd)
        mode = stat.S_IMODE(status.st_mode)
        if not stat.S_ISREG(status.st_mode):
            raise PrivateFileError(f"{path} is not a regular file")
        if in_data_dir and status.st_uid != os.getuid():
            raise PrivateFileError(f"{path} belongs to another user (uid {status.st_uid}): it must be this process's")
        if mode & 0o077:
            raise PrivateFileError(f"{path} is open to group or others (mode {mode:04o}): chmod 600 {path}")
        return os.read(fd, limit + 1)  # a regular file: one read returns up to the limit
    finally:
        os.close(fd)


def write_replacing(path: Path, data: bytes, mode: int = 0o600) -> None:
    """``data`` in ``path``, replacing it atomically; the file has ``mode`` (0600 unless a
    certificate anyone may read). The rename is made durable too. A write a crash interrupts
    leaves ``.<name>.<random>.tmp`` beside it."""
    # mkstemp opens with O_CREAT | O_EXCL and mode 0600, so the data is never readable by others,
    # not even while it is written; fchmod then sets the file's final mode before the rename.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(path.parent)  # the rename itself survives a crash


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """``data`` in a new 0600 file ``path``, whole or not at all, never over an existing file
    (FileExistsError): a temporary file, then a hard link, which fails if the name is taken."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
