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
from typing import Protocol

import trio

from .poster import Http1Poster, PostError

log = logging.getLogger("meshlet.control")

HEALTH_INTERVAL = 5.0  # how often the app's health is probed
HEALTH_TIMEOUT = 2.0


class StatusClient(Protocol):
    """What a probe needs of an HTTP client: the status a GET answered, PostError if none came."""

    async def get(self, url: str) -> int: ...

    async def aclose(self) -> None: ...


class AppHealth:
    """The app's health as last probed at ``url`` (not ready until a probe says so).
    ``client``: what sends the GETs (tests answer without a socket); by default HTTP/1.1 with
    sidecar/net/poster.py, or HTTP/2 for an ``h2c://`` app."""

    def __init__(self, url: str, *, client: StatusClient | None = None) -> None:
        self.url = url
        self.ready = False
        self._stopped = False
        self._client = client

    async def serve(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Probe every HEALTH_INTERVAL until stopped; await ``changed()`` whenever the
        answer differs from the one before."""
        client = self._client or _client_for(self.url)  # fixed for the sidecar's life: --app-protocol or its Service
        try:
            while not self._stopped:
                ready = await self._probe(client)
                if ready != self.ready:
                    self.ready = ready
                    log.info("local app is %s", "ready" if ready else "not ready")
                    await changed()
                await trio.sleep(HEALTH_INTERVAL)
        finally:
            with trio.CancelScope(shield=True):  # as the httpx client's `async with` did
                await client.aclose()

    async def _probe(self, client: StatusClient) -> bool:
        if self.url.startswith("tcp://"):
            return await _accepts(self.url[len("tcp://") :])
        url = "http://" + self.url[len("h2c://") :] if self.url.startswith("h2c://") else self.url
        try:
            status = await client.get(url)
        except PostError:
            return False
        return status < 500

    def stop(self) -> None:
        """No more probes (the sidecar is draining): the registry has heard the last."""
        self._stopped = True


def _client_for(url: str) -> StatusClient:
    return _H2Client() if url.startswith("h2c://") else Http1Poster(HEALTH_TIMEOUT)


class _H2Client:
    """GETs over HTTP/2, prior knowledge, with httpx: imported here, so that only a sidecar
    whose app speaks HTTP/2 only loads it (httpx, h2 and an SSL context: several MiB)."""

    def __init__(self) -> None:
        import httpx

        self._httpx = httpx
        self._client = httpx.AsyncClient(timeout=HEALTH_TIMEOUT, http1=False, http2=True)

    async def get(self, url: str) -> int:
        try:
            response = await self._client.get(url)
        except self._httpx.HTTPError as exc:
            raise PostError(str(exc)) from exc
        return response.status_code

    async def aclose(self) -> None:
        await self._client.aclose()


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
