"""Inbound: every request goes to the local app, whatever its Host says, if the
service's AccessPolicy lets its caller in."""

from __future__ import annotations

from collections.abc import Callable

from meshlet.access import AccessTable
from meshlet.headers import DEADLINE_HEADER, SOURCE_HEADER
from meshlet.paths import path_of

from ..core import errors
from ..core.errors import MeshError
from ..core.services import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Endpoint
from .base import Filter, Request
from .grpc import cap, pass_on
from .routing import normalised


def to_local_app(
    app: Endpoint,
    local_service: str,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> Filter:
    """Inbound: the destination is always the local app. The caller (``request.source``) is
    what the connection proved (sidecar/net/inbound.py: a verified certificate's service, or
    ``unauthenticated``); an ``x-meshlet-source`` header claims nothing and is dropped, so
    the app never reads a claimed identity either."""

    def handle(request: Request) -> None:
        request.service = local_service
        request.endpoint = app
        request.connect_timeout = connect_timeout
        request.timeout = timeout
        headers = request.head.headers
        claimed = False
        for name, value in headers:
            size = len(name)
            if size == 16 and name.lower() == SOURCE_HEADER:
                claimed = True
            elif size == 21 and name.lower() == DEADLINE_HEADER and value.isdigit() and len(value) < 10:
                # The caller gives up after this long: answering later helps no one. The
                # header stays, for an app that passes deadlines on.
                left = int(value) / 1000
                if left < request.timeout:
                    request.timeout = left
        grpc = request.grpc
        if grpc is not None:  # a gRPC call: its grpc-timeout too, passed on to the app reduced
            request.timeout = cap(grpc, request.timeout)
            pass_on(grpc, headers, request.timeout)
        if claimed:  # rare: only a client that writes it itself
            headers[:] = [(n, v) for n, v in headers if not (len(n) == 16 and n.lower() == SOURCE_HEADER)]
        request.target = normalised(request.head.target)  # what the access check sees is what the app gets

    return handle


def access_check(
    table: AccessTable | None, shadow: AccessTable | None, on_shadow: Callable[[str, str, str, str], None]
) -> Filter | None:
    """The service's AccessPolicy (meshlet/access.py): enforced by ``table`` (403
    ``forbidden``), only counted by ``shadow`` (``on_shadow(policy, source, rule, verdict)``).
    None when the service has neither: nothing to do per request."""
    if table is None and shadow is None:
        return None

    def handle(request: Request) -> None:
        head, target = request.head, request.target  # normalised by to_local_app
        if shadow is not None:
            verdict = shadow.check(request.source, head.method, target)
            on_shadow(shadow.name, request.source, verdict.rule, "allow" if verdict.allowed else "deny")
        if table is not None:
            verdict = table.check(request.source, head.method, target)
            if not verdict.allowed:
                path = path_of(target)[:200].decode("latin-1")
                raise MeshError(
                    errors.FORBIDDEN,
                    f"AccessPolicy {table.name!r} does not let {request.source!r} call {table.service!r} "
                    f"({head.method.decode('ascii', 'replace')} {path})",
                )

    return handle


def source_header(local_service: str) -> Filter:
    """Outbound: name the calling service in ``x-meshlet-source``, for sidecars of earlier
    versions, which take the caller from it (this version's inbound takes it from the
    connection and drops the header). One the app wrote itself is dropped."""
    value = local_service.encode()

    def handle(request: Request) -> None:
        headers = request.head.headers
        for i in range(len(headers) - 1, -1, -1):
            name = headers[i][0]
            if len(name) == 16 and name.lower() == SOURCE_HEADER:
                del headers[i]
        headers.append((SOURCE_HEADER, value))

    return handle
