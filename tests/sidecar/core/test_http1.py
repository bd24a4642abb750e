"""sidecar.core.http1: the sans-IO readers and writers, hazard by hazard.

Each HTTP/1.1 hazard (RFC 9112 framing, smuggling) that concerns parsing
has a case below with the exact status a server answers. h11 is used only as an
independent parser to check that what we serialize is what we meant.
"""

from __future__ import annotations

import re

import h11  # noqa: TID251 - an independent parser as the test oracle, never on the data path
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.http1 import (
    CHUNKED_END,
    MAX_HEAD_BYTES,
    MAX_HEADER_FIELDS,
    Data,
    EndOfMessage,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    Upgrade,
    chunk,
    reason_phrase,
    serialize_request_head,
    serialize_response_head,
)

# helpers ---------------------------------------------------------------------------


def request_events(*pieces: bytes) -> list[object]:
    reader = RequestReader()
    for piece in pieces:
        reader.feed(piece)
    return list(reader.events)


def response_events(*pieces: bytes, method: bytes = b"GET", eof: bool = False) -> tuple[ResponseReader, list[object]]:
    reader = ResponseReader()
    reader.expect(method)
    for piece in pieces:
        reader.feed(piece)
    if eof:
        reader.feed_eof()
    return reader, list(reader.events)


def kinds(events: list[object]) -> list[str]:
    return [type(e).__name__ for e in events]


def coalesce(events: list[object]) -> list[object]:
    """Adjacent Data events merged: how the body is cut depends on how it was fed."""
    out: list[object] = []
    for event in events:
        if type(event) is Data and out and type(out[-1]) is Data:
            out[-1] = Data(out[-1].data + event.data)  # type: ignore[attr-defined]
        else:
            out.append(event)
    return out


def req(head: bytes) -> bytes:
    """A request head from lines joined with CRLF (so tests read like the wire)."""
    return head.replace(b"\n", b"\r\n")


# 1. hazards: rejected before any RequestHead is queued ----------------------------------

