"""The embedded trace store (control_plane/traces.py): Zipkin's query semantics on a
bounded store."""

from __future__ import annotations

from typing import Any

from control_plane.traces import TraceStore

T1, T2 = "a" * 32, "b" * 32
SECOND = 1_000_000  # µs


def span(trace: str, span_id: str, service: str, start: int, duration: int, **extra: Any) -> dict[str, Any]:
    return {
        "traceId": trace,
        "id": span_id,
        "kind": extra.pop("kind", "SERVER"),
        "name": extra.pop("name", "get /items"),
        "timestamp": start,
        "duration": duration,
        "localEndpoint": {"serviceName": service},
        **extra,
    }


def store() -> TraceStore:
    traces = TraceStore()
    traces.add(
        [
            span(T1, "1" * 16, "Gateway", 100 * SECOND, 50_000, kind="CLIENT"),
            span(T1, "2" * 16, "user", 100 * SECOND + 1_000, 40_000, name="get /users/1"),
            span(T2, "3" * 16, "item", 200 * SECOND, 2_000),
        ],
        now=200.0,
    )
    return traces


def test_services_and_span_names_as_zipkin_answers_them() -> None:
    traces = store()
    assert traces.services() == ["gateway", "item", "user"]  # lower-cased, as Zipkin keeps them
    assert traces.span_names("USER") == ["get /users/1"]
    assert traces.span_names("nobody") == []


def test_a_trace_by_id_in_start_order_and_64_bit_ids_join_128_bit_ones() -> None:
    traces = store()
    assert [s["id"] for s in traces.trace(T1) or []] == ["1" * 16, "2" * 16]
    traces.add([span("c" * 16, "4" * 16, "item", 300 * SECOND, 1)], now=300.0)
    found = traces.trace("0" * 16 + "c" * 16)
    assert found is not None and found[0]["traceId"] == "0" * 16 + "c" * 16
    assert traces.trace("d" * 32) is None


def test_traces_filtered_by_service_name_duration_and_time_newest_first() -> None:
    traces = store()
    everything = traces.traces(end_ts=300_000, lookback=300_000)
    assert [t[0]["traceId"] for t in everything] == [T2, T1]
    assert [t[0]["traceId"] for t in traces.traces(service="user", end_ts=300_000)] == [T1]
    assert traces.traces(service="user", span_name="get /items", end_ts=300_000) == []
    assert [t[0]["traceId"] for t in traces.traces(min_duration=10_000, end_ts=300_000)] == [T1]
    assert [t[0]["traceId"] for t in traces.traces(max_duration=10_000, end_ts=300_000)] == [T2]
    assert [t[0]["traceId"] for t in traces.traces(end_ts=150_000, lookback=100_000)] == [T1]
    assert len(traces.traces(end_ts=300_000, limit=1)) == 1


def test_a_span_sent_twice_is_kept_once() -> None:
    traces = store()
    traces.add([span(T2, "3" * 16, "item", 200 * SECOND, 9_000)], now=201.0)
    (only,) = traces.trace(T2) or []
    assert only["duration"] == 9_000 and traces.span_count == 3


def test_bounded_by_count_and_by_age_whole_traces_least_recently_written_first() -> None:
    traces = TraceStore(max_spans=3, max_age=60)
    traces.add([span(T1, "1" * 16, "a", 1, 1), span(T1, "2" * 16, "a", 1, 1)], now=0.0)
    traces.add([span(T2, "3" * 16, "b", 1, 1), span(T2, "4" * 16, "b", 1, 1)], now=1.0)
    assert traces.trace(T1) is None and traces.trace(T2) is not None  # 4 spans > 3: T1 went, whole
    assert (traces.span_count, traces.dropped) == (2, 2)
    traces.add([span("c" * 32, "5" * 16, "c", 1, 1)], now=100.0)
    assert traces.trace(T2) is None and traces.services() == ["c"]  # T2 was older than 60 s


def call(trace: str, ids: tuple[str, str], caller: str, callee: str, start: int, **server: Any) -> list[dict[str, Any]]:
    """One call as two sidecars record it: the caller's CLIENT span, the callee's SERVER span under it."""
    client_id, server_id = ids
    return [
        span(trace, client_id, caller, start, 10, kind="CLIENT", remoteEndpoint={"serviceName": callee}),
        span(trace, server_id, callee, start + 1, 8, parentId=client_id, **server),
    ]


def test_dependencies_link_callers_to_callees_with_call_and_error_counts() -> None:
    traces = TraceStore()
    traces.add(
        [
            span(T1, "0" * 15 + "1", "gateway", 100 * SECOND, 50),  # the root SERVER span: no caller
            *call(T1, ("0" * 15 + "2", "0" * 15 + "3"), "gateway", "user", 100 * SECOND + 1),
            *call(T1, ("0" * 15 + "4", "0" * 15 + "5"), "user", "item", 100 * SECOND + 2, tags={"error": "503"}),
            *call(T1, ("0" * 15 + "6", "0" * 15 + "7"), "user", "item", 100 * SECOND + 3),  # the retry
            # a call to something outside the mesh: a CLIENT span and no SERVER span under it
            span(T1, "0" * 15 + "8", "item", 100 * SECOND + 4, 5, kind="CLIENT", remoteEndpoint={"serviceName": "DB"}),
        ],
        now=100.0,
    )
    traces.add(call(T2, ("1" * 16, "2" * 16), "gateway", "user", 200 * SECOND), now=200.0)
    assert traces.dependencies(end_ts=300_000) == [
        {"parent": "gateway", "child": "user", "callCount": 2, "errorCount": 0},
        {"parent": "item", "child": "db", "callCount": 1, "errorCount": 0},
        {"parent": "user", "child": "item", "callCount": 2, "errorCount": 1},
    ]
    # the window: only T2 ended within the 50 s before 210 s
    assert traces.dependencies(end_ts=210_000, lookback=50_000) == [
        {"parent": "gateway", "child": "user", "callCount": 1, "errorCount": 0}
    ]
    assert traces.remote_services("USER") == ["item"]
    assert traces.remote_services("gateway") == ["user"]
    assert traces.remote_services("nobody") == []


def test_a_server_span_whose_caller_recorded_nothing_links_from_its_remote_endpoint() -> None:
    traces = TraceStore()
    traces.add(
        [span(T1, "1" * 16, "item", 100 * SECOND, 5, parentId="9" * 16, remoteEndpoint={"serviceName": "cron"})], 100.0
    )
    shared = [  # Zipkin's shared span: CLIENT and SERVER with one id
        span(T2, "2" * 16, "user", 100 * SECOND, 9, kind="CLIENT"),
        span(T2, "2" * 16, "item", 100 * SECOND + 1, 7),
    ]
    traces.add(shared, 100.0)
    assert traces.dependencies(end_ts=101_000) == [
        {"parent": "cron", "child": "item", "callCount": 1, "errorCount": 0},
        {"parent": "user", "child": "item", "callCount": 1, "errorCount": 0},
    ]


def test_trace_many_returns_the_traces_held() -> None:
    traces = store()
    assert [t[0]["traceId"] for t in traces.trace_many([T1, "d" * 32, T2])] == [T1, T2]
