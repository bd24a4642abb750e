"""A request body that can be sent again, as long as it is small: the retry buffer.

The body streams from the client to the first attempt as it arrives (nothing waits for
it to end); every piece is also kept, up to ``limit`` bytes (64 KiB by default, as
Linkerd). A retry reads the kept pieces again through a new :class:`Cursor`, then goes
on with the client's stream where the first attempt left it. Once more than ``limit``
bytes went through, no new cursor can start (:meth:`ReplayBuffer.cursor` is None), so a
larger body is never retried, hence never duplicated nor truncated; pieces the live
cursor has passed are then let go, so memory stays bounded by the limit.

Only one task reads the client's stream at a time. An attempt that was given up may
still have its body pump waiting for the client; that pump's cursor is detached, and a
detached cursor raises :class:`Detached` instead of handing out pieces, so the pump
stops and closes its (abandoned) upstream connection. A piece such a read brings in is
kept for the live cursor.
"""

from __future__ import annotations

import trio

from .base import WOULD_BLOCK, BodyPiece, BodySource

REPLAY_LIMIT = 64 * 1024


class Detached(Exception):
    """This cursor's attempt was given up."""


class ReplayBuffer:
    __slots__ = ("source", "limit", "pieces", "base", "size", "ended", "overflow", "reading", "arrived", "live")

    def __init__(self, source: BodySource, limit: int = REPLAY_LIMIT) -> None:
        self.source = source
        self.limit = limit
        self.pieces: list[bytes] = []  # pieces base, base+1, ... (earlier ones let go)
        self.base = 0
        self.size = 0  # bytes read from the client so far
        self.ended = False
        self.overflow = False  # more than limit bytes: no more cursors
        self.reading = False  # a task is inside source.read()
        self.arrived = trio.Event()  # replaced per read; set when it returns
        self.live: Cursor | None = None

    def cursor(self) -> Cursor | None:
        """A body for the next attempt, from the start; None if the body no longer fits.
        The previous cursor is detached."""
        if self.overflow:
            return None
        if self.live is not None:
            self.live.detached = True
        self.live = Cursor(self)
        return self.live

    @property
    def started(self) -> bool:
        """Whether any of the body was read."""
        return self.size > 0 or self.ended

    def _keep(self, piece: bytes | None) -> None:
        if piece is None:
            self.ended = True
            return
        self.size += len(piece)
        if self.size > self.limit:
            self.overflow = True
        self.pieces.append(piece)

    async def _read_more(self) -> None:
        """One more piece from the client into the buffer, or wait for the task that is
        already reading one."""
        if self.reading:
            await self.arrived.wait()
            return
        self.reading = True
        arrived = self.arrived = trio.Event()
        try:
            self._keep(await self.source.read())
        finally:
            self.reading = False
            arrived.set()


class Cursor:
    """One attempt's view of the body: the kept pieces, then the client's stream."""

    __slots__ = ("buffer", "index", "detached")

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self.index = 0  # of the next piece to hand out
        self.detached = False

    def _next_kept(self) -> bytes | None:
        """The next kept piece, if there is one (and let go of the passed ones once no
        retry can need them)."""
        buffer = self.buffer
        at = self.index - buffer.base
        if at >= len(buffer.pieces):
            return None
        piece = buffer.pieces[at]
        self.index += 1
        if buffer.overflow:
            del buffer.pieces[: at + 1]
            buffer.base = self.index
        return piece

    def read_nowait(self) -> BodyPiece:
        if self.detached:
            raise Detached
        piece = self._next_kept()
        if piece is not None:
            return piece
        buffer = self.buffer
        if buffer.ended:
            return None
        if buffer.reading:
            return WOULD_BLOCK
        data = buffer.source.read_nowait()
        if data is WOULD_BLOCK:
            return data
        buffer._keep(data)
        return self._next_kept()

    async def read(self) -> bytes | None:
        buffer = self.buffer
        while True:
            if self.detached:
                raise Detached
            piece = self._next_kept()
            if piece is not None:
                return piece
            if buffer.ended:
                return None
            await buffer._read_more()


__all__ = ["REPLAY_LIMIT", "Cursor", "Detached", "ReplayBuffer"]
