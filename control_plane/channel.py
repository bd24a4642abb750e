"""One sidecar's socket on the control plane: writes that never wait.

A change reaches thousands of sidecars at once. With a task per sidecar that sends its
own push, every push costs a trip through trio's scheduler and a lock; measured at
5,000 sidecars that, not building the pushes, was most of the control plane's time.
So a push is written by whoever decides it (the debouncer, or the reader that just
got an ACK), straight into the kernel's buffer with a non-blocking ``send``. What the
kernel does not take (a slow or stuck sidecar, a large first snapshot) is queued, as
references to the shared encoded bytes, for this channel's flusher task, which waits
until the socket is writable. ``blocked_since`` tells the keepalive how long the queue
has been stuck: a sidecar that stopped reading is closed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio
from trio.lowlevel import wait_writable

from sidecar.net.io import Closed, Connection


class Channel:
    __slots__ = ("io", "queued", "queued_bytes", "blocked_since", "_wake", "clock")

    def __init__(self, io: Connection, clock: Callable[[], float] = trio.current_time) -> None:
        self.io = io
        self.queued: deque[memoryview] = deque()
        self.queued_bytes = 0
        self.blocked_since: float | None = None  # when the queue last went from empty to not
        self._wake = trio.Event()
        self.clock = clock

    @property
    def closed(self) -> bool:
        return self.io.closed

    def write(self, data: bytes) -> None:
        """Send now what the kernel takes; queue the rest (in order) for the flusher."""
        if self.io.closed:
            return
        if not self.queued:
            try:
                sent = self.io.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.io.close()  # reset or broken: the reader sees Closed and ends the session
                return
            if sent == len(data):
                return
            self.blocked_since = self.clock()
            self._wake.set()
            view = memoryview(data)[sent:]
        else:
            view = memoryview(data)
        self.queued.append(view)
        self.queued_bytes += len(view)

    async def flush_forever(self) -> None:
        """Drain the queue whenever there is one; returns when the socket closes."""
        sock = self.io.sock
        try:
            while not self.io.closed:
                await self._wake.wait()
                self._wake = trio.Event()
                while self.queued:
                    try:
                        await wait_writable(sock)
                    except (trio.ClosedResourceError, OSError):
                        return
                    while self.queued:
                        head = self.queued[0]
                        try:
                            sent = sock.send(head)
                        except BlockingIOError:
                            break
                        self.queued_bytes -= sent
                        if sent < len(head):
                            self.queued[0] = head[sent:]
                            break
                        self.queued.popleft()
                self.blocked_since = None
        except OSError:
            self.io.close()
        finally:
            self.queued.clear()
            self.queued_bytes = 0

    async def recv(self) -> bytes:
        """Some bytes, ``b""`` at the peer's end; :class:`Closed` if the socket closed."""
        return await self.io.recv()

    def close(self) -> None:
        self.io.close()


__all__ = ["Channel", "Closed"]
