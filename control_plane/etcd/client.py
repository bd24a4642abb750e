"""An etcd v3 client over the HTTP/JSON gateway (httpx, trio): KV, transactions, leases,
compaction, member status and watches, with failover between the members.

A request goes to the member that last answered. A member that cannot be reached, times out,
answers HTTP 5xx or gRPC code 14 (unavailable: no leader, no quorum) is skipped for the next;
when every member failed, :class:`EtcdUnavailable` names each one's reason. A write that timed out
(or lost its connection) may still have been applied: it is tried on the next member all the same,
and the message says so. A put tried twice makes one more revision of the same value; a
transaction whose first try was applied answers ``succeeded=False`` on the second, so a caller
that must know reads the key again. Other errors are etcd's answer,
raised as :class:`EtcdError` with its code (11 compacted: :class:`Compacted`; lease not found:
:class:`LeaseNotFound`). Every answer is read up to :data:`MAX_RESPONSE` bytes.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import httpx
import trio

from . import codec
from .codec import Json, prefix_end
from .types import (
    Compacted,
    Compare,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Lease,
    LeaseNotFound,
    MemberStatus,
    Op,
    TxnResult,
    WatchBatch,
)

# etcd's own largest request is 1.5 MiB; a range or a watch message of many keys is larger, but bounded.
MAX_RESPONSE = 16 * 1024 * 1024
UNAVAILABLE = 14  # gRPC code: no leader, no quorum, a request that timed out inside etcd
_NOT_FOUND = 5
_OUT_OF_RANGE = 11
BACKOFF_FIRST = 0.1  # a watch's reconnect delay, doubling (jittered) up to BACKOFF_MAX
BACKOFF_MAX = 2.0


def check_endpoint(endpoint: str) -> str:
    """``http://HOST:PORT`` (or https), without a trailing slash; ValueError otherwise."""
    if not isinstance(endpoint, str):
        raise TypeError(f"an etcd endpoint is a str, not {type(endpoint).__name__}")
    url = endpoint.rstrip("/")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError):
        raise ValueError(f"etcd endpoint {endpoint!r} is not a URL like http://127.0.0.1:2379") from None
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.host
        or not port
        or port > 65535
        or parsed.path not in ("", "/")
    ):
        raise ValueError(f"etcd endpoint {endpoint!r} is not a URL like http://127.0.0.1:2379")
    return url


class _Failed(Exception):
    """One member could not answer (the next one is tried)."""


