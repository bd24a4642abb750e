"""HTTP/2 towards an upstream, the pure part: the version a request goes upstream in, the
HEADERS it becomes, the response head its HEADERS make."""

from __future__ import annotations

import pytest

from sidecar.core.h2_upstream import (
    H2ResponseHead,
    ResponseFieldsError,
    request_fields,
    trailer_fields,
    upstream_version,
)


@pytest.mark.parametrize(
    ("came_in", "protocol", "sidecar", "goes"),
    [
        # to another sidecar: the version it came in, whatever its app declared
        ("2", "", True, "2"),
        ("1.1", "", True, "1.1"),
        ("1.1", "grpc", True, "1.1"),
        ("1.1", "http2", True, "1.1"),
        ("2", "http1", True, "2"),
        ("1.0", "", True, "1.1"),
        # to an app: what it declared
        ("1.1", "http2", False, "2"),
        ("1.1", "grpc", False, "2"),
        ("2", "grpc", False, "2"),
        ("2", "http1", False, "1.1"),
        ("1.1", "http1", False, "1.1"),
        # undeclared: the version it came in
        ("2", "", False, "2"),
        ("1.1", "", False, "1.1"),
        ("1.0", "", False, "1.1"),
    ],
)
def test_the_version_a_request_goes_upstream_in(came_in: str, protocol: str, sidecar: bool, goes: str) -> None:
    assert upstream_version(came_in, protocol, sidecar) == goes


def test_request_fields_pseudo_first_no_connection_specific_fields_te_trailers_only() -> None:
    forwarded = [
        (b"Content-Type", b"application/grpc"),
        (b"Host", b"other"),
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"5"),
        (b"Proxy-Connection", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"via", b"1.1 meshlet"),
    ]
    original = [(b"TE", b"deflate, Trailers")]
    fields = request_fields(b"POST", b"svc:80", b"/pkg.S/M", forwarded, original, None)
    assert fields == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"svc:80"),
        (b":path", b"/pkg.S/M"),
        (b"content-type", b"application/grpc"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"via", b"1.1 meshlet"),
        (b"te", b"trailers"),
    ]


@pytest.mark.parametrize(
    ("original", "length", "tail"),
    [
        ([(b"te", b"gzip")], None, []),
        ([], 12, [(b"content-length", b"12")]),
        ([(b"te", b"trailers")], 0, [(b"te", b"trailers"), (b"content-length", b"0")]),
    ],
)
def test_request_fields_te_and_length(
    original: list[tuple[bytes, bytes]], length: int | None, tail: list[tuple[bytes, bytes]]
) -> None:
    assert request_fields(b"GET", b"a", b"/", [], original, length)[4:] == tail


def test_a_response_head_from_its_fields() -> None:
    head = H2ResponseHead([(b":status", b"404"), (b"content-length", b"7"), (b"x-a", b"b")])
    assert (head.status, head.reason, head.content_length) == (404, b"Not Found", 7)
    assert head.headers == [(b"content-length", b"7"), (b"x-a", b"b")]
    assert H2ResponseHead([(b":status", b"299")]).reason == b""


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [(b":status", b"20")],
        [(b":status", b"abc")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b":status", b"200"), (b"content-length", b"-1")],
        [(b":status", b"200"), (b"content-length", b"9" * 19)],
        [(b":status", b"200"), *[(b"x-f", b"v")] * 101],
        [(b":status", b"200"), (b"x-big", b"v" * 70_000)],
    ],
    ids=[
        "no-status",
        "short-status",
        "bad-status",
        "request-pseudo",
        "negative-length",
        "huge-length",
        "fields",
        "size",
    ],
)
def test_a_response_head_the_upstream_got_wrong(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ResponseFieldsError):
        H2ResponseHead(fields)


def test_trailers() -> None:
    assert trailer_fields([(b"grpc-status", b"0")]) == [(b"grpc-status", b"0")]
    with pytest.raises(ResponseFieldsError):
        trailer_fields([(b":status", b"200")])
    with pytest.raises(ResponseFieldsError):
        trailer_fields([(b"x", b"y")] * 101)
