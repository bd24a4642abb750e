"""Outbound: find the destination service of a request (and the subset of its endpoints
a Route rule asks for); sidecar/layers/resilience.py then picks the endpoint.

A service this sidecar has not heard of may still exist: with a control plane the
sidecar subscribes to the services its app calls on the first call (Linkerd resolves a
destination the same way, Envoy's on-demand discovery too), so the router's
:class:`Undiscovered` is a question for :func:`routing_layer`'s ``discover`` before
it becomes a 404.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from meshlet.headers import FAULT_HEADER
from meshlet.paths import BadPath, normalise_target
from meshlet.routes import RouteTable, change_headers

from ..core import errors
from ..core.config import MeshSnapshot
from ..core.errors import MeshError, policy_response
from ..core.headers import VIA_VALUE
from ..core.routing import NotRoutable, destination
from .base import Filter, Handler, Request, Response

if TYPE_CHECKING:  # the schema is not imported at run time (the sidecar starts without pydantic)
    from meshlet.schema import Fault, Mirror


class Undiscovered(MeshError):
    """The destination service is not in this snapshot (a 404 unless discovery finds it)."""

    def __init__(self, service: str) -> None:
        super().__init__(errors.NO_ROUTE, f"no service named {service!r} in the mesh")
        self.service = service


# service → the route filter of a snapshot that knows it; raises MeshError otherwise.
Discover = Callable[[str], Awaitable[Filter]]


class Respond(Exception):
    """A rule answers the request itself: a redirect, a direct response, an injected fault."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _policy(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Respond:
    response = Response(status, b"", [])
    response.raw = policy_response(status, headers, body)
    return Respond(response)


def router(
    snapshot: MeshSnapshot, fixed_service: str | None = None, on_shadow: Callable[[str, str, str], None] | None = None
) -> Filter:
    """Resolves the destination service, and the subset a rule asks for (a synchronous filter).
    ``fixed_service``: the listener is an explicit upstream port (``--upstream``).
    A host with a Route policy goes through its rules first (meshlet/routes.py); a
    Route in shadow mode is only asked what it would do (``on_shadow(route, rule, decision)``)."""
    services = snapshot.services
    routes = snapshot.routes
    shadow = snapshot.shadow_routes if on_shadow is not None else None

    def route(request: Request) -> None:
        # Routing (again, after a discovery) starts from the request as it came.
        if request.service:  # transparent mode: the listener knew the service by the address dialled
            service = request.service
            if _came_back(request.head.headers):
                raise MeshError(
                    errors.LOOP_DETECTED,
                    f"this request to {service} already went through a meshlet sidecar and was redirected back: "
                    "the iptables rules do not exempt the sidecar's own traffic (run the sidecar as the "
                    "--proxy-uid given to meshlet init-iptables, 1337 by default)",
                )
            target = request.head.target
        elif fixed_service is None:
            try:
                service, target, authority = destination(request.head)
            except NotRoutable as exc:
                raise MeshError(errors.NO_ROUTE, str(exc)) from None
            request.authority = authority
        else:
            service = fixed_service
            target = request.head.target
            request.authority = fixed_service.encode()
        request.target = normalised(target)  # what the rules match is what the upstream gets
        labels: tuple[tuple[str, str], ...] = ()
        if shadow:
            table = shadow.get(service)
            if table is not None:
                _count_shadow(request, table, on_shadow)  # type: ignore[arg-type]
        if routes:
            table = routes.get(service)
            if table is not None:
                service, labels = _by_rule(request, table)
        config = services.get(service)
        if config is None:  # not labelled by name: unknown hosts must not grow the metrics
            raise Undiscovered(service)
        request.service = service
        request.subset = labels  # the endpoint is picked by the resilience layer
        request.connect_timeout = config.connect_timeout
        rule = request.rule
        request.timeout = rule.rule.timeout if rule is not None and rule.rule.timeout is not None else config.timeout

    return route


