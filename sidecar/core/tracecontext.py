"""Trace headers: read the incoming trace context, start a span, write the outgoing headers. Pure.

Called per request by the sidecars (docs/tracing.md): ``extract`` the caller's context from the
request head, make this hop's span with ``child``, then ``strip`` the trace headers and add what
``inject`` writes. No I/O, no clock; ids come from the ``random.Random`` the caller passes in.

Formats read (headers are ``(name, value)`` bytes pairs in arrival order; names compare
case-insensitively; a value's surrounding spaces and tabs are not part of it, RFC 9110 §5.5):

* W3C ``traceparent`` (Trace Context §3.2): ``{version}-{trace-id}-{parent-id}-{flags}``, all
  lower-case hex (upper case is invalid), 2-32-16-2 digits. Version ``ff`` is invalid. Version
  ``00`` is exactly those four fields; a higher version is parsed for its first four fields and
  whatever follows a ``-`` after the flags is ignored (§3.2.4, forward compatibility), but
  anything else after the flags (``01.x``) is invalid. All-zero trace-id or parent-id is
  invalid. Flag 0x01 is ``sampled``; the other bits are not propagated. Two ``traceparent``
  fields make the header invalid (combined, they are no traceparent; the W3C test suite's
  ``test_traceparent_duplicated`` expects a new trace).
* W3C ``tracestate`` (§3.3) is read only with a valid ``traceparent`` that is used (§3.3.1:
  never parse tracestate when traceparent failed). Its fields are joined with ``,``, empty
  fields dropped (§3.3.1.1: accept empty headers, avoid sending them); nothing else is changed.
* B3 multi (openzipkin/b3-propagation): ``x-b3-traceid`` (16 or 32 lower hex),
  ``x-b3-spanid`` (16), optional ``x-b3-parentspanid`` (16), ``x-b3-sampled`` ``1``/``0``
  (also ``true``/``false``, which the spec lets a lenient reader accept; absent = defer), and
  ``x-b3-flags: 1`` = debug, which implies accept (any other flags value is not debug, as
  Brave reads it). When a header repeats, the first value wins (spec: "the first value wins").
  Sampling alone, without ids (``x-b3-sampled: 0``), is a decision without ids.
* B3 single ``b3``: ``{trace}-{span}[-{sampling}[-{parent}]]`` with sampling ``1``, ``0`` or
  ``d`` (debug), or the sampling state alone (``b3: 0``: deny, no ids). First value wins.

Which one is used, when several are present: a valid W3C ``traceparent`` first (Linkerd prefers
W3C and, when both are present, propagates only W3C; it is the standard every OpenTelemetry
SDK speaks), then B3 single, then B3 multi (the B3 spec: "the single-header variant takes
precedence over the multiple header one"). A format that is malformed (wrong length, upper
case, not hex, all-zero ids, an unknown sampling value, too many fields) is ignored as a whole
and the next one is tried: never an error, never a 4xx; with nothing usable, a new trace starts.

A context that is only a sampling decision (``b3: 0``, ``b3: d``, ``x-b3-sampled: 1`` without
ids) has empty ``trace_id``/``trace_id_b3``/``span_id`` (``has_ids`` is false); ``child`` turns it
into a new trace that keeps the decision. W3C cannot carry a decision without ids, so ``inject``
writes no ``traceparent`` for one.

A new span (``child``): the parent's trace id and decision, a new 64-bit span id (never zero)
and the parent's span id as ``parent_id``, which the B3 output always carries (Zipkin places
the span with it). Without a parent: a 128-bit trace id and the decision ``rng.random() <
sample_rate``; a parent that defers gets its decision the same way here (B3: "defer" means the
receiver decides); debug stays sampled. Because the span id changes, ``tracestate`` is limited
as §3.3.1.5 says (we add no entry of our own): list-members that are empty or invalid (§3.3.1.3
grammar) or repeat an earlier key are dropped (the test suite's own parser keeps the first of a
duplicated key), at most the first 32 are kept, and while the header is longer than 512
characters members longer than 128 are removed first, then members from the end.
(The W3C test suite at its optional strict level 2 expects such a tracestate to be dropped
whole; we keep what is valid.) ``inject`` on an extracted context, without ``child``, writes
tracestate exactly as received (§3.5: an unchanged traceparent keeps tracestate untouched).

Writing (``inject``): ``w3c`` writes ``traceparent: 00-...`` (we only know version 00; flags
``01`` when sampled or debug) and ``tracestate`` when there is one; ``b3`` writes the multi
headers with ``x-b3-parentspanid`` whenever there is a parent, and ``x-b3-flags: 1`` instead of
``x-b3-sampled`` for debug (the spec: don't send both); ``b3single`` writes ``b3``. A B3
trace id keeps the length it came with (16 or 32); W3C and Zipkin get it left-padded to 32.
Names are written lower case (what the B3 spec asks for case-sensitive transports, and HTTP/2).

Cost: ``extract`` is one pass over the header list that looks at a name only when its length is
one of the trace headers' lengths; with no trace header it allocates nothing and returns None.
The patterns are compiled at import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import random

FORMATS = frozenset({"w3c", "b3", "b3single"})
DEFAULT_FORMATS = ("w3c", "b3")  # docs/tracing.md: W3C and B3 multi unless MeshConfig says otherwise

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"
B3_PARENT_SPAN_ID = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"

# Slots of the headers we read, by lower-case name.
_TP, _TS, _B3, _TRACE, _SPAN, _PARENT, _SAMPLED, _FLAGS = range(8)
_SLOTS: dict[bytes, int] = {
    TRACEPARENT: _TP,
    TRACESTATE: _TS,
    B3: _B3,
    B3_TRACE_ID: _TRACE,
    B3_SPAN_ID: _SPAN,
    B3_PARENT_SPAN_ID: _PARENT,
    B3_SAMPLED: _SAMPLED,
    B3_FLAGS: _FLAGS,
}
_LENGTHS = frozenset(len(name) for name in _SLOTS)  # 2, 10, 11, 12, 17: most names are skipped unread
_STRIP_FIRST = frozenset(b"tTbBxX")  # first bytes of every name ``strip`` removes
_WHOLE_NAMES = frozenset((TRACEPARENT, TRACESTATE, B3))  # and every name that starts x-b3-

_OWS = b" \t"
_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_TRACEPARENT_00_RE = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # the usual case, sliced
_TRACE_ID_RE = re.compile(rb"[0-9a-f]{16}(?:[0-9a-f]{16})?")
_SPAN_ID_RE = re.compile(rb"[0-9a-f]{16}")
_ZERO_TRACE_ID = b"0" * 32
_ZERO_SPAN_ID = b"0" * 16
_ODD_HEX = frozenset(b"13579bdf")  # a flags byte whose last hex digit is odd has bit 0x01 (sampled)
_PAD = "0" * 16

# tracestate list-member (W3C Trace Context §3.3.1.3): key "=" value.
_TS_KEY = r"[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
_TS_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TS_MEMBER_RE = re.compile(f"({_TS_KEY})={_TS_VALUE}")
TRACESTATE_MAX_MEMBERS = 32
TRACESTATE_MAX_LENGTH = 512
TRACESTATE_LONG_MEMBER = 128

# Sampling values: (sampled, debug).
_SINGLE_SAMPLING: dict[bytes, tuple[bool, bool]] = {b"0": (False, False), b"1": (True, False), b"d": (True, True)}
_MULTI_SAMPLED: dict[bytes, bool] = {b"1": True, b"0": False, b"true": True, b"false": False}


class TraceContext(NamedTuple):
    """One span's place in a trace, and the trace's sampling decision.

    ``trace_id``: 32 lower hex (W3C, Zipkin); ``trace_id_b3``: the same id as B3 received it
    (16 or 32 hex; 16 is ``trace_id`` without its 16 leading zeros). ``span_id``: 16 hex.
    ``sampled``: None = defer (B3 only). ``debug`` implies ``sampled``. A decision without ids
    (``b3: 0``) has the three ids empty. (A NamedTuple: made twice per traced request and
    hop, and a frozen dataclass costs five times as much to build.)"""

    trace_id: str
    trace_id_b3: str
    span_id: str
    parent_id: str | None = None
    sampled: bool | None = None
    debug: bool = False
    tracestate: str | None = None

    @property
    def has_ids(self) -> bool:
        return bool(self.span_id)


def extract(headers: Iterable[tuple[bytes, bytes]]) -> TraceContext | None:
    """The caller's context, from the first usable format (W3C, B3 single, B3 multi), or None."""
    found: list[tuple[int, bytes]] | None = None
    for name, value in headers:
        if len(name) not in _LENGTHS:
            continue
        slot = _SLOTS.get(name.lower())
        if slot is not None:
            if found is None:
                found = []
            found.append((slot, value.strip(_OWS)))
    if found is None:
        return None

    first: list[bytes | None] = [None] * 8
    traceparents = 0
    for slot, value in found:
        if slot == _TP:
            traceparents += 1
        if first[slot] is None:
            first[slot] = value
    traceparent = first[_TP]
    if traceparents == 1 and traceparent is not None:
        ctx = _from_traceparent(traceparent, [value for slot, value in found if slot == _TS])
        if ctx is not None:
            return ctx
    b3 = first[_B3]
    if b3 is not None:
        ctx = _from_b3_single(b3)
        if ctx is not None:
            return ctx
    return _from_b3_multi(first[_TRACE], first[_SPAN], first[_PARENT], first[_SAMPLED], first[_FLAGS])


