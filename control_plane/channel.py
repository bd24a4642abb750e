"""One sidecar's socket on the control plane: writes that never wait.

A change reaches thousands of sidecars at once. With a task per sidecar that sends its
own push, every push costs a trip through trio's scheduler and a lock; at 5,000
sidecars that, not building the pushes, was most of the control plane's time
(`make bench-cp` measures it: benchmarks/README.md, "Control plane scale").
So a push is written by whoever decides it (the debouncer, or the reader that just
got an ACK), straight into the kernel's buffer with a non-blocking ``send``. What the
kernel does not take (a slow or stuck sidecar, a large first snapshot) is queued, as
references to the shared encoded bytes, for a flusher task started then, which waits
until the socket is writable and ends when the queue is empty. ``blocked_since`` tells the keepalive how long the queue
has been stuck: a sidecar that stopped reading is closed.

Over TLS (``io`` a :class:`meshlet.io.TLSConnection`) a push is encrypted when it is
written (the records follow any written before, in order), and what the queue holds is
those records: the same bytes for the socket as in plaintext, only not shared.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import wait_writable

from meshlet.io import Closed, Connection, TLSConnection


class Channel:
    __slots__ = ("io", "queued", "blocked_since", "flushing", "_spawn", "_clock", "_encrypt")

    def __init__(
        self,
        io: Connection,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.io = io
        self.queued: deque[memoryview] = deque()
        self.blocked_since: float | None = None  # when the queue last went from empty to not
        self.flushing = False
        self._spawn = spawn  # starts the flusher task (a nursery's start_soon)
        self._clock = clock
        self._encrypt = io.encrypt if isinstance(io, TLSConnection) else None

    def write(self, data: bytes) -> None:
        """Send now what the kernel takes; queue the rest (in order) for a flusher."""
        if self.io.closed:
            return
        if self._encrypt is not None:
            try:
                data = self._encrypt(data)
            except ssl.SSLError:
                self.io.close()  # the TLS session is done: the reader sees Closed
                return
        if self.queued:
            view = memoryview(data)
        else:
            try:
                sent = self.io.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.io.close()  # reset or broken: the reader sees Closed and ends the session
                return
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
            self.blocked_since = self._clock()
        self.queued.append(view)
        if not self.flushing:
            self.flushing = True
            self._spawn(self._flush)

    async def _flush(self) -> None:
        """Drain the queue as the socket becomes writable; ends when it is empty (or
        the socket closes). Runs only while a sidecar is slow to read."""
        sock = self.io.sock
        try:
            while self.queued:
                await wait_writable(sock)
                while self.queued:
                    head = self.queued[0]
                    try:
                        sent = sock.send(head)
                    except BlockingIOError:
                        break
                    if sent < len(head):
                        self.queued[0] = head[sent:]
                        break
                    self.queued.popleft()
            self.blocked_since = None
        except (trio.ClosedResourceError, OSError):
            self.io.close()
            self.queued.clear()
        finally:
            self.flushing = False

    async def recv(self) -> bytes:
        """Some bytes, ``b""`` at the peer's end; :class:`Closed` if the socket closed."""
        return await self.io.recv()

    def close(self) -> None:
        """Close (a flusher waiting on the socket wakes and ends). Over TLS with records
        still queued, with a reset: close_notify written now would land inside a record the
        socket took only part of: the sidecar would take the cut push for a clean end."""
        if self.queued and self._encrypt is not None:
            self.io.reset()
        else:
            self.io.close()


__all__ = ["Channel", "Closed"]
