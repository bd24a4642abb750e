"""The app's health probe (sidecar/net/health.py), answered without a socket, on trio's
mock clock."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from sidecar.net.health import HEALTH_INTERVAL, AppHealth


async def test_the_probe_reports_each_change_once(autojump_clock: trio.testing.MockClock) -> None:
    answers = iter([200, 404, 503, 503, httpx.ConnectError("refused"), 204])
    seen: list[bool] = []

    def answer(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == "http://app/healthz"
        outcome = next(answers)
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome)

    health = AppHealth("http://app/healthz", transport=httpx.MockTransport(answer))
    assert not health.ready  # until a probe says so

    async def changed() -> None:
        seen.append(health.ready)
        if len(seen) == 3:  # every answer given
            health.stop()

    with trio.fail_after(10 * HEALTH_INTERVAL):
        await health.serve(changed)
    # ready (200, and 404: the app is up), not ready (503, no answer), ready again
    assert seen == [True, False, True]
