"""Child processes, each in its own process group: started, read ready, stopped.

A meshlet process says it is serving with one line on its stdout, the addresses it bound
(the real ports when it was given port 0)::

    meshlet sidecar ready outbound=127.0.0.1:P inbound=127.0.0.1:Q admin=127.0.0.1:R
    meshlet control-plane ready push=127.0.0.1:P api=127.0.0.1:Q

The tests, ``meshlet demo`` and the benchmarks start their children the same way: a new
session (a Ctrl-C at the terminal reaches only the parent, and a signal to the group
reaches whatever the child spawned), stderr to a log file that every failure quotes,
the ready line awaited with a deadline, and a stop that sends SIGTERM (a sidecar drains
what is in flight) and SIGKILL to the group after a grace period.

Two flavours share that policy: `started` (blocking, for scripts and synchronous
fixtures) and `open_child` / `start_child` (trio). This module launches meshlet as
``python -m meshlet ...``; it imports neither the sidecar nor the control plane.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trio

# A cold interpreter importing trio and the mesh on a busy machine: generous, still bounded.
READY_TIMEOUT = 20.0
# SIGTERM → SIGKILL: a sidecar lets requests in flight finish before it exits.
STOP_GRACE = 10.0
# A failure quotes the end of the child's log: the traceback, not a soak's every warning.
QUOTED_LINES = 100


def meshlet_command(*args: str) -> list[str]:
    """``python -m meshlet ARGS`` with this interpreter (so a venv or checkout carries over)."""
    return [sys.executable, "-m", "meshlet", *args]


# ---------------------------------------------------------------------------- the ready line


@dataclass(frozen=True)
class ReadyLine:
    """A parsed ready line: the words before the first ``key=value`` (``meshlet sidecar
    ready``) and every ``key=value`` after them, as printed."""

    banner: str
    fields: dict[str, str]

    @property
    def ports(self) -> dict[str, int]:
        """The port of every field that is an address (``host:port``); ``workers=2`` is not."""
        ports = {}
        for name, value in self.fields.items():
            host, colon, port = value.rpartition(":")
            if colon and host and port.isdigit():
                ports[name] = int(port)
        return ports


def parse_ready_line(line: str) -> ReadyLine:
    words = line.split()
    cut = next((i for i, word in enumerate(words) if "=" in word), len(words))
    fields = dict(word.partition("=")[::2] for word in words[cut:] if "=" in word)
    return ReadyLine(" ".join(words[:cut]), fields)


# ---------------------------------------------------------------------------- failures


class ChildFailed(RuntimeError):
    """A child did not start, exited early, or logged a traceback; the message quotes its log."""

    def __init__(self, name: str, what: str, log: Path) -> None:
        lines = log_text(log).splitlines()
        shown = f"its log ({log})" if len(lines) <= QUOTED_LINES else f"the end of its log ({log})"
        quoted = "\n".join(lines[-QUOTED_LINES:])
        super().__init__(f"{name} {what}; {shown}:\n{quoted}")
        self.name = name
        self.log = log


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def check_log(name: str, log: Path) -> None:
    """Raise if the child's log holds a traceback (an exception escaped somewhere in it)."""
    if "Traceback" in log_text(log):
        raise ChildFailed(name, "logged a traceback", log)


def _expect_ready(name: str, log: Path, banner: str, received: bytes, returncode: int | None) -> ReadyLine:
    line = received.partition(b"\n")[0].decode(errors="replace").strip()
    ready = parse_ready_line(line)
    if ready.banner.split()[: len(banner.split())] != banner.split():  # "listening" fits "listening 8080"
        status = "still running" if returncode is None else f"exited with {returncode}"
        raise ChildFailed(name, f"did not say {banner!r} ({status}; stdout {line!r})", log)
    return ready


def _signal_group(pid: int, signum: int) -> None:
    # start_new_session: the child leads its own group, whose id is its pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


# ---------------------------------------------------------------------------- blocking flavour


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready: ReadyLine | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return log_text(self.log)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ChildFailed(self.name, f"exited with {self.popen.returncode}", self.log)