HEAD_HAZARDS = [
    # CL + TE in one request (both orders)
    ("cl-then-te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("te-then-cl", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    # duplicate / list Content-Length
    ("cl-dup-same", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("cl-dup-different", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("cl-list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc", 400),
    ("cl-minus", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\nabc", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc", 400),
    ("cl-overflow", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
    # Transfer-Encoding other than exactly chunked
    ("te-gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ("te-chunked-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("te-identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 400),
    (
        "te-two-lines-chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-two-lines-gzip-chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    # TE in HTTP/1.0
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-in-http10-with-host", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # obs-fold
    ("obs-fold-space", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", 400),
    ("first-line-folded", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    # bare CR, NUL, CTL
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    ("bare-cr-line-end", b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
    ("bare-cr-request-line", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    ("nul-in-name", b"GET / HTTP/1.1\r\nHost: a\r\nX\x00Y: a\r\n\r\n", 400),
    ("ctl-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    ("del-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
    ("nul-in-host", b"GET / HTTP/1.1\r\nHost: a\x00.b\r\n\r\n", 400),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("cr-in-target", b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # whitespace before the colon
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n", 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\nHost: a\r\nX\t: a\r\n\r\n", 400),
    ("space-before-colon-host", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("space-before-colon-cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc", 400),
    # bad header names
    ("name-with-paren", b"GET / HTTP/1.1\r\nHost: a\r\nX(y): a\r\n\r\n", 400),
    ("name-with-space", b"GET / HTTP/1.1\r\nHost: a\r\nX y: a\r\n\r\n", 400),
    ("name-empty", b"GET / HTTP/1.1\r\nHost: a\r\n: a\r\n\r\n", 400),
    ("name-without-colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
    ("name-non-ascii", b"GET / HTTP/1.1\r\nHost: a\r\nX\xc3\xa9: a\r\n\r\n", 400),
    # bad request lines
    ("no-space-after-method", b"GET/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("lower-case-method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("unknown-method", b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("garbage-line", b"hello world\r\n\r\n", 400),
    ("lower-case-version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    # HTTP/0.9 and versions other than 1.0 / 1.1
    ("http09-simple", b"GET /\r\n\r\n", 400),
    ("http09-explicit", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 400),
    ("http20", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("http12", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),  # llhttp's own check: 1.2 is no version it knows
    ("http30", b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 400),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    # Host missing / duplicated in HTTP/1.1
    ("host-missing", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("host-missing-absolute-form", b"GET http://item/ HTTP/1.1\r\n\r\n", 400),
    ("host-duplicate-same", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ("host-duplicate-different", b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400),
    # A second Host is ambiguous whatever the version: which one routes, which one the app reads?
    ("host-duplicate-http10", b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # CONNECT is never tunnelled
    ("connect", b"CONNECT item:443 HTTP/1.1\r\nHost: item:443\r\n\r\n", 400),
    ("connect-http10", b"CONNECT item:443 HTTP/1.0\r\n\r\n", 400),
]


@pytest.mark.parametrize(("raw", "status"), [c[1:] for c in HEAD_HAZARDS], ids=[c[0] for c in HEAD_HAZARDS])
def test_head_hazard_rejected_without_a_head(raw: bytes, status: int) -> None:
    reader = RequestReader()
    reader.feed(raw)
    events = list(reader.events)
    assert len(events) == 1, events
    error = events[0]
    assert isinstance(error, ProtocolError)
    assert error.status == status
    assert error.detail  # says what was wrong
    assert reader.failed


@pytest.mark.parametrize(("raw", "status"), [c[1:] for c in HEAD_HAZARDS], ids=[c[0] for c in HEAD_HAZARDS])
def test_head_hazard_rejected_when_fed_byte_by_byte(raw: bytes, status: int) -> None:
    reader = RequestReader()
    for i in range(len(raw)):
        reader.feed(raw[i : i + 1])
    events = list(reader.events)
    assert not any(isinstance(e, RequestHead) for e in events), events
    assert len(events) == 1
    assert isinstance(events[0], ProtocolError)
    assert events[0].status == status


CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"

BODY_HAZARDS = [
    ("chunk-size-zz", b"zz\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-0x1", b"0x1\r\na\r\n0\r\n\r\n"),
    ("chunk-size-20-hex-digits", b"10000000000000000000\r\na\r\n0\r\n\r\n"),
    ("chunk-size-17-hex-digits", b"10000000000000000\r\na\r\n0\r\n\r\n"),
    ("chunk-size-ffff-overflow", b"ffffffffffffffffffff\r\na\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"-1\r\na\r\n0\r\n\r\n"),
    ("chunk-size-empty", b"\r\na\r\n0\r\n\r\n"),
    ("chunk-size-space-inside", b"1 0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n"),
    ("chunk-bare-lf", b"1\na\n0\n\n"),
    ("chunk-data-too-long", b"1\r\nab\r\n0\r\n\r\n"),
    ("chunk-ext-bare-cr", b"1;a=b\rc\r\na\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("body", [c[1] for c in BODY_HAZARDS], ids=[c[0] for c in BODY_HAZARDS])
def test_chunked_body_hazard(body: bytes) -> None:
    # The head was valid and is out before the body is read (we stream); the body error
    # must end the message with a 400 and never with an EndOfMessage.
    events = request_events(CHUNKED_HEAD + body)
    assert kinds(events)[0] == "RequestHead"
    assert isinstance(events[-1], ProtocolError)
    assert events[-1].status == 400
    assert not any(isinstance(e, EndOfMessage) for e in events)
    assert sum(len(e.data) for e in events if isinstance(e, Data)) <= 1


def test_after_an_error_nothing_more_is_parsed() -> None:
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n")
    assert kinds(list(reader.events)) == ["ProtocolError"]
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert kinds(list(reader.events)) == ["ProtocolError"]
    assert reader.messages_completed == 0


# 2. size limits ------------------------------------------------------------------------


def big_head(total_value_bytes: int, *, per_field: int = 1000) -> bytes:
    lines = [b"GET / HTTP/1.1", b"Host: a"]
    n = 0
    while n < total_value_bytes:
        lines.append(b"X-F%d: %s" % (len(lines), b"v" * per_field))
        n += per_field
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_limits_are_the_contract() -> None:
    assert MAX_HEAD_BYTES == 64 * 1024
    assert MAX_HEADER_FIELDS == 100


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (65 * 1024) + b"\r\n\r\n", id="one-huge-field"),
        pytest.param(big_head(66 * 1024, per_field=2000), id="many-fields-over-64k"),
        pytest.param(b"GET /" + b"a" * (65 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n", id="huge-target"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (65 * 1024), id="incomplete-huge-field"),
        pytest.param(big_head(66 * 1024, per_field=2000)[:-4], id="incomplete-many-fields"),
    ],
)
def test_head_over_64k_in_one_feed_is_431(raw: bytes) -> None:
    events = request_events(raw)
    assert len(events) == 1
    assert isinstance(events[0], ProtocolError)
    assert events[0].status == (414 if raw.startswith(b"GET /aaa") else 431)  # a target too long: 414


@pytest.mark.parametrize("piece", [1, 7, 100, 1500, 16 * 1024])
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (65 * 1024) + b"\r\n\r\n", id="one-huge-field"),
        pytest.param(big_head(66 * 1024), id="many-fields"),
        pytest.param(b"GET /" + b"a" * (65 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n", id="huge-target"),
    ],
)
def test_head_over_64k_trickled_is_431(raw: bytes, piece: int) -> None:
    reader = RequestReader()
    fed = 0
    for i in range(0, len(raw), piece):
        reader.feed(raw[i : i + piece])
        fed = i + piece
        if reader.failed:
            break
    events = list(reader.events)
    assert len(events) == 1
    assert isinstance(events[0], ProtocolError)
    assert events[0].status == (414 if raw.startswith(b"GET /aaa") else 431)  # a target too long: 414
    # Caught while the head is being read, not after buffering far past the limit.
    assert fed <= MAX_HEAD_BYTES + 2 * piece + 2048


def test_head_under_the_limit_is_accepted() -> None:
    raw = big_head(60 * 1024)  # Host and 62 fields of 1000 bytes: 62.4 KB
    assert 62_000 < len(raw) < MAX_HEAD_BYTES
    for pieces in ([raw], [raw[i : i + 100] for i in range(0, len(raw), 100)]):
        events = request_events(*pieces)
        assert kinds(events) == ["RequestHead", "EndOfMessage"]
        assert len(events[0].headers) == 1 + 62  # type: ignore[attr-defined]


def fields_request(n_fields: int) -> bytes:
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(n_fields - 1))
    return b"GET / HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


def test_exactly_100_fields_are_accepted() -> None:
    events = request_events(fields_request(100))
    assert kinds(events) == ["RequestHead", "EndOfMessage"]
    assert len(events[0].headers) == 100  # type: ignore[attr-defined]


@pytest.mark.parametrize("n_fields", [101, 150, 1000])
def test_more_than_100_fields_is_431(n_fields: int) -> None:
    events = request_events(fields_request(n_fields))
    assert len(events) == 1
    assert isinstance(events[0], ProtocolError)
    assert events[0].status == 431


def test_custom_limits() -> None:
    reader = RequestReader(max_head_bytes=100, max_fields=2)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n")
    assert [e.status for e in reader.events if isinstance(e, ProtocolError)] == [431]
    reader = RequestReader(max_head_bytes=100, max_fields=2)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nA: " + b"x" * 200 + b"\r\n\r\n")
    assert [e.status for e in reader.events if isinstance(e, ProtocolError)] == [431]


@pytest.mark.parametrize("cut_into_next_head", [1, 10, 20])
def test_small_pipelined_head_after_a_big_body_is_not_431(cut_into_next_head: int) -> None:
    # A 64 KiB read that ends inside the next (tiny) head must not count the previous
    # request's body as head bytes.
    second = b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    template = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: %05d\r\n\r\n"
    n = MAX_HEAD_BYTES - len(template % 0) - cut_into_next_head
    stream = template % n + b"x" * n + second
    cut = MAX_HEAD_BYTES
    reader = RequestReader()
    reader.feed(stream[:cut])
    reader.feed(stream[cut : cut + 1])
    reader.feed(stream[cut + 1 :])
    events = coalesce(list(reader.events))
    assert kinds(events) == ["RequestHead", "Data", "EndOfMessage", "RequestHead", "EndOfMessage"]
    assert events[1] == Data(b"x" * n)
    assert events[3].target == b"/b"  # type: ignore[attr-defined]


@pytest.mark.parametrize("piece", [100, 4096, MAX_HEAD_BYTES])
def test_big_pipelined_head_after_a_body_is_still_431(piece: int) -> None:
    first = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
    second = b"GET /b HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (200 * 1024)  # never ends
    stream = first + second
    reader = RequestReader()
    fed = 0
    while fed < len(stream) and not reader.failed:
        reader.feed(stream[fed : fed + piece])
        fed += piece
    events = list(reader.events)
    assert kinds(events) == ["RequestHead", "Data", "EndOfMessage", "ProtocolError"]
    assert events[-1].status == 431  # type: ignore[attr-defined]
    # The feed that ended the first request and began this head is counted from the
    # callbacks only, so at most one feed more than the limit is buffered.
    assert fed <= len(first) + MAX_HEAD_BYTES + 2 * piece


# 3. good requests ----------------------------------------------------------------------


def test_simple_get() -> None:
    events = request_events(b"GET /x?y=1 HTTP/1.1\r\nHost: item:8080\r\nAccept: */*\r\n\r\n")
    assert events == [
        RequestHead(
            method=b"GET",
            target=b"/x?y=1",
            headers=[(b"Host", b"item:8080"), (b"Accept", b"*/*")],
            http_version="1.1",
            content_length=None,
            chunked=False,
            keep_alive=True,
            expect_continue=False,
            upgrade=None,
            host=b"item:8080",
        ),
        EndOfMessage(),
    ]
    assert not events[0].has_body  # type: ignore[attr-defined]


def test_content_length_body() -> None:
    events = request_events(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.content_length, head.chunked, head.has_body) == (b"POST", 5, False, True)
    assert events[1:] == [Data(b"hello"), EndOfMessage()]


def test_content_length_zero_has_no_body() -> None:
    events = request_events(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert events[0].content_length == 0  # type: ignore[attr-defined]
    assert not events[0].has_body  # type: ignore[attr-defined]
    assert events[1:] == [EndOfMessage()]


def test_content_length_body_waits_for_all_bytes() -> None:
    reader = RequestReader()
    reader.feed(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
    assert kinds(list(reader.events)) == ["RequestHead", "Data"]
    reader.feed(b"lo")
    assert list(reader.events)[1:] == [Data(b"hel"), Data(b"lo"), EndOfMessage()]
    assert reader.messages_completed == 1


def test_chunked_body_drops_extensions_and_trailers() -> None:
    raw = CHUNKED_HEAD + b"3;name=value\r\nabc\r\n2;x\r\nde\r\n0;last\r\nX-Trailer: t\r\n\r\n"
    events = request_events(raw)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.chunked, head.content_length, head.has_body) == (True, None, True)
    assert events[1:] == [Data(b"abc"), Data(b"de"), EndOfMessage()]
    # Nothing of the chunk framing or its extensions reaches the data.
    assert b"name" not in b"".join(e.data for e in events if isinstance(e, Data))


def test_chunked_upper_case_hex_and_leading_zeros() -> None:
    events = coalesce(request_events(CHUNKED_HEAD + b"0A\r\n0123456789\r\n00\r\n\r\n"))
    assert events[1:] == [Data(b"0123456789"), EndOfMessage()]


def test_transfer_encoding_chunked_any_case() -> None:
    events = request_events(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n")
    assert events[0].chunked is True  # type: ignore[attr-defined]
    assert events[1:] == [Data(b"z"), EndOfMessage()]


def test_pipelined_requests_in_one_feed_keep_their_order() -> None:
    raw = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /3 HTTP/1.1\r\nHost: c\r\n\r\n"
    )
    reader = RequestReader()
    reader.feed(raw)
    events = list(reader.events)
    assert kinds(events) == [
        "RequestHead",
        "EndOfMessage",
        "RequestHead",
        "Data",
        "EndOfMessage",
        "RequestHead",
        "EndOfMessage",
    ]
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [(h.target, h.host) for h in heads] == [(b"/1", b"a"), (b"/2", b"b"), (b"/3", b"c")]
    assert events[3] == Data(b"hi")
    assert reader.messages_completed == 3


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (b"GET /2 HTTP/1.1\r\n\r\n", 400),
        (b"GET /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /2 HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n", 400),
        (fields_request(101), 431),
    ],
)
def test_good_then_bad_pipelined_request(bad: bytes, status: int) -> None:
    good = b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"
    events = request_events(good + bad)
    assert kinds(events) == ["RequestHead", "Data", "EndOfMessage", "ProtocolError"]
    assert events[0].target == b"/1"  # type: ignore[attr-defined]
    assert events[3].status == status  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-foo\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", True),
    ],
)
def test_keep_alive(raw: bytes, keep_alive: bool) -> None:
    events = request_events(raw)
    assert kinds(events) == ["RequestHead", "EndOfMessage"]
    assert events[0].keep_alive is keep_alive  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"TRACE"])
@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
def test_a_body_on_a_method_without_body_semantics_is_400(method: bytes, framing: bytes) -> None:
    events = request_events(method + b" / HTTP/1.1\r\nHost: a\r\n" + framing)
    assert kinds(events) == ["ProtocolError"]
    assert events[0].status == 400 and "with a body" in events[0].detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"TRACE"])
def test_content_length_zero_on_a_method_without_body_semantics_is_fine(method: bytes) -> None:
    events = request_events(method + b" / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert kinds(events) == ["RequestHead", "EndOfMessage"]


def test_http10_without_host_is_accepted() -> None:
    events = request_events(b"GET / HTTP/1.0\r\n\r\n")
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.http_version, head.host) == ("1.0", None)


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n", False),
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\n", False),
        # 100-continue does not exist in HTTP/1.0 (RFC 9110 §10.1.1)
        (b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", False),
    ],
)
def test_expect_continue(raw: bytes, expect: bool) -> None:
    events = request_events(raw)
    assert kinds(events) == ["RequestHead"]  # body not here yet
    assert events[0].expect_continue is expect  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("connection", "token"),
    [
        (b"Connection: Upgrade\r\n", b"websocket"),
        (b"Connection: keep-alive, upgrade\r\n", b"websocket"),
        (b"Connection: keep-alive\r\nConnection: UPGRADE\r\n", b"websocket"),
    ],
)
def test_upgrade_with_connection_upgrade(connection: bytes, token: bytes) -> None:
    raw = b"GET /ws HTTP/1.1\r\nHost: a\r\n" + connection + b"Upgrade: websocket\r\n\r\n"
    reader = RequestReader()
    reader.feed(raw + b"\x81\x05hello")
    events = list(reader.events)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.upgrade == token
    assert events[1:] == [EndOfMessage(), Upgrade(b"\x81\x05hello")]
    # Nothing after the upgrade is HTTP any more.
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(reader.events) == 3


def test_upgrade_rest_is_empty_when_the_head_ends_the_feed() -> None:
    events = request_events(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert events[0].upgrade == b"h2c"  # type: ignore[attr-defined]
    assert events[1:] == [EndOfMessage(), Upgrade(b"")]


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-upgrade\r\nUpgrade: h2c\r\n\r\n",
    ],
)
def test_upgrade_header_without_connection_upgrade_is_a_plain_request(raw: bytes) -> None:
    events = request_events(raw + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert kinds(events) == ["RequestHead", "EndOfMessage", "RequestHead", "EndOfMessage"]
    assert events[0].upgrade is None  # type: ignore[attr-defined]
    assert events[2].target == b"/next"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 15\r\n\r\nsweet post body",
        b"Transfer-Encoding: chunked\r\n\r\nf\r\nsweet post body\r\n0\r\n\r\n",
    ],
)
@pytest.mark.parametrize("upgrade", [b"websocket", b"h2c"])
def test_an_upgrade_request_with_a_body_is_a_plain_request_with_that_body(framing: bytes, upgrade: bytes) -> None:
    """llhttp's fixture "Upgrade POST request": llhttp (through httptools) stops at the
    head and leaves the body unparsed; we parse it as the body, then go on."""
    raw = b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: %b\r\n%b" % (upgrade, framing)
    raw += b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    for events in (request_events(raw), request_events(*[raw[i : i + 1] for i in range(len(raw))])):
        events = coalesce(events)
        assert kinds(events) == ["RequestHead", "Data", "EndOfMessage", "RequestHead", "EndOfMessage"]
        assert events[0].upgrade is None and events[1] == Data(b"sweet post body")  # type: ignore[attr-defined]
        assert events[3].target == b"/next"  # type: ignore[attr-defined]


def test_an_empty_upgrade_is_no_upgrade() -> None:
    raw = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: \r\n\r\nGET /n HTTP/1.1\r\nHost: a\r\n\r\n"
    events = request_events(raw)
    assert kinds(events) == ["RequestHead", "EndOfMessage", "RequestHead", "EndOfMessage"]
    assert events[0].upgrade is None  # type: ignore[attr-defined]


def test_absolute_form_and_asterisk_targets() -> None:
    events = request_events(
        b"GET http://item:8080/x?y HTTP/1.1\r\nHost: item:8080\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"http://item:8080/x?y", b"*"]


def test_header_names_keep_their_case_and_values_are_trimmed() -> None:
    events = request_events(b"GET / HTTP/1.1\r\nhOsT:   a  \r\nX-Multi: a, b\r\nX-Tab: a\tb\r\n\r\n")
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.headers[0][0] == b"hOsT"
    assert head.headers[0][1].strip() == b"a"
    assert head.host is not None and head.host.strip() == b"a"
    assert head.headers[1:] == [(b"X-Multi", b"a, b"), (b"X-Tab", b"a\tb")]


def test_leading_empty_lines_are_ignored() -> None:
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line.
    events = request_events(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert kinds(events) == ["RequestHead", "EndOfMessage"]


# 4. byte-by-byte equivalence --------------------------------------------------------------

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30).map(
    str.encode
)
_path = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~/%=&?", max_size=30).map(lambda s: b"/" + s.encode())
_RESERVED = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect", "te", "trailer"}
_extra_headers = st.lists(
    st.tuples(_token.filter(lambda t: t.lower() not in _RESERVED).map(str.encode), _value), max_size=6
)


@st.composite
def valid_request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"]))
    headers = [(b"Host", draw(st.sampled_from([b"item", b"item:8080", b"[::1]:80"])))] + draw(_extra_headers)
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body_parts = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    if method in (b"GET", b"HEAD", b"DELETE"):  # a body there is refused (its own tests below)
        framing, body_parts = draw(st.sampled_from(["none", "length"])), []
    body = b"".join(body_parts)
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = b"".join(chunk(p) for p in body_parts) + CHUNKED_END
    else:
        payload = b""
    return serialize_request_head(method, draw(_path), headers) + payload


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(valid_request(), min_size=1, max_size=4), data=st.data())
def test_split_points_do_not_change_the_events(requests: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(requests)
    whole = request_events(raw)
    assert not any(isinstance(e, ProtocolError) for e in whole), whole
    assert sum(isinstance(e, EndOfMessage) for e in whole) == len(requests)
    cuts = sorted(data.draw(st.sets(st.integers(min_value=1, max_value=max(1, len(raw) - 1)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert coalesce(request_events(*pieces)) == coalesce(whole)


@settings(max_examples=30, deadline=None)
@given(requests=st.lists(valid_request(), min_size=1, max_size=3))
def test_byte_by_byte_feeding_gives_the_same_events(requests: list[bytes]) -> None:
    raw = b"".join(requests)
    one_by_one = request_events(*(raw[i : i + 1] for i in range(len(raw))))
    assert coalesce(one_by_one) == coalesce(request_events(raw))


# 5. fuzzing: feed never raises, and no head carries CR, LF or NUL -------------------------

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_reader_invariants(pieces: list[bytes]) -> None:
    reader = RequestReader()
    for piece in pieces:
        reader.feed(piece)  # must never raise
    events = list(reader.events)
    for i, event in enumerate(events):
        assert type(event) in (RequestHead, Data, EndOfMessage, Upgrade, ProtocolError), event
        if isinstance(event, RequestHead):
            assert event.http_version in ("1.0", "1.1")
            assert event.method != b"CONNECT"
            for ch in (b"\r", b"\n", b"\x00", b" "):
                assert ch not in event.target
            for name, value in event.headers:
                assert _TOKEN.match(name), name
                for ch in (b"\r", b"\n", b"\x00"):
                    assert ch not in value, (name, value)
            if event.http_version == "1.1":
                assert sum(n.lower() == b"host" for n, _ in event.headers) == 1
            assert not (event.chunked and event.content_length is not None)
        if isinstance(event, ProtocolError):
            assert event.status in (400, 414, 431, 505)
            assert i == len(events) - 1, "a ProtocolError is the last event"
            assert reader.failed
        if isinstance(event, Upgrade):
            assert i == len(events) - 1


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(raw: bytes) -> None:
    check_reader_invariants([raw])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_random_pieces_never_raise(pieces: list[bytes]) -> None:
    check_reader_invariants([b"GET / HTTP/1.1\r\n", *pieces])


_INTERESTING = [
    b"\r",
    b"\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b"\r\n",
    b"\r\n\r\n",
    b"\x7f",
    b"\xff",
    b"0",
    b"-",
    b"+",
]


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(valid_request()))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(raw)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        what = draw(st.sampled_from(_INTERESTING) | st.binary(min_size=1, max_size=3))
        if op == "insert":
            raw[at:at] = what
        elif op == "replace":
            raw[at : at + len(what)] = what
        else:
            del raw[at : at + draw(st.integers(min_value=1, max_value=5))]
    return bytes(raw)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated_request(), cut=st.integers(min_value=0, max_value=400))
def test_mutated_requests_never_raise(raw: bytes, cut: int) -> None:
    check_reader_invariants([raw])
    check_reader_invariants([raw[:cut], raw[cut:]])


# 6. responses ----------------------------------------------------------------------------


def test_response_content_length() -> None:
    reader, events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: x\r\n\r\nabc")
    assert events == [
        ResponseHead(
            status=200,
            reason=b"OK",
            headers=[(b"Content-Length", b"3"), (b"Server", b"x")],
            http_version="1.1",
            content_length=3,
            chunked=False,
            keep_alive=True,
            until_close=False,
            no_body=False,
        ),
        Data(b"abc"),
        EndOfMessage(),
    ]
    assert reader.messages_completed == 1
    assert not reader.dirty and not reader.failed


def test_response_chunked() -> None:
    _, events = response_events(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\nX-T: 1\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.chunked, head.content_length, head.until_close, head.keep_alive) == (True, None, False, True)
    assert events[1:] == [Data(b"abc"), Data(b"d"), EndOfMessage()]


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nabc",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nabc",
    ],
)
def test_response_until_close(raw: bytes) -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(raw[:-1])
    reader.feed(raw[-1:])
    events = list(reader.events)
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.until_close, head.keep_alive, head.no_body) == (True, False, False)
    assert coalesce(events[1:]) == [Data(b"abc")]  # not ended until the upstream closes
    reader.feed_eof()
    assert list(reader.events)[-1] == EndOfMessage()
    assert reader.messages_completed == 1


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], id="short-content-length"),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"], id="chunked-no-last-chunk"
        ),
        pytest.param([b"HTTP/1.1 200 OK\r\nContent-Le"], id="inside-the-head"),
        pytest.param([], id="before-anything"),
    ],
)
def test_eof_before_the_end_queues_no_end_of_message(pieces: list[bytes]) -> None:
    # A cut-short message must never look complete: the caller sees no more events.
    reader, _ = response_events(*pieces, eof=True)
    assert not any(isinstance(e, EndOfMessage) for e in reader.events)
    assert reader.messages_completed == 0


def test_eof_after_a_complete_message_adds_nothing() -> None:
    reader, events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz", eof=True)
    assert kinds(events) == ["ResponseHead", "Data", "EndOfMessage"]


@pytest.mark.parametrize(
    ("status", "extra"),
    [
        (204, b""),
        (204, b"Content-Length: 3\r\n"),
        (304, b""),
        (304, b"Content-Length: 3\r\n"),
        (304, b"Transfer-Encoding: chunked\r\n"),
    ],
)
def test_204_304_have_no_body(status: int, extra: bytes) -> None:
    raw = b"HTTP/1.1 %d X\r\n%s\r\n" % (status, extra)
    reader, events = response_events(raw)
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.no_body, head.until_close, head.keep_alive) == (status, True, False, True)
    assert reader.messages_completed == 1


def test_head_response_ends_at_the_head() -> None:
    reader, events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.no_body, head.content_length, head.until_close, head.keep_alive) == (True, 1234, False, True)
    assert not reader.dirty and not reader.failed
    assert reader.messages_completed == 1


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"],
    ids=["chunked", "no-framing"],
)
def test_head_response_other_framings(head: bytes) -> None:
    reader, events = response_events(head, method=b"HEAD")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    assert events[0].no_body and not events[0].until_close  # type: ignore[attr-defined]
    assert not reader.dirty


def test_head_response_fed_in_pieces() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    reader, events = response_events(*(raw[i : i + 1] for i in range(len(raw))), method=b"HEAD")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    assert not reader.dirty


def test_head_response_with_stray_bytes_is_dirty() -> None:
    reader, events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", method=b"HEAD")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]  # the bytes are never a body
    assert reader.dirty


def test_head_response_with_stray_bytes_in_a_later_feed_is_not_a_body() -> None:
    reader, _ = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", method=b"HEAD")
    reader.feed(b"abc")
    assert not any(isinstance(e, Data) for e in reader.events)


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
)
@pytest.mark.parametrize("together", [True, False])
def test_interim_responses_are_swallowed(interim: bytes, together: bool) -> None:
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    pieces = [interim + final] if together else [interim, final]
    reader, events = response_events(*pieces, method=b"POST")
    assert kinds(events) == ["ResponseHead", "Data", "EndOfMessage"]
    assert events[0].status == 200  # type: ignore[attr-defined]
    assert events[0].headers == [(b"Content-Length", b"2")]  # type: ignore[attr-defined]
    assert reader.messages_completed == 1


def test_interim_then_final_without_body() -> None:
    _, events = response_events(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    assert events[0].status == 204  # type: ignore[attr-defined]


def test_101_switching_protocols() -> None:
    reader, events = response_events(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
    )
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.until_close, head.no_body) == (101, False, False)
    assert events[-1] == Upgrade(b"\x81\x02hi")
    assert kinds(events) in (["ResponseHead", "Upgrade"], ["ResponseHead", "EndOfMessage", "Upgrade"])
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n")  # tunnel bytes now, never parsed
    assert list(reader.events) == events


def test_101_rest_is_empty_when_the_head_ends_the_feed() -> None:
    _, events = response_events(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert events[-1] == Upgrade(b"")


RESPONSE_HAZARDS = [
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("te-and-cl", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
    ("cl-duplicate", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    ("cl-list", b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc"),
    ("te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
    ("te-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nX : a\r\nContent-Length: 0\r\n\r\n"),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 0\r\n\r\n"),
    ("http2", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("http09-ish", b"hello world\r\n\r\n"),
    ("too-many-fields", b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"),
    ("head-too-large", b"HTTP/1.1 200 OK\r\nX: " + b"a" * (65 * 1024) + b"\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [c[1] for c in RESPONSE_HAZARDS], ids=[c[0] for c in RESPONSE_HAZARDS])
def test_bad_response_is_502_without_a_head(raw: bytes) -> None:
    # A malformed upstream response is the upstream's fault: the client gets a 502.
    reader, events = response_events(raw)
    assert len(events) == 1, events
    assert isinstance(events[0], ProtocolError)
    assert events[0].status == 502
    assert reader.failed


def test_bad_chunk_in_response_body_is_502() -> None:
    _, events = response_events(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert kinds(events) == ["ResponseHead", "ProtocolError"]
    assert events[1].status == 502  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
    ],
)
def test_response_keep_alive(raw: bytes, keep_alive: bool) -> None:
    _, events = response_events(raw)
    assert events[0].keep_alive is keep_alive  # type: ignore[attr-defined]


def test_response_reader_reused_for_sequential_responses() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    first = [reader.events.popleft() for _ in range(len(reader.events))]
    assert kinds(first) == ["ResponseHead", "Data", "EndOfMessage"]
    reader.expect(b"POST")
    reader.feed(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n")
    second = list(reader.events)
    assert kinds(second) == ["ResponseHead", "Data", "EndOfMessage"]
    assert (second[0].status, second[0].reason, second[1]) == (201, b"Created", Data(b"two"))  # type: ignore[attr-defined]
    assert reader.messages_completed == 2
    assert not reader.dirty and not reader.failed


def test_response_reader_head_then_get() -> None:
    reader = ResponseReader()
    reader.expect(b"HEAD")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert kinds([reader.events.popleft() for _ in range(len(reader.events))]) == ["ResponseHead", "EndOfMessage"]
    reader.expect(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    events = list(reader.events)
    assert kinds(events) == ["ResponseHead", "Data", "EndOfMessage"]
    assert events[0].no_body is False  # type: ignore[attr-defined]
    assert events[1] == Data(b"hello")
    assert reader.messages_completed == 2
    assert not reader.dirty


@pytest.mark.parametrize(
    ("status_line", "status", "reason"),
    [
        (b"HTTP/1.1 404 Not Here At All", 404, b"Not Found"),  # custom phrase replaced, like Envoy
        (b"HTTP/1.1 200 ", 200, b"OK"),
        (b"HTTP/1.1 599 Whatever", 599, b""),  # no standard phrase: empty, still valid
    ],
)
def test_response_reason_phrase_is_the_standard_one(status_line: bytes, status: int, reason: bytes) -> None:
    _, events = response_events(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    assert (events[0].status, events[0].reason) == (status, reason)  # type: ignore[attr-defined]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), method=st.sampled_from([b"GET", b"HEAD", b"POST"]), eof=st.booleans())
def test_response_reader_never_raises(raw: bytes, method: bytes, eof: bool) -> None:
    reader = ResponseReader()
    reader.expect(method)
    reader.feed(b"HTTP/1.1 " + raw)
    if eof:
        reader.feed_eof()
    for event in reader.events:
        if isinstance(event, ProtocolError):
            assert event.status == 502
        if isinstance(event, ResponseHead):
            for name, value in event.headers:
                assert _TOKEN.match(name)
                assert b"\r" not in value and b"\n" not in value and b"\x00" not in value


# 7. serializing, checked with an independent parser (h11) ----------------------------------

_h11_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20).map(
    str.encode
)


def h11_request(raw: bytes) -> tuple[h11.Request, bytes, list[object]]:
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    events: list[object] = []
    while True:
        event = server.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            break
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    request = events[0]
    assert isinstance(request, h11.Request)
    body = b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))
    assert isinstance(events[-1], h11.EndOfMessage)
    return request, body, events


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]),
    target=_path,
    extra=st.lists(st.tuples(_token.map(str.encode), _h11_value), max_size=8),
    parts=st.lists(st.binary(min_size=1, max_size=50), max_size=5),
    chunked=st.booleans(),
)
def test_serialized_request_parses_the_same_with_h11(
    method: bytes, target: bytes, extra: list[tuple[bytes, bytes]], parts: list[bytes], chunked: bool
) -> None:
    extra = [(n, v) for n, v in extra if n.decode().lower() not in _RESERVED]  # names are bytes here
    if method in (b"GET", b"DELETE"):  # a body there is refused
        parts, chunked = [], False
    body = b"".join(parts)
    headers = [(b"Host", b"item"), *extra]
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = b"".join(chunk(p) for p in parts) + CHUNKED_END
    else:
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    raw = serialize_request_head(method, target, headers) + payload

    request, h11_body, _ = h11_request(raw)
    assert request.method == method
    assert request.target == target
    assert request.http_version == b"1.1"
    assert list(request.headers) == [(n.lower(), v) for n, v in headers]
    assert h11_body == body

    ours = coalesce(request_events(raw))
    head = ours[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.headers) == (method, target, headers)
    assert ours[1:] == ([Data(body)] if body else []) + [EndOfMessage()]


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(min_value=200, max_value=599).filter(lambda s: s not in (204, 304)),
    reason=st.sampled_from([b"OK", b"Not Found", b"Bad Gateway", b"X"]),
    extra=st.lists(st.tuples(_token.map(str.encode), _h11_value), max_size=8),
    parts=st.lists(st.binary(min_size=1, max_size=50), max_size=5),
    chunked=st.booleans(),
)
def test_serialized_response_parses_the_same_with_h11(
    status: int, reason: bytes, extra: list[tuple[bytes, bytes]], parts: list[bytes], chunked: bool
) -> None:
    extra = [(n, v) for n, v in extra if n.decode().lower() not in _RESERVED]  # names are bytes here
    body = b"".join(parts)
    headers = list(extra)
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = b"".join(chunk(p) for p in parts) + CHUNKED_END
    else:
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    raw = serialize_response_head(status, reason, headers) + payload

    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "item")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert (response.status_code, response.reason, response.http_version) == (status, reason, b"1.1")
    assert list(response.headers) == [(n.lower(), v) for n, v in headers]
    h11_body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            h11_body += bytes(event.data)
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    assert h11_body == body

    _, ours = response_events(raw)
    ours = coalesce(ours)
    head = ours[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.headers) == (status, reason_phrase(status), headers)
    assert ours[1:] == ([Data(body)] if body else []) + [EndOfMessage()]


def test_serialize_request_head_exact_bytes() -> None:
    assert serialize_request_head(b"GET", b"/x", [(b"Host", b"a"), (b"X", b"1")]) == (
        b"GET /x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n"
    )
    assert serialize_request_head(b"GET", b"/", []) == b"GET / HTTP/1.1\r\n\r\n"


def test_serialize_response_head_exact_bytes() -> None:
    assert serialize_response_head(503, b"Service Unavailable", [(b"content-length", b"0")]) == (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a", b"1\r\na\r\n"),
        (b"0123456789", b"a\r\n0123456789\r\n"),
        (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
        (b"x" * 4096, b"1000\r\n" + b"x" * 4096 + b"\r\n"),
    ],
)
def test_chunk_framing(data: bytes, wire: bytes) -> None:
    assert chunk(data) == wire


def test_chunked_end() -> None:
    assert CHUNKED_END == b"0\r\n\r\n"


def test_protocol_error_str_is_the_detail() -> None:
    assert str(ProtocolError(400, "bad thing")) == "bad thing"


@pytest.mark.parametrize(
    "host",
    [b"a", b"item:8080", b"127.0.0.1:15006", b"[::1]:80", b"xn--bcher-kva.example", b"a.b-c_d~e"],
)
def test_a_host_that_is_an_authority_is_accepted(host: bytes) -> None:
    events = request_events(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert kinds(events) == ["RequestHead", "EndOfMessage"]


@pytest.mark.parametrize(
    "host",
    [b"", b":80", b"a/b", b"user@a", b"a, b", b"a,b", b"a b", b"a\tb", b"a:80/x", b"a?b", b"a#b", b"[::1"],
)
def test_a_host_that_is_not_an_authority_is_400(host: bytes) -> None:
    """The sidecar routes by Host and the app reads it: a value the two could read
    differently (a path, userinfo, a list) is refused, as RFC 9112 §3.2 asks."""
    events = request_events(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert isinstance(events[0], ProtocolError) and events[0].status == 400, events


def test_the_asterisk_form_is_for_options_only() -> None:
    assert kinds(request_events(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")) == ["RequestHead", "EndOfMessage"]
    events = request_events(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(events[0], ProtocolError) and events[0].status == 400


def test_an_upgrade_in_http10_is_a_plain_request() -> None:
    """RFC 9110 §7.8: Upgrade means nothing in HTTP/1.0; what follows the head is the next
    request, not tunnel bytes."""
    events = request_events(
        b"GET /a HTTP/1.0\r\nConnection: Upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\nGET /b HTTP/1.0\r\n\r\n"
    )
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/a", b"/b"]
    assert heads[0].upgrade is None and not any(isinstance(e, Upgrade) for e in events)
