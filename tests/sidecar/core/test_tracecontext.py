"""Trace headers (sidecar/core/tracecontext.py): W3C Trace Context and B3 (single and multi),
read, continued and written; the cases come from the W3C test suite (w3c/trace-context
test/test.py) and the B3 spec (openzipkin/b3-propagation), and OpenTelemetry's propagators
check that what we write is what they read, and the other way round."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace as otel
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.core.tracecontext import (
    DEFAULT_FORMATS,
    TraceContext,
    child,
    extract,
    inject,
    limit_tracestate,
    strip,
)

T32 = "12345678901234567890123456789012"
T16 = "463ac35c9f6413ad"
S = "1234567890123456"
P = "05e3ac9a4f6e3b90"
B3T = "80f198ee56343ba864fe8b2a57d3eff7"
B3S = "e457b5a2e4d86bd1"
HEX32 = re.compile("[0-9a-f]{32}")
HEX16 = re.compile("[0-9a-f]{16}")


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def ids(ctx: TraceContext | None) -> tuple[object, ...] | None:
    if ctx is None:
        return None
    return (ctx.trace_id, ctx.trace_id_b3, ctx.span_id, ctx.parent_id, ctx.sampled, ctx.debug)


def w3c(trace: str = T32, span: str = S, sampled: bool = True, tracestate: str | None = None) -> TraceContext:
    return TraceContext(trace, trace, span, None, sampled, False, tracestate)


def b3(
    trace: str = B3T, span: str = B3S, parent: str | None = None, sampled: bool | None = None, debug: bool = False
) -> TraceContext:
    return TraceContext(trace.rjust(32, "0"), trace, span, parent, sampled, debug)


def decision(sampled: bool, debug: bool = False) -> TraceContext:
    return TraceContext("", "", "", None, sampled, debug)


# --- W3C traceparent -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{T32}-{S}-01", w3c()),
        (f"00-{T32}-{S}-00", w3c(sampled=False)),
        (f"00-{T32}-{S}-03", w3c()),  # sampled + random: only 0x01 is the decision
        (f"00-{T32}-{S}-02", w3c(sampled=False)),
        (f"00-{T32}-{S}-ff", w3c()),
        (f" 00-{T32}-{S}-01", w3c()),  # OWS around the value (test_traceparent_ows_handling)
        (f"\t00-{T32}-{S}-01", w3c()),
        (f"00-{T32}-{S}-01 ", w3c()),
        (f"\t 00-{T32}-{S}-01 \t", w3c()),
        (f"cc-{T32}-{S}-01", w3c()),  # a future version: the four fields we know
        (f"cc-{T32}-{S}-01-what-the-future-will-be-like", w3c()),
        (f"01-{T32}-{S}-00-", w3c(sampled=False)),
        (f"fe-{T32}-{S}-01-x-y", w3c()),
        (f"00-{'0' * 16}{T16}-{S}-01", w3c(trace="0" * 16 + T16)),  # half zeros is not all zeros
    ],
)
def test_a_valid_traceparent_is_read(value: str, expected: TraceContext) -> None:
    assert extract(h(("traceparent", value))) == expected


@pytest.mark.parametrize(
    "value",
    [
        f"ff-{T32}-{S}-01",  # version 255 is invalid
        f"00-{T32}-{S}-01.",  # version 00 has exactly four fields
        f"00-{T32}-{S}-01-what-the-future-will-be-like",
        f"cc-{T32}-{S}-01.what-the-future-will-be-like",  # after the flags: a dash or the end
        f".0-{T32}-{S}-01",
        f"0.-{T32}-{S}-01",
        f"000-{T32}-{S}-01",
        f"0-{T32}-{S}-01",
        f"0A-{T32}-{S}-01",  # upper case version
        f"00-{'0' * 32}-{S}-01",  # all-zero trace id
        f"00-.{T32[1:]}-{S}-01",
        f"00-{T32[:-1]}.-{S}-01",
        f"00-{T32}3-{S}-01",  # 33 digits
        f"00-{T32[:-1]}-{S}-01",  # 31
        f"00-{T32[:-1]}g-{S}-01",  # not hex
        f"00-4BF92F3577B34DA6A3CE929D0E0E4736-{S}-01",  # upper case trace id
        f"00-{T32}-{'0' * 16}-01",  # all-zero parent id
        f"00-{T32}-.{S[1:]}-01",
        f"00-{T32}-{S[:-1]}.-01",
        f"00-{T32}-{S}7-01",  # 17
        f"00-{T32}-{S[:-1]}-01",  # 15
        f"00-{T32}-00F067AA0BA902B7-01",  # upper case parent id
        f"00-{T32}-{S}-.0",
        f"00-{T32}-{S}-0.",
        f"00-{T32}-{S}-001",
        f"00-{T32}-{S}-1",
        f"00-{T32}-{S}-0A",  # upper case flags
        f"00-{T32}-{S}",  # no flags
        f"00_{T32}_{S}_01",
        "",
        f"00-{T32}-{S}-01,00-{T32}-{S}-01",  # combined duplicate fields
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str) -> None:
    assert extract(h(("traceparent", value))) is None
    # ... and its tracestate with it (W3C §3.3.1: never parse tracestate without traceparent)
    assert extract(h(("traceparent", value), ("tracestate", "foo=1"))) is None


@pytest.mark.parametrize("name", ["traceparent", "TraceParent", "TrAcEpArEnT", "TRACEPARENT"])
def test_header_names_compare_case_insensitively(name: str) -> None:
    assert extract(h((name, f"00-{T32}-{S}-01"), ("TraceState", "foo=1"))) == w3c(tracestate="foo=1")


@pytest.mark.parametrize("name", ["trace-parent", "trace.parent", "traceparents", "x-traceparent"])
def test_other_names_are_not_traceparent(name: str) -> None:
    assert extract(h((name, f"00-{T32}-{S}-01"))) is None


def test_two_traceparent_fields_make_it_invalid() -> None:
    # test_traceparent_duplicated: a new trace, not either of the two
    headers = h(("traceparent", f"00-{T32[:-1]}1-{S}-01"), ("traceparent", f"00-{T32}-{S}-01"))
    assert extract(headers) is None
    # ... even the same value twice; then B3, if valid, is used
    headers = h(("traceparent", f"00-{T32}-{S}-01"), ("b3", f"{B3T}-{B3S}-1"), ("traceparent", f"00-{T32}-{S}-01"))
    assert extract(headers) == b3(sampled=True)


def test_no_trace_header_no_context() -> None:
    assert extract([]) is None
    assert extract(h(("host", "item"), ("accept", "*/*"), ("x-request-id", "abc"), ("b3x", "1"))) is None
    assert extract(h(("tracestate", "foo=1"))) is None  # tracestate alone is nothing


# --- W3C tracestate, as received ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "tracestate"),
    [
        (["foo=1,bar=2"], "foo=1,bar=2"),
        (["foo=1,bar=2", "rojo=1,congo=2", "baz=3"], "foo=1,bar=2,rojo=1,congo=2,baz=3"),  # order kept
        ([""], None),  # empty: accepted, not sent on (test_tracestate_empty_header)
        (["foo=1", ""], "foo=1"),
        (["", "foo=1"], "foo=1"),
        ([" \t", ""], None),
        (["foo=1 \t , \t bar=2"], "foo=1 \t , \t bar=2"),  # untouched, inner OWS and all
        (["FOO=1,,foo=1,foo=2"], "FOO=1,,foo=1,foo=2"),  # invalid and duplicated: not ours to fix
    ],
)
def test_tracestate_is_passed_on_as_received(fields: list[str], tracestate: str | None) -> None:
    headers = h(("traceparent", f"00-{T32}-{S}-00"), *(("tracestate", field) for field in fields))
    ctx = extract(headers)
    assert ctx == w3c(sampled=False, tracestate=tracestate)
    written = inject(ctx, ["w3c"])
    assert written == h(("traceparent", f"00-{T32}-{S}-00"), *([("tracestate", tracestate)] if tracestate else []))


def test_tracestate_goes_only_with_the_w3c_context_that_is_used() -> None:
    headers = h(("b3", f"{B3T}-{B3S}-1"), ("tracestate", "foo=1"))
    assert extract(headers) == b3(sampled=True)  # no traceparent: tracestate is dropped
    headers = h(("traceparent", f"00-{'0' * 32}-{S}-01"), ("tracestate", "foo=1"), ("x-b3-sampled", "0"))
    assert extract(headers) == decision(False)


# --- W3C tracestate, limited when we write a new traceparent -------------------------------------

ALL_KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
ALL_VALUE = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))
MEMBERS_32 = ",".join(f"bar{i:02d}={i:02d}" for i in range(1, 33))


@pytest.mark.parametrize(
    ("received", "limited"),
    [
        (None, None),
        ("", None),
        ("foo=1,bar=2", "foo=1,bar=2"),
        ("foo=1 \t , \t bar=2, \t baz=3", "foo=1,bar=2,baz=3"),  # OWS is not part of a member
        ("\t foo=1 \t", "foo=1"),
        ("foo=1,,bar=2, ,", "foo=1,bar=2"),  # empty members dropped
        ("foo=1,foo=2,bar=3", "foo=1,bar=3"),  # a repeated key: the first one
        ("foo =1,bar=2", "bar=2"),  # invalid members dropped, valid ones kept
        ("FOO=1,bar=2", "bar=2"),
        ("foo.bar=1,bar=2", "bar=2"),
        ("foo@=1,bar=2", "bar=2"),
        ("@foo=1,bar=2", "bar=2"),
        ("foo@@bar=1,bar=2", "bar=2"),
        ("foo@bar@baz=1,bar=2", "bar=2"),
        ("foo=bar=baz,bar=2", "bar=2"),
        ("foo=,bar=3", "bar=3"),
        ("foo,bar=3", "bar=3"),
        ("foo=a b,bar=3", "foo=a b,bar=3"),  # inner space is a valid value character
        ("foo=ab ,bar=3", "foo=ab,bar=3"),  # a trailing one is OWS
        ("foo=caf\xe9,bar=3", "bar=3"),  # not printable ASCII
        ("1foo=1,bar=2", "bar=2"),  # a simple key starts with a letter
        ("1foo@sys=1", "1foo@sys=1"),  # a tenant id may start with a digit
        ("foo=1,bar2=2," + "z" * 256 + "=1", "foo=1,bar2=2," + "z" * 256 + "=1"),  # key of 256
        ("foo=1," + "z" * 257 + "=1", "foo=1"),
        ("foo=1," + "t" * 241 + "@" + "v" * 14 + "=1", "foo=1," + "t" * 241 + "@" + "v" * 14 + "=1"),
        ("foo=1," + "t" * 242 + "@v=1", "foo=1"),
        ("foo=1,t@" + "v" * 15 + "=1", "foo=1"),
        (f"foo=1,{ALL_KEY}={ALL_VALUE}", f"foo=1,{ALL_KEY}={ALL_VALUE}"),
        (f"foo=1,{ALL_KEY}@a-z0-9_-*/={ALL_VALUE}", f"foo=1,{ALL_KEY}@a-z0-9_-*/={ALL_VALUE}"),
        ("foo=1,bar=" + "v" * 256, "foo=1,bar=" + "v" * 256),
        ("foo=1,bar=" + "v" * 257, "foo=1"),
        (MEMBERS_32, MEMBERS_32),
        (MEMBERS_32 + ",bar33=33", MEMBERS_32),  # at most 32: the first ones
        ("X=1," + MEMBERS_32 + ",bar33=33", MEMBERS_32),  # 32 valid ones
    ],
)
def test_tracestate_limits_when_the_span_changes(received: str | None, limited: str | None) -> None:
    assert limit_tracestate(received) == limited
    ctx = child(w3c(tracestate=received), random.Random(1), 1.0)
    assert ctx.tracestate == limited


def member(key: str, length: int) -> str:
    return f"{key}={'v' * (length - len(key) - 1)}"


def test_a_long_tracestate_loses_its_long_members_first_then_members_from_the_end() -> None:
    short = [member(f"k{i}", 100) for i in range(4)]  # 4 * 100 + 3 commas = 403
    long = member("long", 129)
    # 403 + 130 = 533 > 512: the member over 128 characters goes, wherever it is
    assert limit_tracestate(",".join([short[0], long, *short[1:]])) == ",".join(short)
    # no long one: from the end
    six = [member(f"k{i}", 100) for i in range(6)]  # 605
    assert limit_tracestate(",".join(six)) == ",".join(six[:5])  # 504
    # two long ones, one removal enough: the last long one goes, the first stays
    first_long, last_long = member("a", 129), member("b", 129)
    kept = [member("k0", 100), first_long, member("k1", 100), last_long, member("k2", 100)]  # 562
    assert limit_tracestate(",".join(kept)) == ",".join(kept[:3] + kept[4:])  # 432
    # long ones all gone and still too long: then from the end
    many = [member(f"k{i}", 120) for i in range(5)]  # 604
    assert limit_tracestate(",".join([*many[:2], long, *many[2:]])) == ",".join(many[:4])  # 483
    # exactly 512 stays
    exact = [member(f"k{i}", 101) for i in range(4)] + [member("z", 104)]  # 404 + 104 + 4 = 512
    assert limit_tracestate(",".join(exact)) == ",".join(exact)
    assert len(",".join(exact)) == 512
    # one member of 513 characters (key 256, value 256)
    assert limit_tracestate("z" * 256 + "=" + "v" * 256) is None


# --- B3 multi ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("X-B3-TraceId", B3T), ("X-B3-SpanId", B3S)], b3()),  # no sampled: defer
        ([("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "1")], b3(sampled=True)),
        ([("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "0")], b3(sampled=False)),
        ([("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "true")], b3(sampled=True)),
        ([("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "false")], b3(sampled=False)),
        ([("x-b3-traceid", T16), ("x-b3-spanid", B3S)], b3(trace=T16)),  # 64-bit: kept, padded for W3C
        (
            [("X-B3-TraceId", B3T), ("X-B3-ParentSpanId", P), ("X-B3-SpanId", B3S), ("X-B3-Sampled", "1")],
            b3(parent=P, sampled=True),
        ),
        ([("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-flags", "1")], b3(sampled=True, debug=True)),
        (  # debug implies accept, whatever Sampled says
            [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-flags", "1"), ("x-b3-sampled", "0")],
            b3(sampled=True, debug=True),
        ),
        ([("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-flags", "0")], b3()),  # not debug
        ([("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-flags", "2")], b3()),
        ([("x-b3-traceid", "0" * 16 + T16), ("x-b3-spanid", B3S)], b3(trace="0" * 16 + T16)),
        ([("x-b3-traceid", f" {B3T}\t"), ("x-b3-spanid", B3S)], b3()),
        ([("x-b3-sampled", "0")], decision(False)),  # a deny decision without ids
        ([("x-b3-sampled", "1")], decision(True)),
        ([("x-b3-flags", "1")], decision(True, debug=True)),
        # duplicates: the first value wins
        (
            [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-traceid", T16), ("X-B3-SpanId", P)],
            b3(),
        ),
        (
            [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "0"), ("x-b3-sampled", "1")],
            b3(sampled=False),
        ),
    ],
)
def test_b3_multi_is_read(headers: list[tuple[str, str]], expected: TraceContext) -> None:
    assert extract(h(*headers)) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("x-b3-traceid", B3T[:-1]), ("x-b3-spanid", B3S)],  # 31
        [("x-b3-traceid", B3T + "0"), ("x-b3-spanid", B3S)],  # 33
        [("x-b3-traceid", T16[:-1]), ("x-b3-spanid", B3S)],  # 15
        [("x-b3-traceid", T16 + "0"), ("x-b3-spanid", B3S)],  # 17
        [("x-b3-traceid", T16 + "0000"), ("x-b3-spanid", B3S)],  # 20
        [("x-b3-traceid", B3T.upper()), ("x-b3-spanid", B3S)],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S.upper())],
        [("x-b3-traceid", "g" + B3T[1:]), ("x-b3-spanid", B3S)],
        [("x-b3-traceid", "0" * 32), ("x-b3-spanid", B3S)],
        [("x-b3-traceid", "0" * 16), ("x-b3-spanid", B3S)],
        [("x-b3-traceid", B3T), ("x-b3-spanid", "0" * 16)],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S[:-1])],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3T)],  # a span id is 16
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-parentspanid", "0" * 16)],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-parentspanid", P.upper())],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-parentspanid", P + "0")],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "2")],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "True")],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "d")],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "")],
        [("x-b3-traceid", B3T), ("x-b3-spanid", B3S), ("x-b3-sampled", "yes"), ("x-b3-flags", "1")],
        [("x-b3-traceid", B3T)],  # span id missing
        [("x-b3-spanid", B3S), ("x-b3-sampled", "1")],  # trace id missing
        [("x-b3-parentspanid", P), ("x-b3-sampled", "1")],  # a parent without ids
        [("x-b3-traceid", "bad"), ("x-b3-spanid", B3S), ("x-b3-traceid", B3T)],  # the first value wins
        [("x-b3-flags", "0")],
    ],
)
def test_invalid_b3_multi_is_ignored(headers: list[tuple[str, str]]) -> None:
    assert extract(h(*headers)) is None


# --- B3 single ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{B3T}-{B3S}", b3()),  # defer
        (f"{B3T}-{B3S}-1", b3(sampled=True)),
        (f"{B3T}-{B3S}-0", b3(sampled=False)),
        (f"{B3T}-{B3S}-d", b3(sampled=True, debug=True)),
        (f"{B3T}-{B3S}-1-{P}", b3(parent=P, sampled=True)),
        (f"{B3T}-{B3S}-d-{P}", b3(parent=P, sampled=True, debug=True)),
        (f"{T16}-{B3S}-0-{P}", b3(trace=T16, parent=P, sampled=False)),
        ("0", decision(False)),  # deny, no ids
        ("1", decision(True)),
        ("d", decision(True, debug=True)),
        (f" {B3T}-{B3S}-1 ", b3(sampled=True)),
    ],
)
def test_b3_single_is_read(value: str, expected: TraceContext) -> None:
    assert extract(h(("b3", value))) == expected
    assert extract(h(("B3", value))) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "2",
        "true",  # single takes 1, 0 or d only
        "D",
        B3T,  # a trace id alone
        f"{B3T}-",
        f"{B3T}-{B3S}-",
        f"{B3T}-{B3S}--{P}",
        f"{B3T}-{B3S}-true",
        f"{B3T}-{B3S}-2",
        f"{B3T}-{B3S}-1-{P}-x",  # five fields
        f"{B3T}-{B3S}-1-",
        f"{B3T}-{B3S}-{P}",  # a parent without a sampling state
        f"{B3T.upper()}-{B3S}-1",
        f"{B3T}-{B3S.upper()}-1",
        f"{B3T}-{B3S}-1-{P.upper()}",
        f"{'0' * 32}-{B3S}-1",
        f"{'0' * 16}-{B3S}-1",
        f"{B3T}-{'0' * 16}-1",
        f"{B3T}-{B3S}-1-{'0' * 16}",
        f"{B3T[:-1]}-{B3S}-1",
        f"{T16[:-1]}-{B3S}-1",
        f"{B3T}-{B3S[:-1]}-1",
        f"{B3T}-{B3S}-1-{P[:-1]}",
        f"{B3T}_{B3S}_1",
    ],
)
def test_invalid_b3_single_is_ignored(value: str) -> None:
    assert extract(h(("b3", value))) is None


# --- which format wins -------------------------------------------------------------------------

TP = ("traceparent", f"00-{T32}-{S}-01")
TP_BAD = ("traceparent", f"ff-{T32}-{S}-01")
SINGLE = ("b3", f"{B3T}-{B3S}-0-{P}")
SINGLE_BAD = ("b3", f"{B3T}-{B3S}-x")
MULTI = [("x-b3-traceid", T16), ("x-b3-spanid", P), ("x-b3-sampled", "1")]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([*MULTI, SINGLE, TP], w3c()),  # W3C first, wherever it is
        ([SINGLE, *MULTI], b3(parent=P, sampled=False)),  # then B3 single
        ([*MULTI, SINGLE], b3(parent=P, sampled=False)),
        ([TP_BAD, SINGLE, *MULTI], b3(parent=P, sampled=False)),  # an invalid format is skipped
        ([TP_BAD, SINGLE_BAD, *MULTI], b3(trace=T16, span=P, sampled=True)),
        ([SINGLE_BAD, *MULTI], b3(trace=T16, span=P, sampled=True)),
        ([TP_BAD, SINGLE_BAD], None),
        ([("b3", "0"), *MULTI], decision(False)),  # a valid single header, even a decision alone
        ([TP, ("b3", "0")], w3c()),
        ([("b3", f"{B3T}-{B3S}-1"), ("b3", "0")], b3(sampled=True)),  # first value wins
        ([("b3", "bad"), ("b3", f"{B3T}-{B3S}-1")], None),
    ],
)
def test_w3c_then_b3_single_then_b3_multi(headers: list[tuple[str, str]], expected: TraceContext | None) -> None:
    assert extract(h(*headers)) == expected


# --- child -------------------------------------------------------------------------------------


class Zeros(random.Random):
    """A Random whose first ``getrandbits(k)`` for each size ``k`` returns 0."""

    def __init__(self) -> None:
        super().__init__(0)
        self.sizes: list[int] = []

    def getrandbits(self, k: int, /) -> int:
        self.sizes.append(k)
        if self.sizes.count(k) == 1:
            return 0
        return super().getrandbits(k)


def test_a_root_has_a_128_bit_trace_id_no_parent_and_the_rate_decides() -> None:
    root = child(None, random.Random(1), 1.0)
    assert HEX32.fullmatch(root.trace_id) and HEX16.fullmatch(root.span_id)
    assert root.trace_id_b3 == root.trace_id
    assert (root.parent_id, root.sampled, root.debug, root.tracestate) == (None, True, False, None)
    assert child(None, random.Random(1), 0.0).sampled is False
    assert child(None, random.Random(1), 1.0) == root  # all from the rng
    assert child(None, random.Random(2), 1.0).trace_id != root.trace_id
    rng = random.Random(3)
    sampled = sum(bool(child(None, rng, 0.25).sampled) for _ in range(4000))
    assert 900 < sampled < 1100


def test_ids_are_never_all_zero() -> None:
    rng = Zeros()
    root = child(None, rng, 1.0)
    assert rng.sizes == [64, 64, 128, 128]  # each zero was drawn again
    assert root.span_id != "0" * 16 and root.trace_id != "0" * 32
    assert HEX16.fullmatch(root.span_id) and HEX32.fullmatch(root.trace_id)
    rng = Zeros()
    assert child(root, rng, 1.0).span_id != "0" * 16 and rng.sizes == [64, 64]


@given(st.integers(min_value=0, max_value=2**32))
def test_ids_have_their_length_whatever_the_rng(seed: int) -> None:
    ctx = child(child(None, random.Random(seed), 0.5), random.Random(seed + 1), 0.5)
    assert HEX32.fullmatch(ctx.trace_id) and HEX16.fullmatch(ctx.span_id) and ctx.parent_id is not None
    assert ctx.trace_id != "0" * 32 and ctx.span_id != "0" * 16


@pytest.mark.parametrize(
    ("parent", "rate", "sampled"),
    [
        (b3(sampled=True), 0.0, True),  # the decision travels; the rate is not asked again
        (b3(sampled=False), 1.0, False),
        (b3(), 1.0, True),  # defer: decided here
        (b3(), 0.0, False),
        (b3(sampled=True, debug=True), 0.0, True),
        (b3(trace=T16, parent=P, sampled=True), 0.0, True),
        (w3c(sampled=False, tracestate="foo=1"), 1.0, False),
    ],
)
def test_a_child_continues_the_trace(parent: TraceContext, rate: float, sampled: bool) -> None:
    span = child(parent, random.Random(5), rate)
    assert (span.trace_id, span.trace_id_b3) == (parent.trace_id, parent.trace_id_b3)
    assert span.parent_id == parent.span_id
    assert span.span_id != parent.span_id and HEX16.fullmatch(span.span_id)
    assert (span.sampled, span.debug, span.tracestate) == (sampled, parent.debug, parent.tracestate)


@pytest.mark.parametrize(
    ("value", "sampled", "debug"),
    [("0", False, False), ("1", True, False), ("d", True, True)],
)
def test_a_decision_without_ids_starts_a_trace_that_keeps_it(value: str, sampled: bool, debug: bool) -> None:
    parent = extract(h(("b3", value)))
    span = child(parent, random.Random(6), 1.0 - sampled)  # the rate would decide the other way
    assert HEX32.fullmatch(span.trace_id) and span.trace_id_b3 == span.trace_id
    assert (span.parent_id, span.sampled, span.debug) == (None, sampled, debug)
    assert span.has_ids and HEX16.fullmatch(span.span_id)


# --- inject and strip --------------------------------------------------------------------------


def test_inject_writes_each_format() -> None:
    ctx = b3(trace=T16, parent=P, sampled=True)
    assert inject(ctx, ["w3c"]) == h(("traceparent", f"00-{'0' * 16}{T16}-{B3S}-01"))
    assert inject(ctx, ["b3"]) == h(
        ("x-b3-traceid", T16), ("x-b3-spanid", B3S), ("x-b3-parentspanid", P), ("x-b3-sampled", "1")
    )
    assert inject(ctx, ["b3single"]) == h(("b3", f"{T16}-{B3S}-1-{P}"))
    assert inject(ctx, ["b3single", "w3c", "b3single"]) == [*inject(ctx, ["b3single"]), *inject(ctx, ["w3c"])]
    assert inject(ctx, DEFAULT_FORMATS) == [*inject(ctx, ["w3c"]), *inject(ctx, ["b3"])]
    assert inject(ctx, []) == []
    with pytest.raises(ValueError, match="zipkin"):
        inject(ctx, ["zipkin"])


@pytest.mark.parametrize(
    ("ctx", "multi", "single", "traceparent"),
    [
        (b3(sampled=False), [("x-b3-sampled", "0")], f"{B3T}-{B3S}-0", f"00-{B3T}-{B3S}-00"),
        (b3(sampled=True, debug=True), [("x-b3-flags", "1")], f"{B3T}-{B3S}-d", f"00-{B3T}-{B3S}-01"),
        (b3(), [], f"{B3T}-{B3S}", f"00-{B3T}-{B3S}-00"),  # defer: no sampled header
        (b3(parent=P), [("x-b3-parentspanid", P)], f"{B3T}-{B3S}", f"00-{B3T}-{B3S}-00"),
        (
            b3(parent=P, sampled=True, debug=True),
            [("x-b3-parentspanid", P), ("x-b3-flags", "1")],
            f"{B3T}-{B3S}-d-{P}",
            f"00-{B3T}-{B3S}-01",
        ),
    ],
)
def test_inject_sampling_states(ctx: TraceContext, multi: list[tuple[str, str]], single: str, traceparent: str) -> None:
    assert inject(ctx, ["b3"]) == h(("x-b3-traceid", B3T), ("x-b3-spanid", B3S), *multi)
    assert inject(ctx, ["b3single"]) == h(("b3", single))
    assert inject(ctx, ["w3c"]) == h(("traceparent", traceparent))


@pytest.mark.parametrize(
    ("ctx", "multi", "single"),
    [
        (decision(False), [("x-b3-sampled", "0")], "0"),
        (decision(True), [("x-b3-sampled", "1")], "1"),
        (decision(True, debug=True), [("x-b3-flags", "1")], "d"),
    ],
)
def test_a_decision_without_ids_is_written_as_b3_only(
    ctx: TraceContext, multi: list[tuple[str, str]], single: str
) -> None:
    assert inject(ctx, ["w3c"]) == []
    assert inject(ctx, ["b3"]) == h(*multi)
    assert inject(ctx, ["b3single"]) == h(("b3", single))
    assert extract(inject(ctx, ["b3"])) == ctx
    assert extract(inject(ctx, ["b3single"])) == ctx


def test_strip_removes_every_trace_header_in_place() -> None:
    headers = h(
        ("Host", "item"),
        ("TraceParent", "x"),
        ("tracestate", "a=1"),
        ("B3", "0"),
        ("X-B3-TraceId", B3T),
        ("x-b3-spanid", B3S),
        ("x-b3-parentspanid", P),
        ("x-b3-sampled", "1"),
        ("X-B3-Flags", "1"),
        ("x-b3-unknown", "z"),
        ("b3x", "kept"),
        ("x-b3", "kept"),
        ("traceparent-x", "kept"),
        ("x-request-id", "r"),
        ("", "odd"),
    )
    same = headers
    strip(headers)
    assert same is headers
    assert headers == h(
        ("Host", "item"),
        ("b3x", "kept"),
        ("x-b3", "kept"),
        ("traceparent-x", "kept"),
        ("x-request-id", "r"),
        ("", "odd"),
    )
    untouched = h(("host", "a"), ("accept", "b"))
    strip(untouched)
    assert untouched == h(("host", "a"), ("accept", "b"))


def test_a_hop_replaces_the_trace_headers() -> None:
    headers = h(("host", "item"), TP, ("tracestate", "foo=1,,BAD=2"), *MULTI)
    parent = extract(headers)
    span = child(parent, random.Random(9), 0.0)
    strip(headers)
    headers.extend(inject(span, ["w3c", "b3", "b3single"]))
    assert headers[0] == (b"host", b"item")
    assert extract(headers) == TraceContext(T32, T32, span.span_id, None, True, False, "foo=1")
    assert (span.parent_id, span.sampled) == (S, True)
    assert dict(headers)[b"x-b3-parentspanid"] == S.encode()
    assert dict(headers)[b"b3"] == f"{T32}-{span.span_id}-1-{S}".encode()


# --- properties --------------------------------------------------------------------------------

HEX = "0123456789abcdef"
trace_ids_b3 = st.one_of(st.text(HEX, min_size=16, max_size=16), st.text(HEX, min_size=32, max_size=32)).filter(
    lambda t: t.strip("0") != ""
)
span_ids = st.text(HEX, min_size=16, max_size=16).filter(lambda s: s != "0" * 16)
tracestates = st.one_of(
    st.none(),
    st.lists(st.sampled_from(["foo=1", "bar=a b", "t@v=x", "rojo=00f067aa0ba902b7"]), min_size=1, unique=True).map(
        ",".join
    ),
)


@st.composite
def contexts(draw: st.DrawFn, decided: bool = False) -> TraceContext:
    trace = draw(trace_ids_b3)
    debug = draw(st.booleans())
    sampled = True if debug else draw(st.booleans() if decided else st.sampled_from([True, False, None]))
    return TraceContext(
        trace.rjust(32, "0"), trace, draw(span_ids), draw(st.none() | span_ids), sampled, debug, draw(tracestates)
    )


@given(contexts())
def test_inject_then_extract_gives_the_same_context_in_every_format(ctx: TraceContext) -> None:
    full = (ctx.trace_id, ctx.trace_id_b3, ctx.span_id, ctx.parent_id, ctx.sampled, ctx.debug)
    assert ids(extract(inject(ctx, ["b3"]))) == full
    # b3 single: a parent needs a sampling state before it
    single = full if ctx.sampled is not None else (*full[:3], None, None, False)
    assert ids(extract(inject(ctx, ["b3single"]))) == single
    # W3C: 32-digit trace id, no grandparent, no defer and no debug: sampled or not; tracestate kept
    w3c_ctx = extract(inject(ctx, ["w3c"]))
    assert w3c_ctx == TraceContext(
        ctx.trace_id, ctx.trace_id, ctx.span_id, None, bool(ctx.sampled), False, ctx.tracestate
    )
    assert extract(inject(ctx, ["b3", "b3single", "w3c"])) == w3c_ctx  # all together: W3C wins


NAMES = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "host",
]
names = st.sampled_from(NAMES).flatmap(
    lambda name: st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(name, upper, strict=True)).encode()
    )
)
values = st.one_of(
    st.binary(max_size=80),
    st.text("0123456789abcdefABd-, \t", max_size=70).map(str.encode),
    st.builds(
        lambda t, s, x: f"{t}-{s}-{x}".encode(), trace_ids_b3, span_ids, st.sampled_from(["0", "1", "d", "01", "x"])
    ),
    st.builds(
        lambda v, t, s: f"{v}-{t.rjust(32, '0')}-{s}-01".encode(),
        st.sampled_from(["00", "01", "ff"]),
        trace_ids_b3,
        span_ids,
    ),
)


def assert_valid(ctx: TraceContext) -> None:
    if not ctx.has_ids:
        assert (ctx.trace_id, ctx.trace_id_b3, ctx.parent_id, ctx.tracestate) == ("", "", None, None)
        assert ctx.sampled is not None
    else:
        assert HEX32.fullmatch(ctx.trace_id) and ctx.trace_id != "0" * 32
        assert ctx.trace_id_b3 in (ctx.trace_id, ctx.trace_id[16:])
        assert ctx.trace_id_b3 == ctx.trace_id or ctx.trace_id[:16] == "0" * 16
        for span in (ctx.span_id, ctx.parent_id or S):
            assert HEX16.fullmatch(span) and span != "0" * 16
    assert ctx.sampled or not ctx.debug


@given(st.lists(st.tuples(names, values), max_size=8))
def test_any_header_values_give_none_or_a_valid_context(headers: list[tuple[bytes, bytes]]) -> None:
    ctx = extract(headers)
    if ctx is None:
        return
    assert_valid(ctx)
    inject(ctx, ["w3c", "b3", "b3single"])  # whatever came in can be written
    again = extract(inject(ctx, ["b3"]))
    assert again is not None and (again.trace_id, again.span_id, again.sampled) == (
        ctx.trace_id,
        ctx.span_id,
        ctx.sampled,
    )
    span = child(ctx, random.Random(0), 0.5)
    assert_valid(span)
    assert span.has_ids
    assert ids(extract(inject(span, ["b3"]))) == ids(span)


# --- OpenTelemetry interop ---------------------------------------------------------------------

PROPAGATORS = {
    "w3c": TraceContextTextMapPropagator(),
    "b3": B3MultiFormat(),
    "b3single": B3SingleFormat(),
}


def carrier(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode(): value.decode("latin-1") for name, value in headers}


@pytest.mark.parametrize("fmt", sorted(PROPAGATORS))
@given(ctx=contexts(decided=True))
def test_opentelemetry_reads_what_we_write(fmt: str, ctx: TraceContext) -> None:
    theirs = otel.get_current_span(PROPAGATORS[fmt].extract(carrier(inject(ctx, [fmt])))).get_span_context()
    assert theirs.is_valid
    assert theirs.trace_id == int(ctx.trace_id, 16)
    assert theirs.span_id == int(ctx.span_id, 16)
    assert theirs.trace_flags.sampled is bool(ctx.sampled)
    if fmt == "w3c":
        assert theirs.trace_state.to_header() == (ctx.tracestate or "")


@pytest.mark.parametrize("fmt", sorted(PROPAGATORS))
@given(
    trace_id=st.integers(min_value=1, max_value=2**128 - 1),
    span_id=st.integers(min_value=1, max_value=2**64 - 1),
    sampled=st.booleans(),
    state=st.lists(
        st.tuples(st.sampled_from(["foo", "t@v", "rojo"]), st.sampled_from(["1", "a b", "x/y"])),
        unique_by=lambda kv: kv[0],
    ),
)
def test_we_read_what_opentelemetry_writes(
    fmt: str, trace_id: int, span_id: int, sampled: bool, state: list[tuple[str, str]]
) -> None:
    span_context = otel.SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=False,
        trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED if sampled else otel.TraceFlags.DEFAULT),
        trace_state=otel.TraceState(state),
    )
    written: dict[str, str] = {}
    PROPAGATORS[fmt].inject(written, context=otel.set_span_in_context(otel.NonRecordingSpan(span_context)))
    ours = extract([(name.encode(), value.encode()) for name, value in written.items()])
    assert ours is not None
    assert (ours.trace_id, ours.span_id, ours.sampled) == (f"{trace_id:032x}", f"{span_id:016x}", sampled)
    assert ours.tracestate == ((span_context.trace_state.to_header() or None) if fmt == "w3c" else None)
