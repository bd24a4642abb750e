"""The local app's health, probed over HTTP: what the sidecar tells the registry.

An answer below 500 is healthy (a 404 from an app without a health route still means it
is up); a 5xx, a refused connection or no answer in time is not. An app that speaks
opaque TCP or gRPC (``tcp://HOST:PORT``) is healthy when it accepts a connection, as
Kubernetes' ``tcpSocket`` probe: nothing is sent to it (a gRPC server answers no plain GET).
An app declared HTTP/2 (``h2c://HOST:PORT/PATH``) gets its GET over HTTP/2, prior knowledge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import trio

log = logging.getLogger("meshlet.control")

HEALTH_INTERVAL = 5.0  # how often the app's health is probed
HEALTH_TIMEOUT = 2.0


class AppHealth:
    """The app's health as last probed at ``url`` (not ready until a probe says so)."""

    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.ready = False
        self._stopped = False
        self._transport = transport  # tests answer without a socket

    async def serve(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Probe every HEALTH_INTERVAL until stopped; await ``changed()`` whenever the
        answer differs from the one before."""
        http2 = self.url.startswith("h2c://")  # fixed for the sidecar's life: --app-protocol or its Service
        async with httpx.AsyncClient(
            timeout=HEALTH_TIMEOUT, transport=self._transport, http1=not http2, http2=http2
        ) as client:
            while not self._stopped:
                ready = await self._probe(client)
                if ready != self.ready:
                    self.ready = ready
                    log.info("local app is %s", "ready" if ready else "not ready")
                    await changed()
                await trio.sleep(HEALTH_INTERVAL)

    async def _probe(self, client: httpx.AsyncClient) -> bool:
        if self.url.startswith("tcp://"):
            return await _accepts(self.url[len("tcp://") :])
        url = "http://" + self.url[len("h2c://") :] if self.url.startswith("h2c://") else self.url
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return False
        return response.status_code < 500

    def stop(self) -> None:
        """No more probes (the sidecar is draining): the registry has heard the last."""
        self._stopped = True


async def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with trio.move_on_after(HEALTH_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


__all__ = ["HEALTH_INTERVAL", "HEALTH_TIMEOUT", "AppHealth"]
