"""The control plane reads the sidecars' metrics, while someone is looking.

``meshlet stat``, ``meshlet top`` and the dashboard ask the control plane for golden
metrics (``/v1/stat``); it scrapes every registered sidecar's admin ``/metrics`` every
``interval`` seconds and keeps the last ``keep`` seconds of scrapes, so a window's rates
come from two real scrapes of each sidecar (control_plane/golden.py does the arithmetic).

Scraping costs the sidecars and the control plane something, so it happens only while
somebody asked in the last ``linger`` seconds: the first question starts it (and is
answered "warming up" until two scrapes are in), and a mesh nobody looks at is not
scraped at all. At most ``concurrency`` scrapes run at once, each with a timeout; a
sidecar that does not answer is left out of that round (its window is then shorter, which
the rates account for).

Only admin addresses on the host the registering session came from are fetched
(:func:`scrape_targets`, control_plane/ownership.py): a registration cannot make the
control plane fetch another host, nor pass off another listener's numbers as a sidecar's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import trio

from . import golden
from .ownership import admin_target
from .registry import Instance

log = logging.getLogger("meshlet.cp.scraper")


def scrape_targets(instances: Iterable[Instance]) -> Iterator[tuple[str, str]]:
    """(instance id, where to fetch its admin listener) of the instances whose admin may be fetched."""
    for instance in instances:
        if (target := admin_target(instance.admin, instance.owner)) is not None:
            yield instance.instance_id, target


class Scraper:
    def __init__(
        self,
        targets: Callable[[], Iterable[tuple[str, str]]],  # (instance id, admin HOST:PORT)
        *,
        interval: float = 2.0,
        keep: float = 300.0,
        linger: float = 120.0,
        concurrency: int = 32,
        timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.targets = targets
        self.interval = interval
        self.keep = keep
        self.linger = linger
        self.concurrency = concurrency
        self.timeout = timeout
        self.transport = transport
        self.wanted_until = -1.0
        self._wake = trio.Event()
        # instance id → (trio time, what the scrape said), oldest first
        self.history: dict[str, deque[tuple[float, golden.Page]]] = {}
        self.rounds = 0

    def wanted(self) -> None:
        """Somebody is looking: scrape for the next ``linger`` seconds."""
        self.wanted_until = trio.current_time() + self.linger
        self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport) as client:
            while True:
                if trio.current_time() >= self.wanted_until:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    self.history.clear()  # scrapes from before the pause would stretch the next windows
                started = trio.current_time()
                await self.scrape_all(client)
                await trio.sleep_until(started + self.interval)

    async def scrape_all(self, client: httpx.AsyncClient) -> None:
        targets = dict(self.targets())
        for gone in [instance for instance in self.history if instance not in targets]:
            del self.history[gone]
        limit = trio.CapacityLimiter(self.concurrency)

        async def scrape(instance: str, admin: str) -> None:
            async with limit:
                try:
                    response = await client.get(f"http://{admin}/metrics")
                    response.raise_for_status()
                    page = golden.read(response.text)
                except (httpx.HTTPError, ValueError) as exc:
                    log.debug("scrape of %s (%s) failed: %s", instance, admin, exc)
                    return
            now = trio.current_time()
            scrapes = self.history.setdefault(instance, deque())
            scrapes.append((now, page))
            while scrapes and scrapes[0][0] < now - self.keep:
                scrapes.popleft()

        async with trio.open_nursery() as nursery:
            for instance, admin in targets.items():
                nursery.start_soon(scrape, instance, admin)
        self.rounds += 1

    def windows(self, seconds: float) -> list[tuple[dict[golden.Hop, golden.Counts], float]]:
        """Per sidecar: what it handled between its oldest scrape in the last ``seconds``
        (or just before) and its newest, and how long that was."""
        now = trio.current_time()
        out = []
        for scrapes in self.history.values():
            if len(scrapes) < 2:
                continue
            newest_time, newest = scrapes[-1]
            start = now - seconds
            oldest_time, oldest = scrapes[0]
            for when, totals in scrapes:  # the last scrape at or before the window's start
                if when > start:
                    break
                oldest_time, oldest = when, totals
            if newest_time > oldest_time:
                out.append((golden.since(oldest.hops, newest.hops), newest_time - oldest_time))
        return out

    def health(self, seconds: float) -> dict[str, dict[str, Any]]:
        """Per destination: how many sidecars see its circuit closed, open or half-open (as
        of their last scrape), and the outlier ejections they made in the window."""
        now = trio.current_time()
        out: dict[str, dict[str, Any]] = {}
        for scrapes in self.history.values():
            if not scrapes:
                continue
            newest_time, newest = scrapes[-1]
            for destination, state in newest.circuits.items():
                entry = out.setdefault(destination, {"closed": 0, "open": 0, "half_open": 0, "ejections": 0.0})
                entry[("closed", "open", "half_open")[state] if 0 <= state <= 2 else "closed"] += 1
            oldest = next((page for when, page in scrapes if when >= now - seconds), newest)
            for destination, total in newest.ejections.items():
                entry = out.setdefault(destination, {"closed": 0, "open": 0, "half_open": 0, "ejections": 0.0})
                entry["ejections"] += max(0.0, total - oldest.ejections.get(destination, 0.0))
        return out

    def stat(self, by: str, seconds: float) -> dict[str, Any]:
        self.wanted()
        windows = self.windows(seconds)
        return {
            "by": by,
            "window_seconds": seconds,
            "sidecars": len(windows),
            # how much of the window the scrapes cover yet (less, just after the first question)
            "covered_seconds": round(max((seconds for _, seconds in windows), default=0.0), 3),
            "warming_up": not windows and bool(list(self.targets())),
            "rows": [row.to_json() for row in golden.rows(windows, by)],
        }


__all__ = ["Scraper", "scrape_targets"]