def _from_traceparent(value: bytes, tracestates: list[bytes]) -> TraceContext | None:
    if len(value) == 55 and _TRACEPARENT_00_RE.fullmatch(value) is not None:  # version 00: no groups to make
        trace_id, span_id = value[3:35], value[36:52]
        if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
            return None
        trace = trace_id.decode("ascii")
        tracestate = (
            (b",".join(field for field in tracestates if field).decode("latin-1") or None) if tracestates else None
        )
        return TraceContext(trace, trace, span_id.decode("ascii"), None, value[54] in _ODD_HEX, False, tracestate)
    match = _TRACEPARENT_RE.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    tracestate = b",".join(field for field in tracestates if field).decode("latin-1") or None
    trace = trace_id.decode("ascii")
    return TraceContext(trace, trace, span_id.decode("ascii"), None, bool(int(flags, 16) & 1), False, tracestate)


def _from_b3_single(value: bytes) -> TraceContext | None:
    fields = value.split(b"-")
    if len(fields) == 1:
        decision = _SINGLE_SAMPLING.get(value)
        return None if decision is None else TraceContext("", "", "", None, decision[0], decision[1])
    if len(fields) > 4:
        return None
    sampled: bool | None = None
    debug = False
    if len(fields) >= 3:
        decision = _SINGLE_SAMPLING.get(fields[2])
        if decision is None:
            return None
        sampled, debug = decision
    return _with_ids(fields[0], fields[1], fields[3] if len(fields) == 4 else None, sampled, debug)


