"""The HTTP/2 server joins what an upstream body already holds into full DATA frames."""

from __future__ import annotations

import pytest

from sidecar.core.http2 import DATA_FRAME
from sidecar.layers.base import WOULD_BLOCK, BodyPiece
from sidecar.net.http2 import _gather

K8 = b"a" * 8192
K16 = b"b" * DATA_FRAME


@pytest.mark.parametrize(
    ("first", "queued", "joined", "ended", "left"),
    [
        (K8, [K8, K8, WOULD_BLOCK], K8 + K8, False, [K8, WOULD_BLOCK]),  # stops at a full frame
        (K8, [WOULD_BLOCK], K8, False, []),  # nothing more yet: no wait
        (K8, [b"c" * 100, None], K8 + b"c" * 100, True, []),  # the end came with it
        (b"x", [K16, K8], b"x" + K16, False, [K8]),  # at most a frame and one piece
    ],
)
def test_gather(first: bytes, queued: list[BodyPiece], joined: bytes, ended: bool, left: list[BodyPiece]) -> None:
    pending = list(queued)
    assert _gather(first, lambda: pending.pop(0)) == (joined, ended)
    assert pending == left
