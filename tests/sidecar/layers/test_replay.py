"""The retry buffer (sidecar/layers/replay.py): a retry gets the whole body again, a body
larger than the limit is never replayed, only one task reads the client at a time, and
an abandoned attempt's reader stops."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.layers.base import WOULD_BLOCK
from sidecar.layers.replay import Cursor, Detached, ReplayBuffer


class Client:
    """A body source fed piece by piece by the test; fails if read by two tasks at once."""

    def __init__(self, pieces: list[bytes] | None = None) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes | None](100)
        self.readers = 0
        for piece in pieces or []:
            self.send.send_nowait(piece)

    def end(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.send.send_nowait(piece)
        self.send.send_nowait(None)

    async def read(self) -> bytes | None:
        self.readers += 1
        assert self.readers == 1, "two tasks read the client at once"
        try:
            return await self.receive.receive()
        finally:
            self.readers -= 1

    def read_nowait(self) -> bytes | None | object:
        try:
            return self.receive.receive_nowait()
        except trio.WouldBlock:
            return WOULD_BLOCK


async def drain(cursor: Cursor) -> bytes:
    out = []
    while (piece := await cursor.read()) is not None:
        out.append(piece)
    return b"".join(out)


async def test_a_retry_reads_what_the_first_attempt_read_then_the_rest() -> None:
    client = Client([b"ab", b"cd"])
    buffer = ReplayBuffer(client, limit=100)
    first = buffer.cursor()
    assert first is not None and not buffer.started
    assert await first.read() == b"ab" and first.read_nowait() == b"cd" and first.read_nowait() is WOULD_BLOCK
    second = buffer.cursor()
    assert second is not None and first.detached and buffer.started
    with pytest.raises(Detached):
        await first.read()
    client.end(b"ef")
    assert await drain(second) == b"abcdef"
    third = buffer.cursor()
    assert third is not None and await drain(third) == b"abcdef"  # the whole body, kept


async def test_a_body_over_the_limit_is_never_replayed_and_not_kept() -> None:
    client = Client()
    client.end(b"x" * 60, b"y" * 60, b"z" * 60)
    buffer = ReplayBuffer(client, limit=100)
    only = buffer.cursor()
    assert only is not None
    assert await only.read() == b"x" * 60
    assert buffer.cursor() is not None  # 60 bytes: still fits
    only = buffer.live
    assert only is not None and await drain(only) == b"x" * 60 + b"y" * 60 + b"z" * 60
    assert buffer.overflow and buffer.cursor() is None
    assert buffer.pieces == []  # passed pieces let go once no retry can need them


async def test_the_abandoned_reader_stops_and_its_piece_goes_to_the_retry() -> None:
    client = Client([b"a"])
    buffer = ReplayBuffer(client, limit=100)
    old = buffer.cursor()
    assert old is not None and await old.read() == b"a"
    got: list[object] = []

    async def old_pump() -> None:
        try:
            await old.read()  # waits inside client.read(): the client is slow
        except Detached:
            got.append("detached")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_pump)
        await trio.testing.wait_all_tasks_blocked()
        new = buffer.cursor()
        assert new is not None
        assert new.read_nowait() == b"a" and new.read_nowait() is WOULD_BLOCK  # the old task is reading

        async def finish() -> None:
            await trio.testing.wait_all_tasks_blocked()
            client.end(b"b")

        nursery.start_soon(finish)
        assert await drain(new) == b"b"  # "b" was read by the old task, kept for the new one
    assert got == ["detached"]


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=12),
    retry_after=st.lists(st.integers(0, 12), max_size=4),
    limit=st.integers(0, 200),
)
def test_every_cursor_gets_the_exact_body_or_none_is_given(
    pieces: list[bytes], retry_after: list[int], limit: int
) -> None:
    async def main() -> None:
        client = Client()
        client.end(*pieces)
        buffer = ReplayBuffer(client, limit=limit)
        body = b"".join(pieces)
        cursor = buffer.cursor()
        assert cursor is not None
        for n in sorted(retry_after):  # give up after n pieces, retry from the start
            for _ in range(n):
                if await cursor.read() is None:
                    break
            again = buffer.cursor()
            if again is None:
                assert buffer.size > limit  # refused only because it no longer fits
                return
            cursor = again
        assert await drain(cursor) == body

    trio.run(main)