def normalised(target: bytes) -> bytes:
    """The target with its path normalised (meshlet/paths.py); 400 ``bad-request``
    when it cannot be normalised safely."""
    try:
        return normalise_target(target)
    except BadPath as exc:
        shown = target.partition(b"?")[0][:200].decode("latin-1")
        raise MeshError(errors.BAD_REQUEST, f"the path {shown!r} is refused: it has {exc}") from None


def _came_back(headers: list[tuple[bytes, bytes]]) -> bool:
    """A ``via`` naming meshlet on a request from the app: apps do not add one, the
    outbound sidecar does (docs/architecture.md), so the request is one of ours, back again."""
    for name, value in headers:
        if len(name) == 3 and name.lower() == b"via" and VIA_VALUE in value:
            return True
    return False


def _count_shadow(request: Request, table: RouteTable, on_shadow: Callable[[str, str, str], None]) -> None:
    """What a shadow Route would do with this request; nothing about the request changes."""
    rule = table.match(request.head.method, request.target, request.head.headers)
    if rule is None:
        on_shadow(table.name, "", "no-route")
        return
    spec = rule.rule
    if spec.redirect is not None:
        decision = f"redirect {spec.redirect.status}"
    elif spec.direct_response is not None:
        decision = f"direct {spec.direct_response.status}"
    else:
        target = rule.pick()
        decision = target.service + "".join(f",{k}={v}" for k, v in target.subset)
    on_shadow(table.name, rule.name, decision)


def _by_rule(request: Request, table: RouteTable) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Match ``table``'s rules; apply the rule's request changes; → (service, subset)."""
    head = request.head
    rule = table.match(head.method, request.target, head.headers)
    if rule is None:
        path = request.target.partition(b"?")[0].decode("latin-1")
        raise MeshError(errors.NO_ROUTE, f"no rule of route {table.name!r} matches {head.method.decode()} {path}")
    request.rule = rule
    spec = rule.rule
    if spec.redirect is not None:
        raise _policy(spec.redirect.status, [(b"location", spec.redirect.location.encode("latin-1"))], b"")
    if spec.direct_response is not None:
        answer = spec.direct_response
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
        raise _policy(answer.status, headers, answer.body.encode())
    if rule.request_drop:
        change_headers(head.headers, rule.request_set, rule.request_drop)
    if spec.rewrite is not None:
        request.target = rule.rewrite(request.target)
    target = rule.pick()
    return target.service, target.subset


def routing_layer(
    inner: Handler,
    route: Filter,
    then: Filter,
    discover: Discover | None = None,
    rng: random.Random | None = None,
    mirror: Callable[[Request, Mirror, Discover | None], None] | None = None,
) -> Handler:
    """``route``, then ``then`` (the next synchronous filter), then ``inner``. A
    destination the snapshot lacks is looked up with ``discover`` (when there is a
    control plane to ask) and routed by the snapshot that came with the answer. A
    matched rule's fault injection and response header changes happen here."""
    rng = rng or random.Random()

    async def handle(request: Request) -> Response:
        try:
            try:
                route(request)
            except Undiscovered as exc:
                if discover is None:
                    raise
                (await discover(exc.service))(request)  # routes again, from the request's head
        except Respond as answer:
            return answer.response
        rule = request.rule
        if rule is not None:
            spec = rule.rule
            if spec.fault is not None:
                faulted = await _fault(spec.fault, rng)
                if faulted is not None:
                    return faulted
            if spec.mirror is not None and mirror is not None:
                mirror(request, spec.mirror, discover)  # a target not watched yet is looked up
        then(request)
        response = await inner(request)
        if rule is not None and rule.response_drop and response.raw is None:
            change_headers(response.headers, rule.response_set, rule.response_drop)
        return response

    return handle


async def _fault(fault: Fault, rng: random.Random) -> Response | None:
    """Fault injection (delay, abort) by percent, as Envoy's fault filter."""
    if fault.delay is not None and rng.random() * 100 < fault.delay.percent:
        await trio.sleep(fault.delay.duration)
    if fault.abort is not None and rng.random() * 100 < fault.abort.percent:
        return _policy(fault.abort.status, [(FAULT_HEADER, b"abort")], b"fault injected\n").response
    return None
