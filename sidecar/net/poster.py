"""A small HTTP/1.1 client with one job: send one request, return the status. The span
exporter POSTs its batches with it, the app's health probe GETs with it.

Why not httpx, as elsewhere? The span exporter runs on the sidecar's event loop, where every
request in flight waits while it works. An httpx POST costs several times this client's CPU
whatever the batch (its request and response machinery, not the bytes), and those pauses
showed up in the mesh path's p99 with tracing on (benchmarks/RESULTS.md, "Tracing
overhead"). This client reuses the data path's own response parser
(sidecar/core/http1.py, llhttp) and keeps one connection alive between batches.

It speaks ``http://`` only; the exporter sends to an ``https://`` collector with httpx.
It also keeps httpx (its SSL context with a CA bundle, a few MiB) out of a sidecar that
never needs it: the health probe's GET is all a plain HTTP app asks.
A kept-alive connection the collector closed while idle is found when the next POST gets no
byte back; that POST is sent once more on a fresh connection (nothing was processed: no
response began), as HTTP clients do for stale connections.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import trio

from ..core.http1 import END, ProtocolError, ResponseHead, ResponseReader

READ_SIZE = 65536


class PostError(Exception):
    """The peer (a collector, the app) could not be reached, or did not answer in HTTP/1.1 in time."""


def http_target(url: str) -> tuple[str, int, bytes, bytes]:
    """(host, port, Host header value, request target) of an ``http://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # As httpx sends it: a space, a control or a non-ASCII character percent-encoded (a
    # --health-path is typed by hand), never raw in the request line.
    target = quote(path, safe="!#$%&'()*+,/:;=?@[]~")
    return parts.hostname, parts.port or 80, parts.netloc.encode(), target.encode("ascii")


class Http1Poster:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._stream: trio.SocketStream | None = None
        self._peer: tuple[str, int] | None = None
        self.connections = 0  # opened so far (tests check that one is kept alive)

    async def post(
        self, url: str, body: bytes, content_type: bytes = b"application/json", authorization: bytes = b""
    ) -> int:
        """The status the collector answered. Raises PostError (closing the connection).
        ``authorization``: an ``Authorization`` header value to send (a secret: never logged)."""
        auth = b"authorization: %s\r\n" % authorization if authorization else b""
        fields = b"content-type: %s\r\n%scontent-length: %d\r\n" % (content_type, auth, len(body))
        return await self._request(b"POST", url, fields, body)

    async def get(self, url: str) -> int:
        """The status a GET of ``url`` answered (its body is read and dropped). Raises PostError
        (closing the connection)."""
        return await self._request(b"GET", url, b"", b"")

    async def _request(self, method: bytes, url: str, fields: bytes, body: bytes) -> int:
        host, port, authority, target = http_target(url)
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (method, target, authority, fields)
        try:
            with trio.fail_after(self.timeout):
                reused = self._stream is not None and self._peer == (host, port)
                if not reused:
                    await self._connect(host, port)
                status = await self._exchange(method, head + body)
                if status is None and reused:  # stale: closed by the peer while idle
                    await self._connect(host, port)
                    status = await self._exchange(method, head + body)
                if status is None:
                    raise PostError("the peer closed the connection without answering")
                return status
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, PostError) as exc:
            self.close()
            if isinstance(exc, PostError):
                raise
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc) or type(exc).__name__
            raise PostError(reason) from exc

    async def _connect(self, host: str, port: int) -> None:
        self.close()
        self._stream = await trio.open_tcp_stream(host, port)
        self._peer = (host, port)
        self.connections += 1

    async def _exchange(self, method: bytes, request: bytes) -> int | None:
        """Send, read the whole response; its status, or None if the connection closed
        before any byte of one arrived."""
        stream = self._stream
        assert stream is not None
        try:
            await stream.send_all(request)
        except trio.BrokenResourceError:
            return None
        reader = ResponseReader()
        reader.expect(method)
        status: int | None = None
        keep_alive = False
        received_any = False
        while True:
            while reader.events:
                event = reader.events.popleft()
                if type(event) is ResponseHead:
                    status, keep_alive = event.status, event.keep_alive
                elif event is END:
                    if not keep_alive or reader.dirty:
                        self.close()
                    return status
                elif isinstance(event, ProtocolError):
                    raise PostError(f"the answer is not valid HTTP/1.1: {event.detail}")
            try:
                data = await stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                if not received_any:
                    return None
                reader.feed_eof()
                if not reader.events:
                    raise PostError("the peer closed the connection in the middle of its answer")
                continue
            received_any = True
            reader.feed(data)

    async def aclose(self) -> None:
        """close(), for a caller that holds this or an httpx client (sidecar/net/health.py)."""
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.socket.close()
            self._stream = None
            self._peer = None


__all__ = ["Http1Poster", "PostError", "http_target"]
