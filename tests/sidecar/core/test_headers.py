"""sidecar.core.headers: hop-by-hop removal (RFC 9110 §7.6.1) and the forwarding fields."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.headers import (
    HOP_BY_HOP,
    VIA_VALUE,
    end_to_end,
    forward_request_headers,
    forward_response_headers,
)

H = list[tuple[bytes, bytes]]


def test_hop_by_hop_set() -> None:
    assert HOP_BY_HOP == {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
    assert VIA_VALUE == b"1.1 meshlet"


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"TE",
        b"te",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"UPGRADE",
        b"Content-Length",
        b"Expect",
    ],
)
def test_end_to_end_drops_each_hop_by_hop_field(name: bytes) -> None:
    headers = [(b"Host", b"a"), (name, b"x"), (b"Accept", b"*/*")]
    assert end_to_end(headers) == [(b"Host", b"a"), (b"Accept", b"*/*")]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [(b"Connection", b"X-Drop-Me"), (b"X-Drop-Me", b"1"), (b"X-Keep", b"2")],
            [(b"X-Keep", b"2")],
            id="named-field",
        ),
        pytest.param(
            [(b"connection", b"x-drop-me"), (b"X-DROP-ME", b"1"), (b"X-Keep", b"2")],
            [(b"X-Keep", b"2")],
            id="case-insensitive",
        ),
        pytest.param(
            [(b"Connection", b" keep-alive ,X-A,, x-b "), (b"X-A", b"1"), (b"x-b", b"2"), (b"X-C", b"3")],
            [(b"X-C", b"3")],
            id="comma-list-with-spaces-and-empties",
        ),
        pytest.param(
            [(b"Connection", b"x-a"), (b"X-B", b"2"), (b"Connection", b"X-B"), (b"X-A", b"1"), (b"X-C", b"3")],
            [(b"X-C", b"3")],
            id="multiple-connection-headers",
        ),
        pytest.param(
            [(b"X-A", b"1"), (b"X-A", b"2"), (b"Connection", b"x-a"), (b"X-B", b"3")],
            [(b"X-B", b"3")],
            id="every-occurrence-of-a-named-field",
        ),
        pytest.param(
            [(b"Connection", b"close"), (b"Close", b"x"), (b"X-Keep", b"1")],
            [(b"X-Keep", b"1")],
            id="connection-option-named-like-a-field",
        ),
        pytest.param(
            [(b"Connection", b""), (b"X-Keep", b"1")],
            [(b"X-Keep", b"1")],
            id="empty-connection",
        ),
        pytest.param(
            [
                (b"Upgrade", b"h2c"),
                (b"HTTP2-Settings", b"AAMAAABkAAQAAP__"),
                (b"Connection", b"Upgrade, HTTP2-Settings"),
            ],
            [],
            id="h2c-smuggling-attempt",
        ),
        pytest.param(
            [(b"Host", b"a"), (b"Content-Type", b"text/plain"), (b"X-A", b"1"), (b"x-a", b"2")],
            [(b"Host", b"a"), (b"Content-Type", b"text/plain"), (b"X-A", b"1"), (b"x-a", b"2")],
            id="end-to-end-untouched-in-order",
        ),
    ],
)
def test_end_to_end_drops_fields_named_in_connection(headers: H, expected: H) -> None:
    assert end_to_end(headers) == expected


def test_end_to_end_does_not_mutate_its_input() -> None:
    headers = [(b"Connection", b"x-a"), (b"X-A", b"1")]
    copy = list(headers)
    end_to_end(headers)
    assert headers == copy


@pytest.mark.parametrize(
    ("headers", "peer", "proto", "expected"),
    [
        pytest.param(
            [(b"Host", b"item"), (b"Accept", b"*/*")],
            b"10.0.0.7",
            b"http",
            [
                (b"Host", b"item"),
                (b"Accept", b"*/*"),
                (b"x-forwarded-for", b"10.0.0.7"),
                (b"x-forwarded-proto", b"http"),
                (b"via", b"1.1 meshlet"),
            ],
            id="fresh",
        ),
        pytest.param(
            [(b"Host", b"item"), (b"X-Forwarded-For", b"1.1.1.1")],
            b"10.0.0.7",
            b"http",
            [
                (b"Host", b"item"),
                (b"x-forwarded-for", b"1.1.1.1, 10.0.0.7"),
                (b"x-forwarded-proto", b"http"),
                (b"via", b"1.1 meshlet"),
            ],
            id="xff-appended",
        ),
        pytest.param(
            [(b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2"), (b"Host", b"item"), (b"x-forwarded-for", b"3.3.3.3")],
            b"::1",
            b"http",
            [
                (b"Host", b"item"),
                (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2, 3.3.3.3, ::1"),
                (b"x-forwarded-proto", b"http"),
                (b"via", b"1.1 meshlet"),
            ],
            id="multiple-xff-merged-in-order",
        ),
        pytest.param(
            [(b"Host", b"item"), (b"X-Forwarded-Proto", b"https")],
            b"10.0.0.7",
            b"http",
            [
                (b"Host", b"item"),
                (b"X-Forwarded-Proto", b"https"),
                (b"x-forwarded-for", b"10.0.0.7"),
                (b"via", b"1.1 meshlet"),
            ],
            id="proto-kept-when-present",
        ),
        pytest.param(
            [(b"Host", b"item")],
            b"10.0.0.7",
            b"https",
            [
                (b"Host", b"item"),
                (b"x-forwarded-for", b"10.0.0.7"),
                (b"x-forwarded-proto", b"https"),
                (b"via", b"1.1 meshlet"),
            ],
            id="proto-argument",
        ),
        pytest.param(
            [(b"Via", b"1.0 fred, 1.1 p.example.net"), (b"Host", b"item"), (b"via", b"1.1 other")],
            b"10.0.0.7",
            b"http",
            [
                (b"Host", b"item"),
                (b"x-forwarded-for", b"10.0.0.7"),
                (b"x-forwarded-proto", b"http"),
                (b"via", b"1.0 fred, 1.1 p.example.net, 1.1 other, 1.1 meshlet"),
            ],
            id="via-appended-after-all-via-lines",
        ),
        pytest.param(
            [
                (b"Host", b"item"),
                (b"Connection", b"keep-alive, X-Secret"),
                (b"Keep-Alive", b"timeout=5"),
                (b"X-Secret", b"s"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Content-Length", b"3"),
                (b"Expect", b"100-continue"),
                (b"TE", b"trailers"),
                (b"Trailer", b"X-T"),
                (b"Upgrade", b"websocket"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Content-Type", b"text/plain"),
            ],
            b"10.0.0.7",
            b"http",
            [
                (b"Host", b"item"),
                (b"Content-Type", b"text/plain"),
                (b"x-forwarded-for", b"10.0.0.7"),
                (b"x-forwarded-proto", b"http"),
                (b"via", b"1.1 meshlet"),
            ],
            id="hop-by-hop-dropped",
        ),
        pytest.param(
            [
                (b"Host", b"item"),
                (b"Connection", b"X-Forwarded-For, Via"),
                (b"X-Forwarded-For", b"6.6.6.6"),
                (b"Via", b"x"),
            ],
            b"10.0.0.7",
            b"http",
            [
                (b"Host", b"item"),
                (b"x-forwarded-for", b"10.0.0.7"),
                (b"x-forwarded-proto", b"http"),
                (b"via", b"1.1 meshlet"),
            ],
            id="connection-cannot-remove-our-fields",
        ),
    ],
)
def test_forward_request_headers(headers: H, peer: bytes, proto: bytes, expected: H) -> None:
    assert forward_request_headers(headers, peer, proto) == expected


def test_forward_request_headers_default_proto_is_http() -> None:
    out = forward_request_headers([(b"Host", b"a")], b"1.2.3.4")
    assert (b"x-forwarded-proto", b"http") in out


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [(b"Content-Type", b"text/plain"), (b"Content-Length", b"3")],
            [(b"Content-Type", b"text/plain"), (b"via", b"1.1 meshlet")],
            id="via-added",
        ),
        pytest.param(
            [(b"Via", b"1.1 upstream"), (b"Server", b"x")],
            [(b"Via", b"1.1 upstream, 1.1 meshlet"), (b"Server", b"x")],
            id="via-appended-in-place",
        ),
        pytest.param(
            [(b"Via", b"1.0 a"), (b"Server", b"x"), (b"via", b"1.1 b")],
            [(b"Via", b"1.0 a"), (b"Server", b"x"), (b"via", b"1.1 b, 1.1 meshlet")],
            id="via-appended-to-the-last-via-line",
        ),
        pytest.param(
            [
                (b"Connection", b"close, X-Internal"),
                (b"X-Internal", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Upgrade", b"h2c"),
                (b"Trailer", b"X-T"),
                (b"Set-Cookie", b"a=1"),
                (b"Set-Cookie", b"b=2"),
            ],
            [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"via", b"1.1 meshlet")],
            id="hop-by-hop-dropped-repeated-fields-kept",
        ),
    ],
)
def test_forward_response_headers(headers: H, expected: H) -> None:
    assert forward_response_headers(headers) == expected


# properties -----------------------------------------------------------------------------

_name = st.sampled_from(
    [
        b"Connection",
        b"connection",
        b"Keep-Alive",
        b"TE",
        b"Upgrade",
        b"X-A",
        b"x-a",
        b"X-B",
        b"Via",
        b"Host",
        b"Content-Length",
    ]
) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8).map(str.encode)
_value = st.sampled_from([b"x-a", b"X-B, close", b"upgrade", b"", b"1", b" x-a , keep-alive "]) | st.binary(
    max_size=10
).filter(lambda v: b"\r" not in v and b"\n" not in v)
_headers = st.lists(st.tuples(_name, _value), max_size=12)


def _named(headers: H) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in value.split(b",")} - {b""}
    return named


@settings(max_examples=500, deadline=None)
@given(_headers)
def test_end_to_end_property(headers: H) -> None:
    out = end_to_end(headers)
    drop = set(HOP_BY_HOP) | _named(headers)
    # Exactly the surviving fields, in their order.
    assert out == [(n, v) for n, v in headers if n.lower() not in drop]
    assert end_to_end(out) == out  # idempotent: no Connection is left to name anything


@settings(max_examples=500, deadline=None)
@given(_headers, st.sampled_from([b"10.0.0.1", b"::1"]))
def test_forward_request_headers_property(headers: H, peer: bytes) -> None:
    out = forward_request_headers(headers, peer)
    names = [n.lower() for n, _ in out]
    assert not set(names) & HOP_BY_HOP
    assert names.count(b"x-forwarded-for") == 1
    assert names.count(b"via") == 1
    assert names.count(b"x-forwarded-proto") >= 1
    xff = dict((n.lower(), v) for n, v in out)[b"x-forwarded-for"]
    assert xff.endswith(peer)
    assert dict((n.lower(), v) for n, v in out)[b"via"].endswith(VIA_VALUE)
