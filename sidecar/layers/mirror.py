"""Request mirroring (a Route rule's ``mirror``): a copy of the request goes to another
service, fire and forget. The copy's response is read and dropped; its failures are
counted and never reach the caller (Envoy's request mirror policy).

The copy carries the same method, target (after the rule's rewrite) and headers, with
the Host suffixed ``-shadow`` so the receiving app can tell copies apart, as Envoy does.
A request body is copied as the request streams through (a tee on its body source, no
extra read of the client): up to ``MIRROR_BODY_LIMIT``; the copy is sent once the body
ended, with a Content-Length. A larger body, or one that never completes, is not mirrored
(counted ``skipped-body``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from typing import Any

import trio

from ..core.balance import RoundRobin
from ..core.config import MeshSnapshot, empty_snapshot
from ..core.errors import MeshError
from ..net.io import Closed
from ..telemetry import Telemetry
from .base import WOULD_BLOCK, Handler, Request

log = logging.getLogger("meshlet.mirror")


class Mirror:
    def __init__(self, forwarder: Handler, telemetry: Telemetry, rng: random.Random | None = None) -> None:
        self.forwarder = forwarder
        self.telemetry = telemetry
        self.rng = rng or random.Random()
        self.spawn: Callable[..., None] | None = None  # a nursery's start_soon, once the sidecar serves
        self._snapshot: MeshSnapshot = empty_snapshot()
        self._balancers: dict[str, RoundRobin] = {}

    def use(self, snapshot: MeshSnapshot) -> None:
        self._snapshot = snapshot
        self._balancers = {}

    def __call__(self, request: Request, spec: Any) -> None:
        """Maybe mirror ``request`` (``spec``: the rule's mirror: service, percent)."""
        if self.rng.random() * 100 >= spec.percent:
            return
        service = spec.service
        if request.head.upgrade is not None:
            self.telemetry.mirror_finished(service, "skipped-body")
            return
        config = self._snapshot.services.get(service)
        balancer = self._balancers.get(service)
        if balancer is None and config is not None:
            balancer = self._balancers[service] = RoundRobin(config.endpoints)
        endpoint = balancer.pick() if balancer is not None else None
        if config is None or endpoint is None or self.spawn is None:
            self.telemetry.mirror_finished(service, "no-endpoint")
            return
        head = request.head
        copy = Request(
            dataclasses.replace(head, headers=list(head.headers), upgrade=None, expect_continue=False),
            None,
            request.peer_ip,
        )
        copy.service = service
        copy.endpoint = endpoint
        copy.target = request.target
        copy.authority = (request.authority or service.encode()).split(b":")[0] + b"-shadow"
        copy.connect_timeout = config.connect_timeout
        copy.timeout = config.timeout
        if request.body is None:
            self.spawn(self._send, copy)
            return
        spawn = self.spawn

        def body_read(body: bytes | None) -> None:  # called once, when the caller's body ended
            if body is None:
                self.telemetry.mirror_finished(service, "skipped-body")
                return
            copy.head = dataclasses.replace(copy.head, chunked=False, content_length=len(body))
            copy.body = _Bytes(body)
            spawn(self._send, copy)

        request.body = _Tee(request.body, body_read)

    async def _send(self, copy: Request) -> None:
        outcome = "failed"
        with trio.move_on_after(copy.timeout):
            try:
                outcome = await self._exchange(copy)
            except (MeshError, Closed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                outcome = "failed"
            except BaseExceptionGroup as group:  # from the body pump's nursery
                if group.subgroup(trio.Cancelled) is not None:
                    raise  # the timeout (or the sidecar stopping): the cancel scope takes it
                outcome = "failed"
            except Exception:  # a bug of ours must not take the sidecar down for a copy
                log.exception("mirroring to %s failed", copy.service)
                outcome = "failed"
        self.telemetry.mirror_finished(copy.service, outcome)

    async def _exchange(self, copy: Request) -> str:
        """Send the copy, read and drop its response; its outcome for the metrics."""
        async with trio.open_nursery() as nursery:
            copy.nursery = nursery  # the forwarder pumps a request body from here
            response = await self.forwarder(copy)
            complete = False
            try:
                if response.body is not None:
                    while await response.body.read() is not None:
                        pass
                complete = True
            finally:
                response.finish(complete)
        return response.mesh_error or f"{response.status // 100}xx"


MIRROR_BODY_LIMIT = 1024 * 1024  # bytes of a request body kept for its mirrored copy


class _Tee:
    """A body source that passes everything through and keeps a copy (up to the limit);
    ``done(bytes)`` when the body ended whole and small enough, ``done(None)`` if not."""

    __slots__ = ("inner", "done", "pieces", "size")

    def __init__(self, inner: Any, done: Callable[[bytes | None], None]) -> None:
        self.inner = inner
        self.done: Callable[[bytes | None], None] | None = done
        self.pieces: list[bytes] | None = []
        self.size = 0

    def _seen(self, data: Any) -> Any:
        if data is None:
            if self.done is not None:
                done, self.done = self.done, None
                done(None if self.pieces is None else b"".join(self.pieces))
        elif data is not WOULD_BLOCK and self.pieces is not None:
            self.size += len(data)
            if self.size > MIRROR_BODY_LIMIT:
                self.pieces = None
            else:
                self.pieces.append(data)
        return data

    async def read(self) -> bytes | None:
        return self._seen(await self.inner.read())  # type: ignore[no-any-return]

    def read_nowait(self) -> Any:
        return self._seen(self.inner.read_nowait())


class _Bytes:
    """A whole body, already in memory."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    async def read(self) -> bytes | None:
        data, self.data = self.data, None
        return data or None

    def read_nowait(self) -> bytes | None:
        data, self.data = self.data, None
        return data or None
