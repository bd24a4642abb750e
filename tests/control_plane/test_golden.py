"""Golden metrics from sidecar metrics (control_plane/golden.py), on text rendered by the
sidecar's own telemetry."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.golden import Counts, parse, quantile, rows, since
from sidecar.telemetry import Telemetry, render


def page(telemetry: Telemetry) -> str:
    return render(lambda: [telemetry.snapshot()]).decode()


def traffic(telemetry: Telemetry, n: int, *hop: str, code: int = 200, reason: str = "", seconds: float = 0.003) -> None:
    direction, source, destination, route = hop
    for _ in range(n):
        telemetry.request_finished(direction, source, destination, route, code, reason, seconds)


def test_a_window_per_service_edge_and_route() -> None:
    user, item = Telemetry(), Telemetry()
    traffic(user, 5, "outbound", "user", "item", "item/list")
    before_user, before_item = parse(page(user)), parse(page(item))
    traffic(user, 90, "outbound", "user", "item", "item/list")
    traffic(user, 6, "outbound", "user", "item", "", code=503, reason="no-healthy-endpoints")
    traffic(user, 4, "outbound", "user", "item", "item/list", code=200, reason="incomplete")  # caller left: no failure
    traffic(item, 90, "inbound", "user", "item", "")
    traffic(item, 10, "inbound", "user", "item", "", code=500, seconds=0.2)
    windows = [(since(before_user, parse(page(user))), 10.0), (since(before_item, parse(page(item))), 10.0)]

    (service,) = rows(windows, "service")
    assert (service.name, service.requests, service.rps) == ("item", 100, 10.0)
    assert service.success == pytest.approx(0.9)
    assert service.p50 is not None and 0.0025 < service.p50 <= 0.005  # 90 in the 2.5-5 ms bucket
    assert service.p99 is not None and 0.1 < service.p99 <= 0.25  # the slow 500s

    (edge,) = rows(windows, "edge")
    assert (edge.name, edge.requests, edge.rps) == ("user → item", 100, 10.0)
    assert edge.success == pytest.approx(0.94)  # the mesh's 503s failed; the callers that left did not

    routes = rows(windows, "route")
    assert [(r.name, r.requests) for r in routes] == [("item item/list", 94), ("item -", 6)]
    assert routes[1].success == 0


@pytest.mark.parametrize(
    ("grpc_status", "failed"),
    [("0", False), ("5", False), ("1", False), ("3", False), ("14", True), ("4", True), ("13", True), ("2", True)]
    + [("15", True), ("", False)],
)
def test_a_grpc_server_fault_is_a_failure_though_its_http_status_is_200(grpc_status: str, failed: bool) -> None:
    item = Telemetry()
    before = parse(page(item))
    for _ in range(10):
        item.request_finished("inbound", "user", "item", "", 200, "", 0.003, grpc_status=grpc_status)
    (service,) = rows([(since(before, parse(page(item))), 10.0)], "service")
    assert service.success == (0.0 if failed else 1.0)


def test_by_caller_each_verified_caller_and_the_plaintext_ones_as_the_callee_saw_them() -> None:
    item, user = Telemetry(), Telemetry()
    traffic(item, 8, "inbound", "user", "item", "")
    traffic(item, 2, "inbound", "unauthenticated", "item", "", code=403, reason="forbidden")
    traffic(user, 5, "outbound", "user", "item", "")  # the caller's side: not a caller row
    windows = [(parse(page(item)), 10.0), (parse(page(user)), 10.0)]
    assert [(r.name, r.requests) for r in rows(windows, "caller")] == [
        ("user → item", 8),
        ("unauthenticated → item", 2),
    ]


def test_a_counter_that_went_down_was_reset_and_counts_from_zero() -> None:
    before = {("inbound", "a", "b", ""): Counts(100, 1, {0.005: 100, math.inf: 100})}
    after = {("inbound", "a", "b", ""): Counts(7, 0, {0.005: 7, math.inf: 7})}
    assert since(before, after)[("inbound", "a", "b", "")].requests == 7
    assert since(after, after) == {}  # nothing happened: no row


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.1: 50, 0.2: 100, math.inf: 100}, 0.1),
        (0.75, {0.1: 50, 0.2: 100, math.inf: 100}, 0.15),  # linear within (0.1, 0.2]
        (0.5, {0.1: 100, math.inf: 100}, 0.05),  # the first bucket starts at 0
        (0.99, {0.1: 10, 0.2: 10, math.inf: 100}, 0.2),  # past the last finite bound: that bound
        (0.5, {0.1: 0, math.inf: 0}, None),  # no requests
    ],
)
def test_quantiles_as_prometheus_computes_them(q: float, buckets: dict[float, float], expected: float | None) -> None:
    got = quantile(q, buckets)
    assert got == expected if expected is None else got == pytest.approx(expected)


@given(st.lists(st.floats(min_value=0.0001, max_value=20), min_size=1, max_size=200))
def test_the_median_lies_in_the_bucket_of_the_true_median(durations: list[float]) -> None:
    telemetry = Telemetry()
    for seconds in durations:
        telemetry.request_finished("inbound", "a", "b", "", 200, "", seconds)
    (row,) = rows([(parse(page(telemetry)), 1.0)], "service")
    true_median = sorted(durations)[math.ceil(len(durations) / 2) - 1]
    bounds = [0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
    low = max(b for b in bounds if b < true_median)
    high = min(b for b in bounds if b >= true_median)
    assert row.p50 is not None and low <= row.p50 <= high


def test_an_unknown_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="by must be one of service, edge, route"):
        rows([], "pod")
