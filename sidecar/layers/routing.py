"""Outbound: find the destination service of a request and pick one of its endpoints."""

from __future__ import annotations

from ..core import errors
from ..core.balance import RoundRobin
from ..core.config import MeshSnapshot
from ..core.errors import MeshError
from ..core.routing import NotRoutable, destination
from .base import Filter, Request


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
            raise MeshError(errors.NO_ROUTE, f"no service named {service!r} in the mesh")
        request.service = service
        endpoint = balancers[service].pick()
        if endpoint is None:
            raise MeshError(errors.NO_HEALTHY_ENDPOINTS, f"service {service!r} has no healthy endpoint")
        request.endpoint = endpoint
        request.connect_timeout = config.connect_timeout
        request.timeout = config.timeout

    return route
