"""What a request asks of the resilience layer (sidecar/layers/call.py), read from its headers."""

from __future__ import annotations

import pytest

from sidecar.layers.call import read_call

Headers = list[tuple[bytes, bytes]]


@pytest.mark.parametrize(
    ("headers", "kept", "deadline", "explain", "request_id"),
    [
        ([(b"host", b"item"), (b"accept", b"*/*")], [(b"host", b"item"), (b"accept", b"*/*")], None, False, None),
        (  # ours are taken off, in any case; the others keep their order
            [(b"a", b"1"), (b"X-Meshlet-Attempt", b"3"), (b"content-type", b"x"), (b"x-meshlet-deadline-ms", b"250")],
            [(b"a", b"1"), (b"content-type", b"x")],
            0.25,
            False,
            None,
        ),
        ([(b"x-meshlet-deadline-ms", b"soon")], [], None, False, None),  # taken off, not kept
        ([(b"x-meshlet-deadline-ms", b"9999999999")], [], None, False, None),  # too long to be one
        ([(b"x-meshlet-deadline-ms", b"-5")], [], None, False, None),
        (  # of two, the first valid one
            [(b"x-meshlet-deadline-ms", b"x"), (b"x-meshlet-deadline-ms", b"100"), (b"x-meshlet-deadline-ms", b"200")],
            [],
            0.1,
            False,
            None,
        ),
        ([(b"X-Meshlet-Explain", b"1"), (b"b", b"2")], [(b"b", b"2")], None, True, None),
        (  # the request id stays (the upstream wants it too); the first counts
            [(b"X-Request-Id", b"abc"), (b"x-request-id", b"def")],
            [(b"X-Request-Id", b"abc"), (b"x-request-id", b"def")],
            None,
            False,
            "abc",
        ),
        ([(b"x-request-id", b"r" * 200)], [(b"x-request-id", b"r" * 200)], None, False, "r" * 128),
    ],
)
def test_read_call(
    headers: Headers, kept: Headers, deadline: float | None, explain: bool, request_id: str | None
) -> None:
    given = list(headers)
    call = read_call(given)
    assert given == kept  # edited in place: the head keeps its list
    assert (call.deadline, call.explain, call.request_id) == (deadline, explain, request_id)
    assert (call.timeout, call.replay, call.fell_back) == (None, None, False)  # not known yet
