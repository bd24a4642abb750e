"""Request mirroring (a Route rule's ``mirror``): a copy of the request goes to another
service, fire and forget. The copy's response is read and dropped; its failures are
counted and never reach the caller (Envoy's request mirror policy).

The copy carries the same method, target (after the rule's rewrite) and headers, with
the Host suffixed ``-shadow`` so the receiving app can tell copies apart, as Envoy does.
Requests with a body are not mirrored (yet): they are counted as ``skipped-body``.
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
from .base import Handler, Request

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
        if request.body is not None or request.head.upgrade is not None:
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
        copy = Request(dataclasses.replace(head, headers=list(head.headers), upgrade=None), None, request.peer_ip)
        copy.service = service
        copy.endpoint = endpoint
        copy.target = request.target
        copy.authority = (request.authority or service.encode()).split(b":")[0] + b"-shadow"
        copy.connect_timeout = config.connect_timeout
        copy.timeout = config.timeout
        self.spawn(self._send, copy)

    async def _send(self, copy: Request) -> None:
        outcome = "failed"
        with trio.move_on_after(copy.timeout):
            try:
                response = await self.forwarder(copy)
                complete = False
                try:
                    if response.body is not None:
                        while await response.body.read() is not None:
                            pass
                    complete = True
                finally:
                    response.finish(complete)
                outcome = str(response.status // 100) + "xx" if not response.mesh_error else response.mesh_error
            except (MeshError, Closed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                outcome = "failed"
            except Exception:  # a bug of ours must not take the sidecar down for a copy
                log.exception("mirroring to %s failed", copy.service)
                outcome = "failed"
        self.telemetry.mirror_finished(copy.service, outcome)
