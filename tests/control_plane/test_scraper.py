"""The control plane's scraper (control_plane/scraper.py): scrapes only while somebody
looks, windows from real scrapes, sidecars that fail left out. Fake clock, fake sidecars
(their /metrics rendered by the sidecar's own telemetry)."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from control_plane.scraper import Scraper
from sidecar.telemetry import Telemetry, render


class Sidecars(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.telemetry = {"a:1": Telemetry(), "b:1": Telemetry()}
        self.scrapes = 0
        self.down: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.scrapes += 1
        host = f"{request.url.host}:{request.url.port}"
        if host in self.down:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, content=render(lambda: [self.telemetry[host].snapshot()]))


def serve(sidecars: Sidecars, t: Telemetry, n: int, code: int = 200) -> None:
    for _ in range(n):
        t.request_finished("inbound", "user", "item", "", code, "", 0.002)


async def test_scrapes_only_while_wanted_and_rates_come_from_two_scrapes(autojump_clock: trio.abc.Clock) -> None:
    sidecars = Sidecars()
    scraper = Scraper(lambda: [("a", "a:1"), ("b", "b:1")], interval=2.0, linger=10.0, transport=sidecars)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scraper.run)
        await trio.sleep(30)
        assert sidecars.scrapes == 0  # nobody asked: nothing scraped
        first = scraper.stat("service", 10)
        assert first["warming_up"] and first["rows"] == []
        await trio.sleep(1)  # the first round
        serve(sidecars, sidecars.telemetry["a:1"], 40)
        serve(sidecars, sidecars.telemetry["b:1"], 20, code=500)
        await trio.sleep(2)  # the second round
        answer = scraper.stat("service", 10)
        assert not answer["warming_up"] and answer["sidecars"] == 2
        (row,) = answer["rows"]
        assert row["name"] == "item" and row["requests"] == 60 and row["rps"] == 30.0  # 40/2 s + 20/2 s
        assert row["success"] == round(40 / 60, 4)
        sidecars.down.add("b:1")
        await trio.sleep(2)
        (row,) = scraper.stat("service", 10)["rows"]
        assert row["requests"] == 60  # b's scrapes so far still count; its failed round is left out
        scrapes = sidecars.scrapes
        await trio.sleep(60)  # nobody asked for more than the linger: scraping stops
        stopped = sidecars.scrapes
        await trio.sleep(60)
        assert sidecars.scrapes == stopped and stopped <= scrapes + 2 * (10 // 2 + 1)  # two sidecars, the linger
        nursery.cancel_scope.cancel()


async def test_a_sidecar_gone_from_the_registry_is_forgotten(autojump_clock: trio.abc.Clock) -> None:
    sidecars = Sidecars()
    targets = [("a", "a:1"), ("b", "b:1")]
    scraper = Scraper(lambda: list(targets), interval=1.0, transport=sidecars)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scraper.run)
        scraper.wanted()
        await trio.sleep(2.5)
        assert set(scraper.history) == {"a", "b"}
        targets.pop()
        await trio.sleep(1)
        assert set(scraper.history) == {"a"}
        nursery.cancel_scope.cancel()
