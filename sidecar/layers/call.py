"""One call through the resilience layer: what its request asked of us, read from its
headers in one pass, and what its attempts share (the replay buffer, the overall
timeout once worked out, whether it went to a fallback service already).

The app's own ``x-meshlet-attempt`` and ``x-meshlet-deadline-ms`` are taken off: each
attempt sends ours (sidecar/layers/attempts.py). The deadline the app passed on is kept:
it caps the overall timeout.
"""

from __future__ import annotations

from meshlet.headers import ATTEMPT_HEADER, DEADLINE_HEADER

from .explain import EXPLAIN_HEADER, REQUEST_ID_HEADER
from .replay import ReplayBuffer


class Call:
    """One request's state across its attempts (and its fallback). The defaults are the
    class's: a call is made with no ``__init__`` to run, and most keep most of them."""

    replay: ReplayBuffer | None = None  # the body kept for another attempt
    fell_back = False  # the request went to a fallback service already
    deadline: float | None = None  # the app passed on the deadline it was given
    timeout: float | None = None  # the overall timeout, once worked out
    explain = False  # the request asked for the one-line summary
    request_id: str | None = None  # the app's x-request-id, if it sent one


# The lengths of the names read here: one set lookup passes over most headers.
_LENGTHS = frozenset(map(len, (DEADLINE_HEADER, ATTEMPT_HEADER, EXPLAIN_HEADER, REQUEST_ID_HEADER)))
_TAKEN_OFF = (DEADLINE_HEADER, ATTEMPT_HEADER, EXPLAIN_HEADER)


def read_call(headers: list[tuple[bytes, bytes]]) -> Call:
    """Take off the attempt and deadline headers the app sent (ours replace them), keeping
    the deadline it passed on; see whether it asks for an explanation, and its request id.
    Of a repeated header, the first (valid) one counts."""
    call = Call()
    take_off = False
    for name, value in headers:
        if len(name) in _LENGTHS:
            lowered = name.lower()
            if lowered == DEADLINE_HEADER:
                if call.deadline is None and value.isdigit() and len(value) < 10:
                    call.deadline = int(value) / 1000
                take_off = True
            elif lowered == ATTEMPT_HEADER:
                take_off = True
            elif lowered == EXPLAIN_HEADER:
                call.explain = take_off = True
            elif lowered == REQUEST_ID_HEADER and call.request_id is None:
                call.request_id = value[:128].decode("latin-1")
    if take_off:  # in place: the request's head keeps its list
        headers[:] = [h for h in headers if h[0].lower() not in _TAKEN_OFF]
    return call


__all__ = ["ATTEMPT_HEADER", "DEADLINE_HEADER", "Call", "read_call"]
