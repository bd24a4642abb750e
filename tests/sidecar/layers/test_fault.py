"""Fault injection rates (a Route rule's fault), on trio's fake clock."""

from __future__ import annotations

import random

import trio

from meshlet.schema import Abort, Delay, Fault
from sidecar.layers.routing import _fault


async def test_delays_and_aborts_hit_their_percentages(autojump_clock: trio.abc.Clock) -> None:
    spec = Fault(delay=Delay(percent=25, duration=2), abort=Abort(percent=10, status=418))
    rng = random.Random(7)
    delayed = aborted = 0
    for _ in range(2000):
        started = trio.current_time()
        response = await _fault(spec, rng)
        delayed += trio.current_time() - started >= 2
        if response is not None:
            aborted += 1
            assert response.status == 418 and response.raw is not None and b"x-meshlet-fault: abort" in response.raw
    assert 450 <= delayed <= 550  # 25 % of 2,000, within ~5 standard deviations
    assert 140 <= aborted <= 260  # 10 %


async def test_zero_percent_never_fires() -> None:
    spec = Fault(delay=Delay(percent=0, duration=60), abort=Abort(percent=0))
    rng = random.Random(1)
    with trio.fail_after(1):
        assert all([await _fault(spec, rng) is None for _ in range(1000)])
