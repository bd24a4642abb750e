"""Opaque TCP's pure part (sidecar/core/tcp.py): how many endpoints a connection tries, the
state of a spliced pair, and the counts behind the meshlet_tcp_* metrics."""

from __future__ import annotations

import pytest

from sidecar.core.tcp import (
    DOWN,
    DURATION_BUCKETS,
    IDLE,
    OK,
    RESET,
    UP,
    Splice,
    TcpStats,
    connect_attempts,
)


@pytest.mark.parametrize(("endpoints", "attempts"), [(0, 1), (1, 1), (2, 2), (3, 3), (50, 3)])
def test_a_connection_tries_each_endpoint_once_and_at_most_three(endpoints: int, attempts: int) -> None:
    assert connect_attempts(endpoints) == attempts


@pytest.mark.parametrize(
    ("events", "done", "outcome"),
    [
        ([("eof", UP)], [False], OK),  # half-closed: the other way still runs
        ([("eof", UP), ("eof", DOWN)], [False, True], OK),
        ([("eof", DOWN), ("eof", UP)], [False, True], OK),
        ([("eof", UP), ("broken", RESET)], [False, None], RESET),
        ([("broken", IDLE), ("broken", RESET)], [None, None], IDLE),  # the first cause is kept
    ],
)
def test_a_pair_is_done_when_both_ways_ended_and_keeps_what_broke_it(
    events: list[tuple[str, object]], done: list[bool | None], outcome: str
) -> None:
    splice = Splice()
    seen: list[bool | None] = []
    for kind, value in events:
        if kind == "eof":
            assert isinstance(value, int)
            seen.append(splice.end_of_file(value))
        else:
            assert isinstance(value, str)
            splice.broken(value)
            seen.append(None)
    assert seen == done
    assert splice.outcome == outcome


def test_counts_by_connection_way_and_lifetime() -> None:
    stats = TcpStats()
    stats.opened("outbound")
    received, sent = stats.byte_keys("outbound", "user", "redis")
    stats.bytes[received] += 10
    stats.bytes[sent] += 25
    assert stats.open == {"outbound": 1, "inbound": 0}
    stats.closed("outbound", "user", "redis", OK, 0.5)
    stats.refused("outbound", "user", "redis", "circuit-open")  # never spliced: the gauge is back at 0
    assert stats.open == {"outbound": 0, "inbound": 0}
    assert stats.connections == {
        ("outbound", "user", "redis", OK): 1,
        ("outbound", "user", "redis", "circuit-open"): 1,
    }
    assert stats.bytes == {received: 10, sent: 25}
    histogram = stats.durations[("outbound", "user", "redis")]
    assert len(histogram) == len(DURATION_BUCKETS) + 2
    assert histogram[DURATION_BUCKETS.index(1.0)] == 1  # 0.5 s: in the bucket up to 1 s
    assert histogram[0] == 1  # 0 s: the first bucket
    assert histogram[-1] == 0.5  # the sum
    snapshot = stats.snapshot()
    assert ["outbound", "user", "redis", OK, 1] in snapshot["tcp_connections"]


def test_caller_names_are_bounded() -> None:
    stats = TcpStats(max_sources=2)
    assert [stats.name(n) for n in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