class Etcd:
    """A client of one etcd cluster, given its members' client URLs. Close with ``aclose``."""

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 5.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints is a sequence of URLs, not one str")
        self.endpoints = tuple(check_endpoint(e) for e in endpoints)
        if not self.endpoints:
            raise ValueError("etcd needs at least one endpoint")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout {timeout!r} is not a positive number of seconds")
        self.timeout = timeout
        self._current = 0  # the member that last answered
        self._closed = False
        # One client, its connections kept alive; a watch holds one of them for as long as it runs.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout), transport=transport, trust_env=False)

    async def aclose(self) -> None:
        self._closed = True
        await self._http.aclose()

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # KV ---------------------------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        revision: int = 0,
        serializable: bool = False,
        keys_only: bool = False,
        limit: int = 0,
    ) -> tuple[int, list[KeyValue]]:
        """(the header's revision, the keys in [key, range_end) by key; ``key`` alone without range_end)."""
        body = codec.range_request(
            key, range_end, revision=revision, serializable=serializable, keys_only=keys_only, limit=limit
        )
        return codec.parse_range(await self._call("/v3/kv/range", body))

    async def range_prefix(self, prefix: bytes, **kw: Any) -> tuple[int, list[KeyValue]]:
        return await self.range(prefix, prefix_end(prefix), **kw)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """The revision the put made."""
        return codec.parse_put(await self._call("/v3/kv/put", codec.put_request(key, value, lease), write=True))

    async def delete(self, key: bytes, range_end: bytes | None = None) -> tuple[int, int]:
        """(the header's revision, how many keys were deleted)."""
        body = codec.delete_request(key, range_end)
        return codec.parse_delete(await self._call("/v3/kv/deleterange", body, write=True))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """If every compare holds, run ``success``, else ``failure``: one revision either way."""
        body = codec.txn_request(compare, success, failure)
        return codec.parse_txn(await self._call("/v3/kv/txn", body, write=True))

    async def compact(self, revision: int) -> None:
        """Forget the history before ``revision`` (physically, before this returns)."""
        await self._call("/v3/kv/compaction", codec.compact_request(revision), write=True)

    # leases -----------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        return codec.parse_grant(await self._call("/v3/lease/grant", codec.grant_request(ttl), write=True))

    async def keepalive(self, lease_id: int) -> int:
        """The lease's TTL, renewed; LeaseNotFound when it expired or was revoked."""
        body = await self._call("/v3/lease/keepalive", codec.lease_request(lease_id))
        return codec.parse_keepalive(body, lease_id)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease (its keys are deleted); a lease already gone is not an error."""
        try:
            await self._call("/v3/lease/revoke", codec.lease_request(lease_id), write=True)
        except LeaseNotFound:
            pass

    # cluster ----------------------------------------------------------------------------------

    async def status(self) -> list[MemberStatus]:
        """Every endpoint's status, asked concurrently; a member that did not answer has ``error``."""
        statuses: list[MemberStatus] = [MemberStatus(e, error="not asked") for e in self.endpoints]

        async def ask(i: int, endpoint: str) -> None:
            try:
                body = await self._post(endpoint, "/v3/maintenance/status", {}, write=False)
                statuses[i] = codec.parse_status(body, endpoint)
            except Exception as e:  # whatever went wrong is this member's status, never the caller's error
                statuses[i] = MemberStatus(endpoint, error=str(e) or type(e).__name__)

        async with trio.open_nursery() as nursery:
            for i, endpoint in enumerate(self.endpoints):
                nursery.start_soon(ask, i, endpoint)
        return statuses

    # watch ------------------------------------------------------------------------------------

    def watch(
        self, prefix: bytes, start_revision: int, *, prev_kv: bool = True, rng: random.Random | None = None
    ) -> Watch:
        """Every change under ``prefix`` from ``start_revision`` on, resumed on another member
        after a failure; use as ``async with etcd.watch(...) as w: async for batch in w``."""
        return Watch(self, prefix, start_revision, prev_kv=prev_kv, rng=rng)

    # transport --------------------------------------------------------------------------------

    async def _call(self, path: str, body: Json, *, write: bool = False) -> Json:
        """POST to the member that last answered, then to each of the others in turn."""
        if self._closed:
            raise trio.ClosedResourceError("the etcd client is closed")
        reasons: list[str] = []
        count = len(self.endpoints)
        first = self._current  # other calls move it while this one waits: every member once, from here
        for step in range(count):
            index = (first + step) % count
            endpoint = self.endpoints[index]
            try:
                answer = await self._post(endpoint, path, body, write=write)
            except _Failed as e:
                reasons.append(f"{endpoint}: {e}")
                continue
            self._current = index
            return answer
        raise EtcdUnavailable(
            "no etcd member answered " + path + ": " + "; ".join(reasons), code=UNAVAILABLE, endpoint=endpoint
        )

    async def _post(self, endpoint: str, path: str, body: Json, *, write: bool) -> Json:
        """One member's answer; _Failed when it could not give one, EtcdError for etcd's errors."""
        try:
            async with self._http.stream("POST", endpoint + path, json=body) as response:
                data = await read_capped(response, MAX_RESPONSE)
        except httpx.TimeoutException:
            ambiguous = " (a write: it may have been applied)" if write else ""
            raise _Failed(f"timed out after {self.timeout:g}s{ambiguous}") from None
        except httpx.ConnectError as e:
            raise _Failed(f"cannot connect ({e or type(e).__name__})") from None
        except httpx.TransportError as e:
            ambiguous = " (a write: it may have been applied)" if write else ""
            raise _Failed(f"{type(e).__name__}: {e}{ambiguous}") from None
        try:
            answer = codec.loads(data, path)
        except EtcdError:
            if response.status_code >= 500:  # a proxy's or a dying member's page, not etcd's JSON
                raise _Failed(f"HTTP {response.status_code}") from None
            raise
        error = codec.gateway_error(answer)
        if error is None and response.status_code == 200:
            return answer
        code, message = (error.code, error.message) if error else (None, f"HTTP {response.status_code}")
        if code == UNAVAILABLE or response.status_code >= 500:
            ambiguous = " (a write: it may have been applied)" if write and "timed out" in message else ""
            raise _Failed((f"{message} (code {code})" if code is not None else message) + ambiguous)
        raise _error(message, code, endpoint)