def spawn(
    name: str,
    argv: list[str],
    log: Path,
    *,
    stdin: int | IO[bytes] = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = None,
    cwd: Path | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> Child:
    """Start ``argv`` in a new session, stderr to ``log`` (stdout too unless given)."""
    with open(log, "wb") as log_file:
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=log_file if stdout is None else stdout,
            stderr=log_file,
            start_new_session=True,
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
    return Child(name, popen, log)


def wait_ready(child: Child, banner: str, timeout: float = READY_TIMEOUT) -> ReadyLine:
    """Read the child's first stdout line (a pipe); it must start with ``banner``."""
    assert child.popen.stdout is not None, "spawn(stdout=subprocess.PIPE) to read the ready line"
    received = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(child.popen.stdout, selectors.EVENT_READ)
        while b"\n" not in received and (left := deadline - time.monotonic()) > 0:
            if selector.select(timeout=left):
                data = os.read(child.popen.stdout.fileno(), 4096)
                if not data:  # it closed stdout: it exited, or is about to
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                    break
                received += data
    child.ready = _expect_ready(child.name, child.log, banner, received, child.popen.poll())
    return child.ready


def wait_for_port(child: Child, port: int, timeout: float = READY_TIMEOUT) -> None:
    """For children with no ready line (nginx, haproxy): until 127.0.0.1:port accepts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise ChildFailed(child.name, f"is not listening on 127.0.0.1:{port} after {timeout:g} s", child.log)


def stop(child: Child, grace: float = STOP_GRACE) -> None:
    """SIGTERM to its group, SIGKILL if it is still there after ``grace``; reaped."""
    if child.popen.stdout is not None:
        child.popen.stdout.close()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if child.popen.poll() is not None:
            return
        _signal_group(child.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=grace)


@contextlib.contextmanager
def started(
    name: str,
    argv: list[str],
    log: Path,
    *,
    ready: str | None = None,
    cwd: Path | None = None,
    check_traceback: bool = True,
    grace: float = STOP_GRACE,
) -> Iterator[Child]:
    """A child for the length of the block. With ``ready`` (a banner such as ``meshlet
    sidecar ready``) its stdout is a pipe and the block starts once that line came;
    ``child.ready.ports`` has what it bound. On a clean exit from the block its log must
    hold no traceback (``check_traceback``); it is stopped in any case."""
    child = spawn(name, argv, log, stdout=subprocess.PIPE if ready else None, cwd=cwd)
    try:
        if ready:
            wait_ready(child, ready)
        yield child
        if check_traceback:
            check_log(name, log)
    finally:
        stop(child, grace)


# ---------------------------------------------------------------------------- trio flavour


@dataclass
class AsyncChild:
    name: str
    process: trio.Process
    log: Path
    ready: ReadyLine | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return log_text(self.log)


async def start_child(name: str, argv: list[str], log: Path, *, ready: str | None = None) -> AsyncChild:
    """Start ``argv`` in a new session, stderr to ``log``; with ``ready``, return once its
    first stdout line, which must start with that banner, came (stopping it if not)."""
    # One open of a local file per child: blocking for a moment is fine here.
    with open(log, "wb") as log_file:  # noqa: ASYNC230
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready else log_file,
            stderr=log_file,
            start_new_session=True,
        )
    child = AsyncChild(name, process, log)
    if ready:
        try:
            child.ready = await _receive_ready(child, ready)
        except BaseException:
            await stop_child(child)
            raise
    return child


async def _receive_ready(child: AsyncChild, banner: str) -> ReadyLine:
    stdout = child.process.stdout
    assert stdout is not None
    received = b""
    with trio.move_on_after(READY_TIMEOUT):
        while b"\n" not in received:
            data = await stdout.receive_some(4096)
            if not data:
                await child.process.wait()  # it closed stdout: it exited (or is about to)
                break
            received += data
    return _expect_ready(child.name, child.log, banner, received, child.process.returncode)


async def stop_child(child: AsyncChild, grace: float = STOP_GRACE) -> None:
    """SIGTERM to its group, SIGKILL if it is still there after ``grace``; reaped, even
    when the caller is being cancelled."""
    with trio.CancelScope(shield=True):
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if child.process.returncode is not None:
                break
            _signal_group(child.pid, signum)
            with trio.move_on_after(grace):
                await child.process.wait()
        if child.process.stdout is not None:
            await child.process.stdout.aclose()


@contextlib.asynccontextmanager
async def open_child(
    name: str,
    argv: list[str],
    log: Path,
    *,
    ready: str | None = None,
    check_traceback: bool = True,
    grace: float = STOP_GRACE,
) -> AsyncIterator[AsyncChild]:
    """`start_child` for the length of the block; as `started`, its log is checked for a
    traceback on a clean exit and it is stopped in any case."""
    child = await start_child(name, argv, log, ready=ready)
    try:
        yield child
        if check_traceback:
            check_log(name, log)
    finally:
        await stop_child(child, grace)
