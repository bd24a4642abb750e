"""Outbound: find the destination service of a request and pick one of its endpoints.

A service this sidecar has not heard of may still exist: with a control plane the
sidecar subscribes to the services its app calls on the first call (Linkerd resolves a
destination the same way, Envoy's on-demand discovery too), so the router's
:class:`Undiscovered` is a question for :func:`routing_layer`'s ``discover`` before
it becomes a 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..core import errors
from ..core.balance import RoundRobin
from ..core.config import MeshSnapshot
from ..core.errors import MeshError
from ..core.routing import NotRoutable, destination
from .base import Filter, Handler, Request, Response


class Undiscovered(MeshError):
    """The destination service is not in this snapshot (a 404 unless discovery finds it)."""

    def __init__(self, service: str) -> None:
        super().__init__(errors.NO_ROUTE, f"no service named {service!r} in the mesh")
        self.service = service


# service → the route filter of a snapshot that knows it; raises MeshError otherwise.
Discover = Callable[[str], Awaitable[Filter]]


def router(snapshot: MeshSnapshot, fixed_service: str | None = None) -> Filter:
    """Resolves the destination service and picks an endpoint (a synchronous filter).
    ``fixed_service``: the listener is an explicit upstream port (``--upstream``)."""
    services = snapshot.services
    balancers = {name: RoundRobin(svc.endpoints) for name, svc in services.items()}

    def route(request: Request) -> None:
        if fixed_service is None:
            try:
                service, target, authority = destination(request.head)
            except NotRoutable as exc:
                raise MeshError(errors.NO_ROUTE, str(exc)) from None
            request.target = target
            request.authority = authority
        else:
            service = fixed_service
            request.authority = fixed_service.encode()
        config = services.get(service)
        if config is None:  # not labelled by name: unknown hosts must not grow the metrics
            raise Undiscovered(service)
        request.service = service
        endpoint = balancers[service].pick()
        if endpoint is None:
            raise MeshError(errors.NO_HEALTHY_ENDPOINTS, f"service {service!r} has no healthy endpoint")
        request.endpoint = endpoint
        request.connect_timeout = config.connect_timeout
        request.timeout = config.timeout

    return route


def routing_layer(inner: Handler, route: Filter, then: Filter, discover: Discover | None = None) -> Handler:
    """``route``, then ``then`` (the next synchronous filter), then ``inner``. A
    destination the snapshot lacks is looked up with ``discover`` (when there is a
    control plane to ask) and routed by the snapshot that came with the answer."""

    async def handle(request: Request) -> Response:
        try:
            route(request)
        except Undiscovered as exc:
            if discover is None:
                raise
            (await discover(exc.service))(request)
        then(request)
        return await inner(request)

    return handle