def _error(message: str, code: int | None, endpoint: str) -> EtcdError:
    text = f"etcd {endpoint}: {message}"
    if code == _OUT_OF_RANGE and "compacted" in message:
        return Compacted(text, endpoint=endpoint)
    if "lease not found" in message:
        return LeaseNotFound(text, code=code if code is not None else _NOT_FOUND, endpoint=endpoint)
    return EtcdError(text, code=code, endpoint=endpoint)


def _chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    # an async generator (typed as an iterator), over httpx's own: see _abandon
    return cast(AsyncGenerator[bytes, None], response.aiter_bytes())


async def _abandon(response: httpx.Response, chunks: AsyncGenerator[bytes, None] | None) -> None:
    """Close a response read part way. httpx reads a body through nested async generators, and
    closing the outer one would leave the inner ones suspended (to be finalized, with a warning,
    by the garbage collector); closing the connection first and reading once more ends them all
    with the read's error."""
    # shielded (a cancelled reader still closes), and bounded (a read that would wait is given up)
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _DRAIN_TIMEOUT):
        await response.aclose()
        if chunks is None:
            return
        for _ in range(_DRAIN_READS):  # pieces read before the close come first
            try:
                await chunks.__anext__()
            except (StopAsyncIteration, Exception):
                return
        await chunks.aclose()


