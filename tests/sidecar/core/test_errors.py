"""sidecar.core.errors: responses the mesh makes itself (README.md)."""

from __future__ import annotations

import h11  # noqa: TID251 - an independent parser as the test oracle, never on the data path
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core import errors
from sidecar.core.errors import ERROR_HEADER, MeshError, Reason, error_response
from sidecar.core.http1 import Data, EndOfMessage, ResponseHead, ResponseReader

ALL_REASONS = [
    (errors.NO_ROUTE, "no-route", 404),
    (errors.NO_HEALTHY_ENDPOINTS, "no-healthy-endpoints", 503),
    (errors.CIRCUIT_OPEN, "circuit-open", 503),
    (errors.OVERLOADED, "overloaded", 503),
    (errors.RATE_LIMITED, "rate-limited", 429),
    (errors.CONNECT_FAILED, "connect-failed", 503),
    (errors.UPSTREAM_RESET, "upstream-reset", 502),
    (errors.UPSTREAM_PROTOCOL_ERROR, "upstream-protocol-error", 502),
    (errors.TIMEOUT, "timeout", 504),
    (errors.FORBIDDEN, "forbidden", 403),
    (errors.BAD_REQUEST, "bad-request", 400),
    (errors.HEADERS_TOO_LARGE, "bad-request", 431),  # docs/limits.md: bad-request, 431 for oversized headers
]


@pytest.mark.parametrize(("reason", "name", "status"), ALL_REASONS, ids=[f"{r[1]}-{r[2]}" for r in ALL_REASONS])
def test_reasons_match_the_contract(reason: Reason, name: str, status: int) -> None:
    assert (reason.name, reason.status) == (name, status)


def h11_parse(raw: bytes) -> tuple[h11.Response, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += bytes(event.data)
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    return response, body


@pytest.mark.parametrize(("reason", "name", "status"), ALL_REASONS, ids=[f"{r[1]}-{r[2]}" for r in ALL_REASONS])
@pytest.mark.parametrize("close", [False, True])
def test_error_response_is_valid_http(reason: Reason, name: str, status: int, close: bool) -> None:
    raw = error_response(reason, "something broke", close=close)
    response, body = h11_parse(raw)
    headers = [(n, v) for n, v in response.headers]
    assert response.status_code == status
    assert response.http_version == b"1.1"
    assert response.reason == reason.phrase
    assert body == f"{name}: something broke\n".encode()
    expected = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"x-meshlet-error", name.encode()),
    ]
    if close:
        expected.append((b"connection", b"close"))
    assert headers == expected


def test_error_response_exact_bytes() -> None:
    assert error_response(errors.NO_ROUTE, "no service 'x'", close=True) == (
        b"HTTP/1.1 404 Not Found\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: 25\r\n"
        b"x-meshlet-error: no-route\r\n"
        b"connection: close\r\n"
        b"\r\n"
        b"no-route: no service 'x'\n"
    )
    assert ERROR_HEADER == b"x-meshlet-error"


def test_error_response_no_close_header_by_default() -> None:
    raw = error_response(errors.TIMEOUT, "slow")
    assert b"connection" not in raw.lower().split(b"\r\n\r\n")[0]


@settings(max_examples=200, deadline=None)
@given(detail=st.text(max_size=200), reason=st.sampled_from([r[0] for r in ALL_REASONS]), close=st.booleans())
def test_content_length_matches_the_body_for_any_detail(detail: str, reason: Reason, close: bool) -> None:
    raw = error_response(reason, detail, close=close)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == f"{reason.name}: {detail}\n".encode()
    # Our own reader agrees on the framing: one head, the whole body, the end.
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(raw)
    events = list(reader.events)
    assert isinstance(events[0], ResponseHead)
    assert events[0].content_length == len(body)
    assert events[0].keep_alive is not close
    assert b"".join(e.data for e in events if isinstance(e, Data)) == body
    assert events[-1] == EndOfMessage()
    # A detail never leaks into the head (no header injection).
    assert head.count(b"\r\n") == (4 if close else 3)


def test_mesh_error() -> None:
    err = MeshError(errors.TIMEOUT, "no response in 15s")
    assert (err.reason, err.detail, str(err)) == (errors.TIMEOUT, "no response in 15s", "no response in 15s")
    bare = MeshError(errors.NO_ROUTE)
    assert (bare.detail, str(bare)) == ("no-route", "no-route")
