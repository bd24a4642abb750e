"""Request mirroring (a Route rule's ``mirror``): a copy of the request goes to another
service, fire and forget. The copy's response is read and dropped; its failures are
counted and never reach the caller (Envoy's request mirror policy).

The copy carries the same method, target (after the rule's rewrite) and headers, with
the Host suffixed ``-shadow`` so the receiving app can tell copies apart, as Envoy does.
A request body is copied as the request streams through (a tee on its body source, no
extra read of the client): up to ``MIRROR_BODY_LIMIT``; the copy is sent once the body
ended, with a Content-Length. A larger body, or one that never completes, is not mirrored
(counted ``skipped-body``).

A mirror target this sidecar has not heard of (its app never calls it) is looked up as a
first call would be (``discover``, with a control plane): the copy that found it missing
waits for the answer, then goes; copies meanwhile are not sent (``no-endpoint``), so a
slow lookup holds one copy per target, not a queue of them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from meshlet.io import Closed

from ..core.balance import RoundRobin
from ..core.config import MeshSnapshot, empty_snapshot
from ..core.errors import MeshError
from ..core.services import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Endpoint, ServiceConfig
from ..telemetry import Telemetry
from .base import WOULD_BLOCK, BodyPiece, BodySource, Handler, Request

if TYPE_CHECKING:  # the schema is not imported at run time (the sidecar starts without pydantic)
    from meshlet.schema import Mirror as MirrorSpec

log = logging.getLogger("meshlet.mirror")

Discover = Callable[[str], Awaitable[object]]  # a service → once it is in the installed snapshot


class Mirror:
    def __init__(self, forwarder: Handler, telemetry: Telemetry, rng: random.Random | None = None) -> None:
        self.forwarder = forwarder
        self.telemetry = telemetry
        self.rng = rng or random.Random()
        self.spawn: Callable[..., None] | None = None  # a nursery's start_soon, once the sidecar serves
        self._snapshot: MeshSnapshot = empty_snapshot()
        self._balancers: dict[str, RoundRobin] = {}
        self._looking_up: set[str] = set()  # targets whose lookup a copy is waiting for

    def use(self, snapshot: MeshSnapshot) -> None:
        self._snapshot = snapshot
        self._balancers = {}

    def __call__(self, request: Request, spec: MirrorSpec, discover: Discover | None = None) -> None:
        """Maybe mirror ``request`` (``spec``: the rule's mirror: service, percent);
        ``discover`` looks up a target this sidecar does not know yet."""
        if self.rng.random() * 100 >= spec.percent:
            return
        service = spec.service
        if request.head.upgrade is not None:
            self.telemetry.mirror_finished(service, "skipped-body")
            return
        config = self._snapshot.services.get(service)
        lookup = None
        if config is None:
            if discover is None or service in self._looking_up or self.spawn is None:
                self.telemetry.mirror_finished(service, "no-endpoint")
                return
            lookup = discover  # the copy's task looks it up first
            endpoint = None
        else:
            endpoint = self._pick(service, config)
            if endpoint is None or self.spawn is None:
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
        copy.connect_timeout = config.connect_timeout if config is not None else DEFAULT_CONNECT_TIMEOUT
        copy.timeout = config.timeout if config is not None else DEFAULT_REQUEST_TIMEOUT
        assert self.spawn is not None
        if request.body is None:
            self.spawn(self._send, copy, lookup)
            return
        spawn = self.spawn

        def body_read(body: bytes | None) -> None:  # called once, when the caller's body ended
            if body is None:
                self.telemetry.mirror_finished(service, "skipped-body")
                return
            copy.head = dataclasses.replace(copy.head, chunked=False, content_length=len(body))
            copy.body = _Bytes(body)
            spawn(self._send, copy, lookup)

        request.body = _Tee(request.body, body_read)

    def _pick(self, service: str, config: ServiceConfig) -> Endpoint | None:
        balancer = self._balancers.get(service)
        if balancer is None:
            balancer = self._balancers[service] = RoundRobin(config.endpoints)
        return balancer.pick()

    async def _send(self, copy: Request, lookup: Discover | None = None) -> None:
        if lookup is not None:
            if copy.service in self._looking_up:  # another copy is looking it up
                found = False
            else:
                self._looking_up.add(copy.service)
                try:
                    found = await self._look_up(copy, lookup)
                finally:
                    self._looking_up.discard(copy.service)
            if not found:
                self.telemetry.mirror_finished(copy.service, "no-endpoint")
                return
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

    async def _look_up(self, copy: Request, lookup: Discover) -> bool:
        """Subscribe to the copy's target (as a first call to it would) and pick its endpoint
        from the snapshot that came with the answer; False if there is none."""
        try:
            await lookup(copy.service)
        except MeshError:
            return False  # no such service, or no answer from the control plane in time
        config = self._snapshot.services.get(copy.service)
        if config is None:
            return False
        endpoint = self._pick(copy.service, config)
        if endpoint is None:
            return False
        copy.endpoint = endpoint
        copy.connect_timeout, copy.timeout = config.connect_timeout, config.timeout
        return True

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

    def __init__(self, inner: BodySource, done: Callable[[bytes | None], None]) -> None:
        self.inner = inner
        self.done: Callable[[bytes | None], None] | None = done
        self.pieces: list[bytes] | None = []
        self.size = 0

    def _seen(self, data: BodyPiece) -> None:
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

    async def read(self) -> bytes | None:
        data = await self.inner.read()
        self._seen(data)
        return data

    def read_nowait(self) -> BodyPiece:
        data = self.inner.read_nowait()
        self._seen(data)
        return data


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