_DRAIN_READS = 64
_DRAIN_TIMEOUT = 1.0


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The body, or EtcdError past ``limit`` bytes (before reading them all)."""
    parts: list[bytes] = []
    size = 0
    chunks = _chunks(response)
    done = False
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise EtcdError(f"etcd's answer is larger than {limit} bytes: refused")
            parts.append(chunk)
        done = True
    finally:
        if not done:
            await _abandon(response, chunks)
    return b"".join(parts)


class Watch:
    """An async iterator of :class:`WatchBatch` for one prefix, from a start revision on.

    It reconnects after a failure (a member without a leader, the end of the stream, a network
    error) to the next member, from ``last_revision + 1``, with a jittered backoff (0.1 s doubling
    to 2 s), forever: ``connected`` and ``error`` say how it is doing. No event is delivered twice
    (anything at or below ``last_revision`` is dropped). A start that was compacted raises
    :class:`Compacted` from the iterator: list again, then watch from its revision + 1. It runs no
    task of its own; closing it (``aclose``, or leaving ``async with``) ends the stream."""

    def __init__(
        self, etcd: Etcd, prefix: bytes, start_revision: int, *, prev_kv: bool = True, rng: random.Random | None = None
    ) -> None:
        if start_revision < 1:
            raise ValueError(f"start_revision {start_revision} is not >= 1 (etcd's first revision is 1)")
        self.prefix = prefix
        self.connected = False
        self.last_revision = start_revision - 1
        self.error = "not connected yet"
        self.reconnects = 0  # streams opened after the first
        self._etcd = etcd
        self._range_end = prefix_end(prefix)
        self._prev_kv = prev_kv
        self._rng = rng or random.Random()
        self._endpoint = etcd._current
        self._response: httpx.Response | None = None
        self._buffer = bytearray()
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._delay = 0.0  # before the next connect: 0 until a stream fails
        self._closed = False

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Watch:
        return self

    async def aclose(self) -> None:
        self._closed = True
        self.connected = False
        self.error = "closed"
        await self._drop_stream()

    async def __anext__(self) -> WatchBatch:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._response is None:
                await self._connect()
                continue
            try:
                line = await self._next_line()  # EtcdError past MAX_RESPONSE: raised
            except (httpx.TransportError, _StreamEnded) as e:
                await self._failed(f"{type(e).__name__}: {e}" if isinstance(e, httpx.TransportError) else str(e))
                continue
            try:
                message = codec.parse_watch_message(line)
            except EtcdError as e:  # this member's stream is not etcd's: another may be
                await self._failed(str(e))
                continue
            batch = await self._handle(message)
            if batch is not None:
                return batch

    async def _handle(self, message: codec.WatchMessage) -> WatchBatch | None:
        if message.kind == "created":
            self.connected, self.error, self._delay = True, "", 0.0
            return None
        if message.kind == "progress":
            if message.revision <= self.last_revision:
                return None
            self.last_revision = message.revision
            return WatchBatch(message.revision, ())
        if message.kind == "events":
            fresh = tuple(e for e in message.events if e.kv.mod_revision > self.last_revision)
            if not fresh:
                return None
            self.last_revision = fresh[-1].kv.mod_revision
            return WatchBatch(self.last_revision, fresh)
        if message.kind == "canceled" and message.compact_revision:
            await self.aclose()
            self.error = (
                f"revision {self.last_revision + 1} was compacted (compact revision {message.compact_revision})"
            )
            raise Compacted(
                f"etcd watch of {self.prefix!r} from revision {self.last_revision + 1}: compacted at revision "
                f"{message.compact_revision} (list again, then watch from its revision + 1)",
                compact_revision=message.compact_revision,
                endpoint=self._etcd.endpoints[self._endpoint],
            )
        if message.kind == "canceled":
            await self._failed(f"canceled by etcd: {message.reason or 'no reason given'}")
        else:
            code = f" (code {message.code})" if message.code is not None else ""
            await self._failed(f"{message.reason}{code}")
        return None

    async def _connect(self) -> None:
        if self._delay:
            await trio.sleep(self._delay * (0.5 + self._rng.random() / 2))
        if self._etcd._closed:
            raise trio.ClosedResourceError("the etcd client is closed")
        endpoint = self._etcd.endpoints[self._endpoint]
        body = codec.watch_request(self.prefix, self._range_end, self.last_revision + 1, prev_kv=self._prev_kv)
        http = self._etcd._http
        request = http.build_request(
            "POST",
            endpoint + "/v3/watch",
            json=body,
            # a member without a leader fails the watch instead of keeping it open and silent
            headers={"Grpc-Metadata-hasleader": "true"},
            timeout=httpx.Timeout(self._etcd.timeout, read=None),  # a stream: waits between messages
        )
        try:
            response = await http.send(request, stream=True)
        except httpx.TransportError as e:
            await self._failed(f"cannot open a watch ({type(e).__name__}: {e})")
            return
        self._response, self._chunks = response, _chunks(response)
        if response.status_code != 200:
            await self._failed(f"HTTP {response.status_code}")

    async def _next_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end > MAX_RESPONSE or (end < 0 and len(self._buffer) > MAX_RESPONSE):
                raise EtcdError(f"a watch message larger than {MAX_RESPONSE} bytes: refused")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if line.strip():
                    return line
                continue
            assert self._chunks is not None
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                raise _StreamEnded("the stream ended") from None
            self._buffer += chunk

    async def _failed(self, reason: str) -> None:
        """Give up this stream: the next connect goes to the next member, after the backoff."""
        await self._drop_stream()
        if self._closed:
            return
        self.connected = False
        self.error = f"{self._etcd.endpoints[self._endpoint]}: {reason}"
        self.reconnects += 1
        self._endpoint = (self._endpoint + 1) % len(self._etcd.endpoints)
        self._delay = min(BACKOFF_MAX, self._delay * 2) if self._delay else BACKOFF_FIRST

    async def _drop_stream(self) -> None:
        response, chunks = self._response, self._chunks
        self._response, self._chunks = None, None
        self._buffer.clear()
        if response is not None:
            await _abandon(response, chunks)


class _StreamEnded(Exception):
    pass
