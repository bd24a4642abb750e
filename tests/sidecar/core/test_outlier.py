"""Outlier detection (sidecar/core/outlier.py): ejection, its cap, probation, panic. The clock is a float."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.outlier import OutlierConfig, OutlierDetector
from sidecar.core.services import Endpoint

A, B, C, D = (Endpoint(f"10.0.0.{i}", 80) for i in range(1, 5))
FOUR = (A, B, C, D)
ALL_OF_THEM = OutlierConfig(max_ejected_percent=100.0)


def detector(
    endpoints: tuple[Endpoint, ...] = FOUR, config: OutlierConfig | None = None
) -> tuple[OutlierDetector, list[tuple[Endpoint, float]]]:
    ejections: list[tuple[Endpoint, float]] = []
    d = OutlierDetector(config or OutlierConfig(), endpoints, lambda e, s: ejections.append((e, s)))
    return d, ejections


def fail(d: OutlierDetector, endpoint: Endpoint, now: float, times: int = 5) -> None:
    for _ in range(times):
        d.started(endpoint, now)
        d.record(endpoint, now, failed=True)


def state(d: OutlierDetector, endpoint: Endpoint, now: float) -> str:
    (row,) = [row for row in d.snapshot(now) if row["address"] == endpoint.address]
    return row["state"]


@pytest.mark.parametrize(
    ("threshold", "failures", "ejected"),
    [(5, 4, False), (5, 5, True), (5, 7, True), (1, 1, True), (3, 2, False), (3, 3, True)],
)
def test_ejected_on_the_nth_consecutive_failure_not_before(threshold: int, failures: int, ejected: bool) -> None:
    d, ejections = detector(config=OutlierConfig(consecutive_failures=threshold))
    fail(d, A, 0.0, failures)
    assert d.counts(0.0)["ejected"] == int(ejected)
    assert (A in d.available(0.0)[0]) is not ejected
    assert ejections == ([(A, 30.0)] if ejected else [])


@pytest.mark.parametrize(
    ("outcomes", "ejected"),
    [
        ("fffff", True),
        ("ffffsffff", False),  # a success resets the count
        ("ffffsfffff", True),  # five in a row after it
        ("sffffsffffs", False),
        ("fsfsfsfsfsfsf", False),
    ],
)
def test_a_success_resets_the_count(outcomes: str, ejected: bool) -> None:
    d, _ = detector()
    for outcome in outcomes:
        d.record(A, 0.0, failed=outcome == "f")
    assert state(d, A, 0.0) == ("ejected" if ejected else "healthy")


def test_ejection_time_grows_with_each_ejection_up_to_the_cap() -> None:
    d, ejections = detector()
    now = 0.0
    fail(d, A, now)
    expected = [30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0, 300.0, 300.0]
    for seconds in expected[1:]:
        now += ejections[-1][1]
        d.started(A, now)  # its probation request, which fails: ejected again at once
        d.record(A, now, failed=True)
        assert ejections[-1] == (A, seconds)
    assert ejections == [(A, s) for s in expected]
    assert d.snapshot(now)[0]["times_ejected"] == 12


@pytest.mark.parametrize(
    ("base", "maximum", "seconds"),
    [(30.0, 300.0, [30.0, 60.0, 90.0]), (10.0, 25.0, [10.0, 20.0, 25.0]), (5.0, 2.0, [2.0, 2.0, 2.0])],
)
def test_ejection_time_is_base_times_ejections_capped(base: float, maximum: float, seconds: list[float]) -> None:
    d, ejections = detector(config=OutlierConfig(base_ejection=base, max_ejection=maximum))
    now = 0.0
    fail(d, A, now)
    for _ in seconds[1:]:
        now += ejections[-1][1]
        d.record(A, now, failed=True)
    assert [s for _, s in ejections] == seconds


def test_an_ejection_lasts_exactly_its_time() -> None:
    d, _ = detector()
    fail(d, A, 100.0)
    assert d.available(129.999)[0] == (B, C, D)
    assert state(d, A, 129.999) == "ejected"
    assert d.available(130.0)[0] == FOUR  # over: in probation, offered again
    assert state(d, A, 130.0) == "probation"


@pytest.mark.parametrize(
    ("n", "percent", "most"),
    [
        (4, 50.0, 2),
        (1, 50.0, 0),
        (3, 50.0, 1),
        (2, 50.0, 1),
        (5, 0.0, 0),
        (4, 100.0, 4),
        (10, 29.0, 2),
        (100, 29.0, 29),
    ],
)
def test_never_more_than_max_ejected_percent_rounded_down(n: int, percent: float, most: int) -> None:
    endpoints = tuple(Endpoint(f"10.1.0.{i}", 80) for i in range(n))
    d, ejections = detector(endpoints, OutlierConfig(max_ejected_percent=percent))
    for endpoint in endpoints:
        fail(d, endpoint, 0.0, 10)
    assert d.counts(0.0)["ejected"] == most
    assert len(ejections) == most
    assert d.max_ejected == most


def test_one_endpoint_at_fifty_percent_is_never_ejected() -> None:
    d, ejections = detector((A,))
    fail(d, A, 0.0, 100)
    assert d.available(0.0) == ((A,), False)
    assert ejections == []
    assert d.snapshot(0.0)[0]["consecutive_failures"] == 100


def test_an_ejection_with_no_room_waits_for_the_next_failure_after_room_frees() -> None:
    d, ejections = detector((A, B))  # 50 % of 2: one at a time
    fail(d, A, 0.0)
    fail(d, B, 1.0)  # no room: not ejected, but its count stays
    assert ejections == [(A, 30.0)]
    assert d.snapshot(1.0)[1] == {
        "address": B.address,
        "state": "healthy",
        "consecutive_failures": 5,
        "times_ejected": 0,
        "ejected_for_s": 0.0,
    }
    assert state(d, A, 30.0) == "probation"  # room freed: not enough on its own
    assert state(d, B, 30.0) == "healthy"
    fail(d, B, 31.0, 1)  # its next failure ejects it
    assert ejections == [(A, 30.0), (B, 30.0)]
    d.record(A, 32.0, failed=True)  # A fails its probation but there is no room: stays in probation
    assert ejections == [(A, 30.0), (B, 30.0)]
    assert d.counts(32.0) == {"healthy": 0, "ejected": 1, "probation": 1}
    assert d.available(32.0) == ((A,), False)


def test_a_blocked_count_is_reset_by_a_success() -> None:
    d, ejections = detector((A, B))
    fail(d, A, 0.0)
    fail(d, B, 0.0)
    d.record(B, 0.0, failed=False)
    fail(d, B, 30.0, 4)  # room now, but only four in a row
    assert ejections == [(A, 30.0)]


def test_probation_admits_one_request_at_a_time() -> None:
    d, _ = detector()
    fail(d, A, 0.0)
    assert d.available(30.0) == (FOUR, False)
    d.started(A, 30.0)
    assert d.available(30.0) == ((B, C, D), False)  # its probation request is in flight
    assert d.available(40.0) == ((B, C, D), False)
    d.release(A)  # cancelled: no verdict, the slot is free again
    assert d.available(40.0) == (FOUR, False)
    assert state(d, A, 40.0) == "probation"
    d.started(A, 41.0)
    d.started(B, 41.0)  # a healthy endpoint is never held
    assert d.available(41.0) == ((B, C, D), False)


def test_probation_success_makes_it_healthy() -> None:
    d, ejections = detector()
    fail(d, A, 0.0)
    d.started(A, 30.0)
    d.record(A, 31.0, failed=False)
    assert d.counts(31.0) == {"healthy": 4, "ejected": 0, "probation": 0}
    assert d.available(31.0)[0] is FOUR
    fail(d, A, 40.0, 4)  # a fresh count
    assert state(d, A, 40.0) == "healthy"
    fail(d, A, 40.0, 1)
    assert ejections == [(A, 30.0), (A, 60.0)]  # times_ejected was kept


def test_probation_failure_ejects_again_at_once_for_longer() -> None:
    d, ejections = detector()
    fail(d, A, 0.0)
    d.started(A, 30.0)
    d.record(A, 30.5, failed=True)
    assert ejections == [(A, 30.0), (A, 60.0)]
    assert state(d, A, 90.4) == "ejected"
    assert d.available(90.4)[0] == (B, C, D)
    assert state(d, A, 90.5) == "probation"


@pytest.mark.parametrize(("healthy_for", "next_ejection"), [(299.0, 60.0), (300.0, 30.0), (1000.0, 30.0)])
def test_times_ejected_decays_to_zero_after_a_whole_max_ejection_healthy(
    healthy_for: float, next_ejection: float
) -> None:
    d, ejections = detector()
    fail(d, A, 0.0)
    d.record(A, 30.0, failed=False)  # back to healthy at 30
    assert d.snapshot(30.0 + healthy_for)[0]["times_ejected"] == (1 if next_ejection == 60.0 else 0)
    fail(d, A, 30.0 + healthy_for)
    assert ejections[-1] == (A, next_ejection)


def test_outcomes_while_ejected_are_ignored() -> None:
    d, ejections = detector()
    fail(d, A, 0.0)
    d.record(A, 10.0, failed=False)  # a request begun before the ejection, or sent in panic
    fail(d, A, 10.0, 3)
    assert d.snapshot(10.0)[0] == {
        "address": A.address,
        "state": "ejected",
        "consecutive_failures": 5,
        "times_ejected": 1,
        "ejected_for_s": 20.0,
    }
    assert ejections == [(A, 30.0)]


def test_update_keeps_the_state_of_endpoints_still_present() -> None:
    d, ejections = detector(config=ALL_OF_THEM)
    fail(d, A, 0.0)
    fail(d, B, 0.0, 3)
    heavier_a = Endpoint(A.host, A.port, weight=5)  # the same address: the same endpoint
    heavier_b = Endpoint(B.host, B.port, weight=7)
    E = Endpoint("10.0.0.5", 80)
    d.update([heavier_a, heavier_b, E])
    assert [(r["address"], r["state"], r["consecutive_failures"]) for r in d.snapshot(1.0)] == [
        (A.address, "ejected", 5),
        (B.address, "healthy", 3),
        (E.address, "healthy", 0),
    ]
    fail(d, B, 1.0, 2)  # its count went on: 3 + 2
    assert ejections == [(A, 30.0), (B, 30.0)]
    assert ejections[-1][0].weight == 7  # reported as the new endpoint object
    available = d.available(31.0)[0]
    assert available == (A, B, E)
    assert available[0].weight == 5  # the new endpoint objects are the ones handed out
    d.record(C, 31.0, failed=True)  # dropped: ignored
    d.started(C, 31.0)
    d.release(C)
    d.update([B, E])
    d.update([A, B, E])  # dropped, then back: a fresh start
    assert [r["state"] for r in d.snapshot(31.0)] == ["healthy", "probation", "healthy"]
    assert d.snapshot(31.0)[0]["times_ejected"] == 0


def test_update_to_fewer_endpoints_frees_ejections_over_the_cap() -> None:
    d, _ = detector()
    fail(d, A, 0.0)
    fail(d, B, 10.0)
    d.update([A, B])  # 50 % of 2 is 1: A's ends sooner, it goes to probation
    assert [r["state"] for r in d.snapshot(10.0)] == ["probation", "ejected"]
    assert d.available(10.0) == ((A,), False)


def test_panic_when_nothing_is_left_offers_every_endpoint() -> None:
    endpoints = (A, B)
    d, _ = detector(endpoints, ALL_OF_THEM)
    fail(d, A, 0.0)
    fail(d, B, 0.0)
    result = d.available(1.0)
    assert result == ((A, B), True)
    assert result[0] is endpoints
    assert d.available(30.0) == ((A, B), False)  # both in probation


def test_panic_when_the_only_probation_endpoint_is_busy() -> None:
    d, _ = detector((A,), ALL_OF_THEM)
    fail(d, A, 0.0)
    d.started(A, 30.0)
    assert d.available(30.0) == ((A,), True)
    d.record(A, 31.0, failed=False)
    assert d.available(31.0) == ((A,), False)


def test_available_is_the_same_object_when_nothing_is_ejected() -> None:
    d, _ = detector()
    first = d.available(0.0)
    assert first[0] is FOUR  # the tuple given, not a copy
    for now in (0.0, 1.0, 1e9):
        d.started(B, now)
        d.record(B, now, failed=now == 1.0)
        assert d.available(now) is first
    fail(d, A, 2.0)
    ejected = d.available(2.0)
    assert ejected == ((B, C, D), False)
    assert d.available(3.0) is ejected  # cached until something changes
    d.record(A, 32.0, failed=False)
    assert d.available(32.0) is first  # back to the common case


def test_snapshot_and_counts() -> None:
    d, _ = detector()
    fail(d, A, 0.0)  # ejected until 30
    fail(d, B, 0.0)  # ejected until 30
    d.record(B, 30.0, failed=True)  # its probation fails: ejected again, until 90
    fail(d, C, 50.0, 3)
    now = 60.0
    assert d.snapshot(now) == [
        {
            "address": "10.0.0.1:80",
            "state": "probation",
            "consecutive_failures": 5,
            "times_ejected": 1,
            "ejected_for_s": 0.0,
        },
        {
            "address": "10.0.0.2:80",
            "state": "ejected",
            "consecutive_failures": 6,
            "times_ejected": 2,
            "ejected_for_s": 30.0,
        },
        {
            "address": "10.0.0.3:80",
            "state": "healthy",
            "consecutive_failures": 3,
            "times_ejected": 0,
            "ejected_for_s": 0.0,
        },
        {
            "address": "10.0.0.4:80",
            "state": "healthy",
            "consecutive_failures": 0,
            "times_ejected": 0,
            "ejected_for_s": 0.0,
        },
    ]
    assert d.counts(now) == {"healthy": 2, "ejected": 1, "probation": 1}
    assert d.snapshot(89.75)[1]["ejected_for_s"] == 0.25
    assert d.counts(90.0) == {"healthy": 2, "ejected": 0, "probation": 2}


def test_ipv6_addresses_in_the_snapshot() -> None:
    d, _ = detector((Endpoint("::1", 8080),))
    assert d.snapshot(0.0)[0]["address"] == "[::1]:8080"


def test_no_callback_is_fine() -> None:
    d = OutlierDetector(OutlierConfig(), FOUR)
    fail(d, A, 0.0)
    assert d.counts(0.0)["ejected"] == 1


@pytest.mark.parametrize(
    "config",
    [
        {"consecutive_failures": 0},
        {"base_ejection": 0.0},
        {"max_ejection": -1.0},
        {"max_ejected_percent": 100.5},
        {"max_ejected_percent": -1.0},
    ],
)
def test_nonsense_configs_are_refused(config: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierConfig(**config)  # type: ignore[arg-type]


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 10.0, 30.0, 90.0, 400.0])),
        st.tuples(st.sampled_from(["fail", "ok", "start", "release"]), st.integers(0, 5)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 6), percent=st.integers(0, 100), threshold=st.integers(1, 3), ops=_ops)
def test_the_cap_holds_and_there_is_always_somewhere_to_go(
    n: int, percent: int, threshold: int, ops: list[tuple[str, float]]
) -> None:
    endpoints = tuple(Endpoint(f"10.2.0.{i}", 80) for i in range(n))
    d, _ = detector(endpoints, OutlierConfig(consecutive_failures=threshold, max_ejected_percent=float(percent)))
    most = n * percent // 100  # floor(max_ejected_percent / 100 × n), in integers
    now = 0.0
    for op, arg in ops:
        if op == "advance":
            now += arg
        else:
            endpoint = endpoints[int(arg) % n]
            if op == "start":
                d.started(endpoint, now)
            elif op == "release":
                d.release(endpoint)
            else:
                d.record(endpoint, now, failed=op == "fail")
        offered, panic = d.available(now)
        states = {row["address"]: row["state"] for row in d.snapshot(now)}
        ejected = [e for e in endpoints if states[e.address] == "ejected"]
        assert len(ejected) <= most
        assert offered
        if panic:
            assert offered is endpoints  # all of them
        else:
            assert not set(ejected) & set(offered)
        assert sum(d.counts(now).values()) == n
