"""For Python apps behind a sidecar: pass the trace on (docs/tracing.md).

The sidecars record a span per hop, but only the app knows that the call it makes to
`item` belongs to the request it got from `gateway`: it must copy the trace headers from
the one to the other, as with Envoy or Linkerd. With this module that is two lines::

    from sidecar.propagation import incoming, outgoing

    incoming(request.headers)                 # when a request arrives (per thread / task)
    client.get("http://item/items/1", headers=outgoing())   # on every call it makes

or, with httpx, once: ``httpx.Client(event_hooks={"request": [add_trace_headers]})``.
The headers are kept in a ``contextvars.ContextVar``, so threads (``http.server``'s
ThreadingHTTPServer) and asyncio or trio tasks each see their own request's.

Any other language does the same by hand: copy ``traceparent``, ``tracestate``, ``b3``
and every ``x-b3-*`` header from the incoming request to the outgoing ones.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Mapping
from typing import Any

from meshlet.headers import DEADLINE_HEADER as _DEADLINE

from .core.tracecontext import is_trace_header

DEADLINE_HEADER = _DEADLINE.decode("ascii")  # the time the caller has left; compared with str names here


def passed_on(name: str) -> bool:
    """Whether a header of the incoming request goes on to the calls: every trace header
    (``traceparent``, ``tracestate``, ``b3``, ``x-b3-*``) and the caller's deadline."""
    return is_trace_header(name.encode("latin-1")) or name.lower() == DEADLINE_HEADER


_current: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "meshlet_trace_headers", default=()
)


def incoming(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
    """Remember the trace headers of the request being handled."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    _current.set(tuple((name.lower(), value) for name, value in items if passed_on(name)))


def outgoing() -> dict[str, str]:
    """The headers to send with a call made while handling that request."""
    return dict(_current.get())


def add_trace_headers(request: Any) -> None:
    """An httpx request event hook: adds ``outgoing()`` to every request the client sends."""
    for name, value in _current.get():
        request.headers[name] = value


__all__ = ["add_trace_headers", "incoming", "outgoing", "passed_on"]
