"""gRPC's pure rules (sidecar/core/grpc.py): what a gRPC call is, grpc-timeout read and
written, grpc-message's percent-encoding, and the gRPC status of mesh errors and responses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.grpc import FAILED_LABELS, LABELS, SERVER_FAULTS, Status
from sidecar.core import errors
from sidecar.core.grpc import (
    MESH_ERRORS,
    MalformedTimeout,
    decode_message,
    encode_message,
    final_status,
    format_timeout,
    head_status,
    is_grpc,
    mesh_error_status,
    parse_status,
    parse_timeout,
    rpc_names,
    seconds_to_ns,
    status_from_http,
    trailers_only,
)


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc+json", True),
        (b"application/grpc;charset=utf-8", True),
        (b"Application/GRPC", True),
        (b"application/grpc-web", False),  # grpc-web is HTTP/1.1 framing of its own: not a gRPC call
        (b"application/grpc-web+proto", False),
        (b"application/grpcx", False),
        (b"application/json", False),
        (b"", False),
    ],
)
def test_what_a_grpc_call_is(content_type: bytes, grpc: bool) -> None:
    assert is_grpc(content_type) is grpc


@pytest.mark.parametrize(
    ("value", "nanoseconds"),
    [
        (b"1H", 3_600_000_000_000),
        (b"2M", 120_000_000_000),
        (b"1S", 1_000_000_000),
        (b"250m", 250_000_000),
        (b"7u", 7_000),
        (b"99999999n", 99_999_999),
        (b"99999999H", 99_999_999 * 3_600_000_000_000),
        (b"0n", 0),  # what grpc-go sends for a deadline already passed: no time left
        (b"00000001S", 1_000_000_000),
    ],
)
def test_grpc_timeout_values(value: bytes, nanoseconds: int) -> None:
    assert parse_timeout(value) == nanoseconds


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"S",
        b"1",
        b"100",
        b"123456789S",  # nine digits
        b"1s",  # units are case-sensitive: s is not a unit, S is
        b"1h",
        b"1 S",
        b" 1S",
        b"-1S",
        b"+1S",
        b"1.5S",
        b"1SS",
        "١S".encode(),  # a digit, but not an ASCII one
        b"0x1S",
    ],
)
def test_malformed_grpc_timeouts_are_refused(value: bytes) -> None:
    with pytest.raises(MalformedTimeout):
        parse_timeout(value)


@pytest.mark.parametrize(
    ("nanoseconds", "value"),
    [
        (0, b"0n"),
        (-5, b"0n"),
        (1, b"1n"),
        (1_000_000_000, b"1S"),
        (2 * 3_600_000_000_000, b"2H"),
        (90_000_000_000, b"90S"),  # exact in seconds: 90S, not 1.5 minutes
        (1_500_000_000, b"1500m"),
        (100_000_000, b"100m"),
        (1_234_567_891, b"1234567u"),  # no unit is exact within 8 digits: the finest that fits, rounded down
        (123_456_789_123, b"123456m"),
        (10**8 * 3_600_000_000_000, b"99999999H"),  # past 8 digits of hours: the most there is
    ],
)
def test_grpc_timeout_is_written_in_the_shortest_exact_unit(nanoseconds: int, value: bytes) -> None:
    assert format_timeout(nanoseconds) == value


@given(st.integers(min_value=0, max_value=99_999_999), st.sampled_from([b"H", b"M", b"S", b"m", b"u", b"n"]))
def test_a_written_timeout_reads_back_exactly(value: int, unit: bytes) -> None:
    nanoseconds = parse_timeout(b"%d%s" % (value, unit))
    written = format_timeout(nanoseconds)
    assert parse_timeout(written) == nanoseconds
    assert len(written) <= 9


@given(st.integers(min_value=1, max_value=10**20))
def test_a_written_timeout_never_promises_more_than_it_was_given(nanoseconds: int) -> None:
    written = parse_timeout(format_timeout(nanoseconds))
    assert written <= nanoseconds
    assert written > 0


def test_seconds_become_nanoseconds_without_float_noise() -> None:
    assert format_timeout(seconds_to_ns(0.1)) == b"100m"
    assert format_timeout(seconds_to_ns(1.5)) == b"1500m"
    assert seconds_to_ns(-1.0) == 0


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("no route", b"no route"),
        ("100%", b"100%25"),
        ("line\nbreak", b"line%0Abreak"),
        ("héllo", b"h%C3%A9llo"),
        ("~ and \x7f", b"~ and %7F"),
        ("", b""),
    ],
)
def test_grpc_message_percent_encoding(text: str, encoded: bytes) -> None:
    assert encode_message(text) == encoded
    assert decode_message(encoded) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (b"%", "%"),
        (b"%g", "%g"),
        (b"%4", "%4"),
        (b"50%%41", "50%A"),
        (b"%e2%82%ac", "€"),
        (b"%FF", "\ufffd"),  # not UTF-8: replaced, never an error
        (b"a%2", "a%2"),
    ],
)
def test_a_broken_grpc_message_decodes_without_failing(value: bytes, text: str) -> None:
    assert decode_message(value) == text


@given(st.text())
def test_grpc_message_round_trip(text: str) -> None:
    encoded = encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert decode_message(encoded) == text


@given(st.binary())
def test_decoding_any_bytes_never_fails(value: bytes) -> None:
    decode_message(value)


def test_every_mesh_error_has_a_grpc_status() -> None:
    reasons = {value.name for value in vars(errors).values() if isinstance(value, errors.Reason)}
    assert reasons <= set(MESH_ERRORS), reasons - set(MESH_ERRORS)


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("no-route", Status.UNIMPLEMENTED),
        ("no-healthy-endpoints", Status.UNAVAILABLE),
        ("circuit-open", Status.UNAVAILABLE),
        ("connect-failed", Status.UNAVAILABLE),
        ("overloaded", Status.UNAVAILABLE),
        ("upstream-reset", Status.UNAVAILABLE),
        ("timeout", Status.DEADLINE_EXCEEDED),
        ("rate-limited", Status.RESOURCE_EXHAUSTED),
        ("forbidden", Status.PERMISSION_DENIED),
        ("bad-request", Status.INTERNAL),
        ("internal", Status.INTERNAL),
        ("something-new", Status.UNKNOWN),
    ],
)
def test_mesh_errors_as_grpc_statuses(reason: str, status: Status) -> None:
    assert mesh_error_status(reason) == status


@pytest.mark.parametrize(
    ("http", "status"),
    [
        (400, Status.INTERNAL),
        (401, Status.UNAUTHENTICATED),
        (403, Status.PERMISSION_DENIED),
        (404, Status.UNIMPLEMENTED),
        (429, Status.UNAVAILABLE),
        (502, Status.UNAVAILABLE),
        (503, Status.UNAVAILABLE),
        (504, Status.UNAVAILABLE),
        (500, Status.UNKNOWN),
        (301, Status.UNKNOWN),
    ],
)
def test_http_statuses_as_grpc_statuses(http: int, status: Status) -> None:
    assert status_from_http(http) == status


@pytest.mark.parametrize(
    ("value", "status"),
    [(b"0", 0), (b"14", 14), (b"16", 16), (b"17", Status.UNKNOWN), (b"99999", Status.UNKNOWN)]
    + [(b"", Status.INTERNAL), (b"x", Status.INTERNAL), (b"-1", Status.INTERNAL), (b"1" * 11, Status.INTERNAL)],
)
def test_grpc_status_values(value: bytes, status: int) -> None:
    assert parse_status(value) == status


GRPC = [(b"content-type", b"application/grpc")]


@pytest.mark.parametrize(
    ("http", "headers", "trailers", "complete", "head", "final"),
    [
        # a normal response: the status comes in the trailers
        (200, GRPC, [(b"grpc-status", b"0")], True, None, Status.OK),
        (200, GRPC, [(b"Grpc-Status", b"14"), (b"grpc-message", b"x")], True, None, Status.UNAVAILABLE),
        # Trailers-Only: in the head
        (200, [*GRPC, (b"grpc-status", b"14")], None, True, Status.UNAVAILABLE, Status.UNAVAILABLE),
        (200, [*GRPC, (b"grpc-status", b"5")], None, True, Status.NOT_FOUND, Status.NOT_FOUND),
        # ended without a status: UNKNOWN; cut short: nobody's to judge
        (200, GRPC, None, True, None, Status.UNKNOWN),
        (200, GRPC, [(b"x-other", b"1")], True, None, Status.UNKNOWN),
        (200, GRPC, None, False, None, None),
        # not gRPC at all, or an HTTP error: what a client makes of it
        (200, [(b"content-type", b"text/html")], None, True, Status.UNKNOWN, Status.UNKNOWN),
        (200, [], None, True, Status.UNKNOWN, Status.UNKNOWN),
        (503, [(b"content-type", b"text/plain")], None, True, Status.UNAVAILABLE, Status.UNAVAILABLE),
        (404, [*GRPC, (b"grpc-status", b"0")], None, True, Status.UNIMPLEMENTED, Status.UNIMPLEMENTED),
    ],
)
def test_the_grpc_status_of_a_response(
    http: int,
    headers: list[tuple[bytes, bytes]],
    trailers: list[tuple[bytes, bytes]] | None,
    complete: bool,
    head: int | None,
    final: int | None,
) -> None:
    assert head_status(http, headers) == head
    assert final_status(http, headers, trailers, complete) == final


def test_a_trailers_only_answer() -> None:
    headers = trailers_only(Status.UNAVAILABLE, "the circuit is open: 100%", "circuit-open", ((b"retry-after", b"1"),))
    assert headers == [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"the circuit is open: 100%25"),
        (b"x-meshlet-error", b"circuit-open"),
        (b"retry-after", b"1"),
    ]
    long = trailers_only(Status.INTERNAL, "é" * 10_000, "internal")
    assert len(decode_message(long[2][1])) == 1024  # the mesh's own message is bounded


@pytest.mark.parametrize(
    ("path", "names"),
    [
        (b"/pkg.Service/Method", ("pkg.Service", "Method")),
        (b"/Service/M", ("Service", "M")),
        (b"/a/b/c", ("", "")),
        (b"/onlyservice", ("", "")),
        (b"//Method", ("", "")),
        (b"/Service/", ("", "")),
        (b"Service/Method", ("", "")),
    ],
)
def test_rpc_names(path: bytes, names: tuple[str, str]) -> None:
    assert rpc_names(path) == names


def test_the_status_labels_are_bounded_and_the_failures_are_the_server_faults() -> None:
    assert LABELS == tuple(str(i) for i in range(17))
    assert FAILED_LABELS == {"2", "4", "13", "14", "15"}
    assert {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS} == set(
        SERVER_FAULTS
    )