def _from_b3_multi(
    trace_id: bytes | None, span_id: bytes | None, parent: bytes | None, sampled: bytes | None, flags: bytes | None
) -> TraceContext | None:
    decision: bool | None = None
    if sampled is not None:
        decision = _MULTI_SAMPLED.get(sampled)
        if decision is None:
            return None
    debug = flags == b"1"
    if debug:
        decision = True
    if trace_id is None and span_id is None and parent is None:
        return None if decision is None else TraceContext("", "", "", None, decision, debug)
    if trace_id is None or span_id is None:
        return None
    return _with_ids(trace_id, span_id, parent, decision, debug)


def _with_ids(
    trace_id: bytes, span_id: bytes, parent: bytes | None, sampled: bool | None, debug: bool
) -> TraceContext | None:
    if _TRACE_ID_RE.fullmatch(trace_id) is None or not trace_id.strip(b"0"):
        return None
    if _SPAN_ID_RE.fullmatch(span_id) is None or span_id == _ZERO_SPAN_ID:
        return None
    if parent is not None and (_SPAN_ID_RE.fullmatch(parent) is None or parent == _ZERO_SPAN_ID):
        return None
    b3 = trace_id.decode("ascii")
    return TraceContext(
        b3 if len(b3) == 32 else _PAD + b3,
        b3,
        span_id.decode("ascii"),
        None if parent is None else parent.decode("ascii"),
        sampled,
        debug,
    )


def child(parent: TraceContext | None, rng: random.Random, sample_rate: float) -> TraceContext:
    """This hop's span: under ``parent``, or the root of a new trace (see the module docstring)."""
    span_id = _span_id(rng)
    if parent is None or not parent.has_ids:
        trace_id = _trace_id(rng)
        if parent is None or parent.sampled is None:
            return TraceContext(trace_id, trace_id, span_id, None, rng.random() < sample_rate)
        return TraceContext(trace_id, trace_id, span_id, None, parent.sampled or parent.debug, parent.debug)
    sampled = parent.sampled
    if sampled is None:
        sampled = rng.random() < sample_rate
    return TraceContext(
        parent.trace_id,
        parent.trace_id_b3,
        span_id,
        parent.span_id,
        sampled or parent.debug,
        parent.debug,
        limit_tracestate(parent.tracestate),
    )


