"""Spans (sidecar/core/spans.py) in Zipkin's v2 JSON: the fields, the tags, and the
schema of POST /api/v2/spans (tests/data/zipkin-v2-span.schema.json)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.spans import CLIENT, SERVER, Endpoint, Span, encode, encode_span, http_tags, span_name

SCHEMA = json.loads((Path(__file__).parents[2] / "data" / "zipkin-v2-span.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def client_span(**changes: object) -> Span:
    span = Span(
        TRACE,
        "00f067aa0ba902b7",
        "53995c3f42cd8ad8",
        CLIENT,
        span_name(b"GET", b"/items/1?full=1"),
        Endpoint("user", "127.0.0.1", 15001),
        Endpoint("item", "127.0.0.1", 16006),
        1_764_000_000_000_000,
        tags=http_tags(b"GET", b"/items/1?full=1"),
    )
    for name, value in changes.items():
        setattr(span, name, value)
    return span


def test_a_client_span_in_zipkin_v2_json() -> None:
    span = client_span()
    span.finish(2_345, 503, "", attempt=2)
    assert span.to_json() == {
        "traceId": TRACE,
        "id": "00f067aa0ba902b7",
        "parentId": "53995c3f42cd8ad8",
        "kind": "CLIENT",
        "name": "get /items/1",
        "timestamp": 1_764_000_000_000_000,
        "duration": 2_345,
        "localEndpoint": {"serviceName": "user", "ipv4": "127.0.0.1", "port": 15001},
        "remoteEndpoint": {"serviceName": "item", "ipv4": "127.0.0.1", "port": 16006},
        "tags": {
            "http.method": "GET",
            "http.path": "/items/1",
            "http.status_code": "503",
            "error": "503",
            "meshlet.attempt": "2",
        },
    }


@pytest.mark.parametrize(
    ("status", "reason", "error"),
    [
        (200, "", None),
        (404, "", None),
        (500, "", "500"),
        (503, "circuit-open", "circuit-open"),
        (0, "timeout", "timeout"),
    ],
)
def test_errors_are_tagged_as_zipkin_shows_them(status: int, reason: str, error: str | None) -> None:
    span = client_span()
    span.finish(10, status, reason)
    assert span.tags.get("error") == error
    assert span.tags.get("meshlet.reason") == (reason or None)


def test_a_root_server_span_has_no_parent_and_a_zero_duration_becomes_one() -> None:
    span = Span(TRACE, "00f067aa0ba902b7", None, SERVER, "get /", Endpoint("item"), None, 5, debug=True)
    span.finish(0, 200)
    out = span.to_json()
    assert "parentId" not in out and "remoteEndpoint" not in out and out["duration"] == 1 and out["debug"] is True
    assert out["localEndpoint"] == {"serviceName": "item"}
    assert Endpoint("item", "::1", 80).to_json() == {"serviceName": "item", "ipv6": "::1", "port": 80}


def test_a_batch_validates_against_the_zipkin_v2_schema() -> None:
    spans = [client_span(), client_span(kind=SERVER, parent_id=None, remote=None)]
    for span in spans:
        span.finish(7, 200)
    body = json.loads(encode(spans))
    VALIDATOR.validate(body)
    assert [s["kind"] for s in body] == ["CLIENT", "SERVER"]


def test_the_schema_refuses_what_zipkin_refuses() -> None:
    good = client_span().to_json()
    for broken in (
        {**good, "traceId": TRACE.upper()},
        {**good, "id": "0" * 15},
        {**good, "kind": "client"},
        {**good, "duration": 0},
        {**good, "tags": {"http.status_code": 200}},
        {**good, "localEndpoint": {"serviceName": "user", "ipv4": "not-an-ip"}},
    ):
        assert not VALIDATOR.is_valid([broken]), broken


@given(
    method=st.sampled_from([b"GET", b"POST", b"DELETE"]),
    target=st.binary(min_size=1, max_size=40).map(lambda b: b"/" + b),
    status=st.integers(100, 599),
    duration=st.integers(-5, 10**9),
    reason=st.sampled_from(["", "timeout", "connect-failed"]),
)
def test_any_finished_span_is_valid_zipkin(
    method: bytes, target: bytes, status: int, duration: int, reason: str
) -> None:
    span = Span(
        TRACE,
        "00f067aa0ba902b7",
        None,
        SERVER,
        span_name(method, target),
        Endpoint("item", "10.0.0.1", 80),
        Endpoint("user"),
        1,
        tags=http_tags(method, target, peer="user"),
    )
    span.finish(duration, status, reason)
    VALIDATOR.validate(json.loads(encode([span])))


def test_an_encoded_span_holds_about_its_length_in_memory() -> None:
    """The exporter queues thousands of encoded spans: each must cost its bytes, not the 4 KiB
    buffer orjson allocated for it."""
    span = client_span()
    size = len(encode_span(span))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        queued = [encode_span(span) for _ in range(200)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(queued) == 200 and size < 1000
    assert held < 200 * (size + 200), f"{held / 200:.0f} bytes per span of {size}"
