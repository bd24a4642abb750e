"""Span export, off the request path (docs/tracing.md): a bounded queue and one task that
POSTs batches to a Zipkin v2 collector (the control plane's embedded store by default).

``submit`` never waits and never fails: past ``max_queue`` spans it drops the span and
counts it. A span is encoded when it is submitted (the queue holds its JSON bytes, a few
hundred bytes instead of a Span with its dicts), so a batch costs only a join to send. The sender wakes every ``interval`` seconds (or as soon as a batch is full),
posts at most ``batch`` spans with a ``timeout``; a collector that is down, slow or
refuses the batch costs that batch (counted as dropped: a span accepted into the queue is
either delivered or counted, never silently lost), and the next attempt waits longer
(doubling, up to ``max_backoff``) so a dead collector is not hammered.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..core.spans import Span, encode_span, join
from .poster import Http1Poster, PostError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("meshlet.tracing")


@dataclass(frozen=True, slots=True)
class Collector:
    """A collector that wants a token: the control plane's own store, with the span token its
    welcome gave this session. Only this collector ever sees the token (a URL given as a plain
    string, an external collector, gets none)."""

    url: str
    token: str = field(default="", repr=False)  # a secret: not in repr, logs or errors

    @property
    def authorization(self) -> bytes:
        return b"Bearer " + self.token.encode("ascii") if self.token else b""


def collector_trust(ca_file: Path | None) -> ssl.SSLContext | bool:
    """What an https:// collector (the control plane's API served with --api-tls-cert) is
    verified with: httpx's default CAs, or, given ``ca_file`` (--api-ca), the system's CAs and
    that file's. ssl.SSLError or OSError if the file cannot be read."""
    if ca_file is None:
        return True
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca_file)
    return context


class SpanExporter:
    def __init__(
        self,
        url: str | Callable[[], str | Collector | None],
        *,
        max_queue: int = 10_000,
        batch: int = 500,
        interval: float = 1.0,
        timeout: float = 2.0,
        max_backoff: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,  # what an https:// collector's certificate is checked with
        on_dropped: Callable[[int, str], None] | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        # Where to send, asked before each batch (the collector can be learnt, or change,
        # with the configuration); None: nowhere yet, the spans wait in the queue.
        self.url: Callable[[], str | Collector | None] = url if callable(url) else (lambda: url)
        self.max_queue = max_queue
        self.batch = batch
        self.interval = interval
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.transport = transport
        self.verify = verify
        self.queue: deque[bytes] = deque()  # encoded spans
        self.sent = 0
        self.dropped = 0
        self._on_dropped = on_dropped or (lambda _n, _why: None)
        self._on_sent = on_sent or (lambda _n: None)
        self._full = trio.Event()
        self._poster = Http1Poster(timeout)  # http:// collectors (see poster.py for why)
        self._client: httpx.AsyncClient | None = None  # https://, or a test's transport

    def submit(self, span: Span) -> None:
        """Queue a finished span; drop it (counted) when the queue is full."""
        if len(self.queue) >= self.max_queue:
            self._drop(1, "queue-full")
            return
        self.queue.append(encode_span(span))
        if len(self.queue) >= self.batch:
            self._full.set()

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        self._on_dropped(count, why)

    async def run(self) -> None:
        """Send batches forever (a task of the sidecar's nursery)."""
        while self.url() is None:  # noqa: ASYNC110 - learnt from the configuration, not an event
            await trio.sleep(self.interval)
        backoff = 0.0
        try:
            while True:
                with trio.move_on_after(self.interval + backoff):
                    await self._full.wait()
                self._full = trio.Event()
                url = self.url()
                while self.queue and url is not None:
                    batch = [self.queue.popleft() for _ in range(min(self.batch, len(self.queue)))]
                    if not await self._post(url, batch):
                        backoff = min(self.max_backoff, max(self.interval, backoff * 2))
                        break
                    backoff = 0.0
                    if len(self.queue) < self.batch:
                        # What came in during the POST waits for a full batch or the next
                        # interval: sending it at once would make a POST for every few
                        # spans under load.
                        break
        finally:
            self._poster.close()
            if self._client is not None:
                with trio.CancelScope(shield=True):
                    await self._client.aclose()

    async def _post(self, collector: str | Collector, batch: list[bytes]) -> bool:
        body = join(batch)
        url, authorization = (
            (collector.url, collector.authorization) if isinstance(collector, Collector) else (collector, b"")
        )
        try:
            if self.transport is None and url.startswith("http://"):
                status = await self._poster.post(url, body, authorization=authorization)
            else:
                status = await self._post_with_httpx(url, body, authorization)
        except (PostError, OSError) as exc:
            self._drop(len(batch), "collector-unreachable")
            log.warning("spans not delivered to %s: %s (%d dropped)", url, exc, len(batch))
            return False
        if status >= 300:
            self._drop(len(batch), "collector-refused")
            log.warning("collector %s refused %d spans: %s", url, len(batch), status)
            return False
        self.sent += len(batch)
        self._on_sent(len(batch))
        return True

    async def _post_with_httpx(self, url: str, body: bytes, authorization: bytes) -> int:
        """An https:// collector's POST (or a test's transport). httpx is imported here: with
        its SSL context and CA bundle it costs a sidecar several MiB, paid only when needed."""
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, transport=self.transport, verify=self.verify)
        headers = {"content-type": "application/json"}
        if authorization:
            headers["authorization"] = authorization.decode("ascii")
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise PostError(str(exc)) from exc
        return response.status_code

    def stats(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "sent": self.sent, "dropped": self.dropped}


__all__ = ["Collector", "SpanExporter", "collector_trust"]