def _span_id(rng: random.Random) -> str:
    n = rng.getrandbits(64)
    while not n:  # all-zero ids are invalid in W3C and B3: draw again
        n = rng.getrandbits(64)
    return f"{n:016x}"


def _trace_id(rng: random.Random) -> str:
    n = rng.getrandbits(128)
    while not n:
        n = rng.getrandbits(128)
    return f"{n:032x}"


def limit_tracestate(tracestate: str | None) -> str | None:
    """``tracestate`` within the W3C limits (§3.3.1.5), for a hop that writes a new traceparent:
    valid, non-empty list-members, the first of each key, at most 32, at most 512 characters
    (members over 128 characters removed first, from the end; then members from the end)."""
    if not tracestate:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for part in tracestate.split(","):
        member = part.strip(" \t")
        match = _TS_MEMBER_RE.fullmatch(member)
        if match is None:
            continue  # empty or invalid
        key = match.group(1)
        if key in keys:
            continue
        keys.add(key)
        members.append(member)
        if len(members) == TRACESTATE_MAX_MEMBERS:
            break
    length = sum(len(member) for member in members) + len(members) - 1
    if length > TRACESTATE_MAX_LENGTH:
        for i in range(len(members) - 1, -1, -1):
            if length <= TRACESTATE_MAX_LENGTH:
                break
            if len(members[i]) > TRACESTATE_LONG_MEMBER:
                length -= len(members.pop(i)) + 1
        while length > TRACESTATE_MAX_LENGTH:
            length -= len(members.pop()) + 1
    return ",".join(members) or None


def inject(ctx: TraceContext, formats: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """The headers that carry ``ctx`` in ``formats`` (``w3c``, ``b3`` (multi), ``b3single``)."""
    headers: list[tuple[bytes, bytes]] = []
    done: list[str] = []
    trace_id, span_id, parent_id, sampled, debug = ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled, ctx.debug
    for fmt in formats:
        if fmt in done:
            continue
        done.append(fmt)
        if fmt == "w3c":
            if span_id:
                flags = "01" if sampled or debug else "00"
                headers.append((TRACEPARENT, f"00-{trace_id}-{span_id}-{flags}".encode()))
                if ctx.tracestate:
                    headers.append((TRACESTATE, ctx.tracestate.encode("latin-1")))
        elif fmt == "b3":
            if span_id:
                headers.append((B3_TRACE_ID, ctx.trace_id_b3.encode()))
                headers.append((B3_SPAN_ID, span_id.encode()))
                if parent_id is not None:
                    headers.append((B3_PARENT_SPAN_ID, parent_id.encode()))
            if debug:
                headers.append((B3_FLAGS, b"1"))
            elif sampled is not None:
                headers.append((B3_SAMPLED, b"1" if sampled else b"0"))
        elif fmt == "b3single":
            value = _b3_single(ctx)
            if value is not None:
                headers.append((B3, value))
        else:
            raise ValueError(f"unknown trace header format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    return headers


def _b3_single(ctx: TraceContext) -> bytes | None:
    sampling = "d" if ctx.debug else None if ctx.sampled is None else "1" if ctx.sampled else "0"
    if not ctx.has_ids:
        return None if sampling is None else sampling.encode("ascii")
    value = f"{ctx.trace_id_b3}-{ctx.span_id}"
    if sampling is not None:  # the parent is the 4th field: it needs the 3rd
        value += f"-{sampling}"
        if ctx.parent_id is not None:
            value += f"-{ctx.parent_id}"
    return value.encode("ascii")


def is_trace_header(name: bytes) -> bool:
    """A header of any trace format: ``traceparent``, ``tracestate``, ``b3``, ``x-b3-*``."""
    if not name or name[0] not in _STRIP_FIRST:
        return False
    lower = name.lower()
    return lower in _WHOLE_NAMES or lower[:5] == b"x-b3-"


def strip(headers: list[tuple[bytes, bytes]]) -> None:
    """Remove, in place, every trace header of every format, so that ``inject`` replaces them."""
    first = _STRIP_FIRST
    for i, (name, _) in enumerate(headers):  # noqa: B007 - i is where the trace headers start
        if name and name[0] in first and is_trace_header(name):
            break
    else:
        return
    headers[i:] = [
        header
        for header in headers[i + 1 :]
        if not (header[0] and header[0][0] in first and is_trace_header(header[0]))
    ]


__all__ = [
    "DEFAULT_FORMATS",
    "FORMATS",
    "TraceContext",
    "child",
    "extract",
    "inject",
    "is_trace_header",
    "limit_tracestate",
    "strip",
]
