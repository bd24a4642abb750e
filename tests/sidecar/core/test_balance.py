"""sidecar.core.balance: the load balancers (ewma, least_request, round_robin, random) and zones."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.balance import (
    DEFAULT_KIND,
    KINDS,
    Balancer,
    LeastRequest,
    PeakEwma,
    RandomBalancer,
    RoundRobin,
    ZoneAware,
    make_balancer,
)
from sidecar.core.services import Endpoint

A = Endpoint("10.0.0.1", 80)
B = Endpoint("10.0.0.2", 80, weight=3)
C = Endpoint("10.0.0.3", 80, weight=2)


def picks(rr: RoundRobin, n: int, exclude: frozenset[Endpoint] = frozenset()) -> list[Endpoint | None]:
    return [rr.pick(exclude) for _ in range(n)]


def test_equal_weights_alternate() -> None:
    x, y = Endpoint("x", 1), Endpoint("y", 1)
    assert picks(RoundRobin([x, y]), 5) == [x, y, x, y, x]


def test_weighted_order_over_a_cycle() -> None:
    rr = RoundRobin([A, B, C])
    assert picks(rr, 6) == [A, B, B, B, C, C]
    assert picks(rr, 6) == [A, B, B, B, C, C]  # the next cycle is the same


@pytest.mark.parametrize("cycles", [1, 3, 10])
def test_weighted_distribution(cycles: int) -> None:
    rr = RoundRobin([A, B, C])
    counts = Counter(picks(rr, 6 * cycles))
    assert counts == {A: 1 * cycles, B: 3 * cycles, C: 2 * cycles}


def test_exclude_skips_and_keeps_rotating() -> None:
    rr = RoundRobin([A, B, C])
    assert picks(rr, 6, frozenset({B})) == [A, C, C, A, C, C]


def test_exclude_matches_by_address_not_weight_or_labels() -> None:
    rr = RoundRobin([A, B])
    same_as_b = Endpoint("10.0.0.2", 80, weight=7)
    assert set(picks(rr, 8, frozenset({same_as_b}))) == {A}


@pytest.mark.parametrize(
    "exclude",
    [frozenset({A, B, C}), frozenset({Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)})],
)
def test_all_excluded_is_none(exclude: frozenset[Endpoint]) -> None:
    rr = RoundRobin([A, B, C])
    assert rr.pick(exclude) is None
    assert picks(rr, 6) == [A, B, B, B, C, C]  # still usable afterwards, from where it was


def test_no_endpoints_is_none() -> None:
    rr = RoundRobin([])
    assert rr.pick() is None
    assert rr.pick(frozenset({A})) is None


def test_exclude_nothing_in_the_ring() -> None:
    rr = RoundRobin([A])
    assert picks(rr, 3, frozenset({Endpoint("elsewhere", 1)})) == [A, A, A]


_endpoint_lists = st.lists(
    st.builds(
        Endpoint,
        host=st.sampled_from(["a", "b", "c", "d", "e"]),
        port=st.integers(min_value=1, max_value=3),
        weight=st.integers(min_value=1, max_value=5),
    ),
    max_size=6,
    unique_by=lambda e: e.address,
)


@settings(max_examples=300, deadline=None)
@given(endpoints=_endpoint_lists, data=st.data())
def test_round_robin_properties(endpoints: list[Endpoint], data: st.DataObject) -> None:
    rr = RoundRobin(endpoints)
    total = sum(e.weight for e in endpoints)
    # Over whole cycles every endpoint gets exactly its weight in turns.
    counts = Counter(picks(rr, 2 * total))
    assert counts == {e: 2 * e.weight for e in endpoints}
    # With an exclude set: never an excluded endpoint; None only when all are excluded.
    exclude = frozenset(data.draw(st.sets(st.sampled_from(endpoints))) if endpoints else set())
    allowed = [e for e in endpoints if e not in exclude]
    if allowed:
        chosen = picks(rr, total, exclude)
        assert all(e in allowed for e in chosen)
        # and over a whole cycle, every allowed endpoint gets a turn
        assert set(chosen) == set(allowed)
    else:
        assert all(e is None for e in picks(rr, 3, exclude))


# --- the balancers of docs/policy.md: one interface, shared per-endpoint state ---

X = Endpoint("10.0.1.1", 80)
Y = Endpoint("10.0.1.2", 80)
Z = Endpoint("10.0.1.3", 80)


class Script(random.Random):
    """An rng whose ``random()`` returns the values given, in order (and fails past them)."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        assert self.values, "the balancer drew more numbers than scripted"
        return self.values.pop(0)


def loaded(balancer: Balancer, **in_flight: int) -> Balancer:
    """``in_flight``: x=2 starts two requests on X (y → Y, z → Z)."""
    for name, count in in_flight.items():
        for _ in range(count):
            balancer.started({"x": X, "y": Y, "z": Z}[name])
    return balancer


def test_make_balancer_kinds() -> None:
    rng = random.Random(0)
    made = {kind: type(make_balancer(kind, [X], rng)) for kind in KINDS}
    assert made == {
        "ewma": PeakEwma,
        "least_request": LeastRequest,
        "round_robin": RoundRobin,
        "random": RandomBalancer,
    }
    assert DEFAULT_KIND == "ewma"
    with pytest.raises(ValueError, match="'fastest' is not one of ewma, least_request, round_robin, random"):
        make_balancer("fastest", [X], rng)


# Two draws pick candidates i = int(r1 * n) and j = int(r2 * (n - 1)), skipping i: with X, Y, Z,
# (0.0, 0.5) draws X then Z; (0.5, 0.0) Y then X; (0.9, 0.9) Z then Y; (0.0, 0.0) X then Y.
@pytest.mark.parametrize(
    ("in_flight", "draws", "expected"),
    [
        ({}, (0.0, 0.5), X),  # a tie goes to the first drawn
        ({}, (0.5, 0.0), Y),
        ({}, (0.9, 0.9), Z),
        ({"x": 1}, (0.0, 0.5), Z),  # in-flight counts move the choice
        ({"x": 1}, (0.0, 0.0), Y),
        ({"z": 3, "x": 1}, (0.0, 0.5), X),  # lower of the two drawn, not of all: Y (0) is not drawn
        ({"z": 3, "y": 2}, (0.9, 0.9), Y),
        ({"x": 1, "y": 1, "z": 1}, (0.5, 0.0), Y),
    ],
)
def test_least_request_power_of_two(in_flight: dict[str, int], draws: tuple[float, float], expected: Endpoint) -> None:
    balancer = loaded(LeastRequest([X, Y, Z], Script(*draws)), **in_flight)
    assert balancer.pick() == expected


@pytest.mark.parametrize(
    ("x_weight", "x_in_flight", "y_in_flight", "expected", "x_score"),
    [
        (3, 2, 0, X, 1.0),  # (2 + 1) / 3 = 1.0 ties with Y's 1 / 1: the first drawn (X)
        (3, 3, 0, Y, 4 / 3),
        (3, 1, 0, X, 2 / 3),
        (1, 1, 0, Y, 2.0),
        (2, 1, 1, X, 1.0),  # 2 / 2 against Y's 2 / 1
    ],
)
def test_least_request_weights_divide_the_score(
    x_weight: int, x_in_flight: int, y_in_flight: int, expected: Endpoint, x_score: float
) -> None:
    heavy = Endpoint(X.host, X.port, weight=x_weight)
    balancer = loaded(LeastRequest([heavy, Y], Script(0.0, 0.0)), x=x_in_flight, y=y_in_flight)
    assert balancer.scores(0.0) == [(X.address, x_score), (Y.address, float(y_in_flight + 1))]
    assert balancer.pick() == expected


def test_one_candidate_needs_no_draw() -> None:
    for kind in ("ewma", "least_request"):
        assert make_balancer(kind, [X], Script()).pick() == X
        assert make_balancer(kind, [X, Y], Script()).pick(frozenset({Y})) == X


def test_ewma_peak_then_decay_exact() -> None:
    ewma = PeakEwma([X], Script(), decay=10.0)
    assert ewma.scores(0.0) == [(X.address, 0.03)]  # no response yet: the default rtt
    ewma.finished(X, 0.05, now=0.0)
    assert ewma.scores(0.0) == [(X.address, 0.05)]  # the first response replaces the prior
    ewma.finished(X, 0.2, now=1.0)
    assert ewma.scores(1.0) == [(X.address, 0.2)]  # slower than the cost: the peak, at once
    ewma.finished(X, 0.02, now=11.0)
    # 10 s later, faster: w = exp(-10 / 10); cost = 0.2 w + 0.02 (1 - w)
    assert ewma.scores(11.0) == [(X.address, pytest.approx(0.08621829941085962, rel=1e-12))]
    # Scoring decays the cost towards 0 since the last response: 10 s more is another exp(-1).
    assert ewma.scores(21.0) == [(X.address, pytest.approx(0.031717939806019134, rel=1e-12))]
    # ... down to the 1 ms floor.
    assert ewma.scores(1000.0) == [(X.address, 0.001)]
    # A fast response is floored at 1 ms too, and the in-flight count multiplies the cost.
    other = PeakEwma([X], Script())
    other.finished(X, 0.0001, now=5.0)
    other.started(X)
    other.started(X)
    assert other.scores(5.0) == [(X.address, pytest.approx(0.003, rel=1e-12))]


def test_ewma_equal_times_do_not_decay() -> None:
    ewma = PeakEwma([X], Script())
    ewma.finished(X, 0.5, now=3.0)
    ewma.finished(X, 0.01, now=3.0)  # w = exp(0) = 1: the cost stays
    ewma.finished(X, 0.01, now=2.0)  # out of order: no negative elapsed time either
    assert ewma.scores(3.0) == [(X.address, 0.5)]


@pytest.mark.parametrize(
    ("rtt", "failed", "cost"),
    [
        (0.002, True, 5.0),  # a fast failure is observed as the penalty
        (7.0, True, 7.0),  # a slow one as itself
        (0.002, False, 0.002),
    ],
)
def test_ewma_failure_penalty(rtt: float, failed: bool, cost: float) -> None:
    ewma = PeakEwma([X, Y], Script(0.0, 0.0), failure_penalty=5.0)
    ewma.finished(Y, 0.05, now=10.0)
    ewma.started(X)
    ewma.finished(X, rtt, now=10.0, failed=failed)
    assert ewma.scores(10.0) == [(X.address, cost), (Y.address, 0.05)]
    assert ewma.pick() == (Y if failed else X)


def test_ewma_weights_and_in_flight_move_the_choice() -> None:
    heavy = Endpoint(X.host, X.port, weight=4)
    ewma = PeakEwma([heavy, Y], Script(0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    ewma.finished(heavy, 0.1, now=0.0)
    ewma.finished(Y, 0.03, now=0.0)
    assert ewma.scores(0.0) == [(X.address, 0.025), (Y.address, 0.03)]
    assert ewma.pick() == X  # 0.1 / 4 < 0.03
    ewma.started(X)
    assert ewma.pick() == Y  # 0.1 * 2 / 4 > 0.03
    ewma.started(Y)
    ewma.started(Y)
    assert ewma.pick() == X  # 0.05 < 0.03 * 3


def test_ewma_idle_endpoint_is_tried_again() -> None:
    """A penalised endpoint is not starved forever: its score decays while others answer."""
    ewma = PeakEwma([X, Y], random.Random(1))
    ewma.finished(X, 0.0, now=0.0, failed=True)  # 5 s
    ewma.finished(Y, 0.01, now=0.0)
    ewma.started(Y)  # Y always has one request in flight: score 0.02
    assert {ewma.pick() for _ in range(50)} == {Y}
    ewma.started(Y)
    ewma.finished(Y, 0.01, now=60.0)  # time moves with the traffic: 5 exp(-6) = 0.0124 < 0.02
    assert {ewma.pick() for _ in range(50)} == {X}
    # X answers fast: the stored 5 s blends with it over the 60.5 s since: w = exp(-6.05)
    ewma.finished(X, 0.01, now=60.5)
    assert ewma.scores(60.5)[0] == (X.address, pytest.approx(5 * math.exp(-6.05) + 0.01 * (1 - math.exp(-6.05))))
    assert ewma.scores(60.5)[0][1] == pytest.approx(0.0217657, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_update_keeps_state_of_kept_endpoints(kind: str) -> None:
    balancer = make_balancer(kind, [X, Y], random.Random(0))
    states = balancer.states
    balancer.finished(X, 0.4, now=1.0)
    balancer.finished(Y, 0.4, now=1.0)
    for endpoint in (X, X, Y):
        balancer.started(endpoint)
    x_again = Endpoint(X.host, X.port, labels={"version": "v2"}, weight=2)
    balancer.update([x_again, Z])
    assert (states.in_flight(X), states.in_flight(Y), states.in_flight(Z)) == (2, 0, 0)
    assert len(states) == 2 and Y not in states
    assert balancer.pick({X}) == Z
    picked = balancer.pick({Z})
    assert picked == X and picked is not None and picked.weight == 2  # the new snapshot's endpoint
    assert balancer.pick({X, Z}) is None
    scores = dict(balancer.scores(1.0))
    if kind == "ewma":
        # the cost is kept too; Z, never measured, is taken to be typical here (0.4 s)
        assert scores == {X.address: 0.4 * 3 / 2, Z.address: pytest.approx(0.4)}
    elif kind == "least_request":
        assert scores == {X.address: 3 / 2, Z.address: 1.0}
    else:
        assert scores == {X.address: 2.0, Z.address: 1.0}
    balancer.update([x_again, Y, Z])  # Y comes back with a fresh state
    assert states.in_flight(Y) == 0
    if kind == "ewma":
        assert dict(balancer.scores(1.0))[Y.address] == pytest.approx(0.4)  # fresh: taken to be typical
    balancer.finished(Y, 0.01, now=2.0)  # a request from before: never below 0
    assert states.in_flight(Y) == 0


def test_finished_for_unknown_endpoint_is_ignored() -> None:
    ewma = PeakEwma([X], Script())
    ewma.started(Y)
    ewma.finished(Y, 1.0, now=1.0)
    assert Y not in ewma.states and ewma.scores(1.0) == [(X.address, 0.03)]


def test_round_robin_update_keeps_rotating() -> None:
    rr = RoundRobin([X, Y, Z])
    assert picks(rr, 2) == [X, Y]
    rr.update([X, Y, Z, A])
    assert picks(rr, 4) == [Z, A, X, Y]
    rr.update([X])
    assert picks(rr, 2) == [X, X]
    rr.update([])
    assert rr.pick() is None


def test_round_robin_accepts_any_container_and_an_rng() -> None:
    rr = RoundRobin([X, Y], random.Random(0))
    assert [rr.pick([X]), rr.pick((X,)), rr.pick({X: 1})] == [Y, Y, Y]
    assert rr.scores(0.0) == [(X.address, 1.0), (Y.address, 1.0)]


@pytest.mark.parametrize("kind", KINDS)
def test_exclude_and_none(kind: str) -> None:
    balancer = make_balancer(kind, [X, Y, Z], random.Random(3))
    assert {balancer.pick(frozenset({X, Z})) for _ in range(30)} == {Y}
    assert {balancer.pick([Endpoint(Y.host, Y.port, weight=9)]) for _ in range(60)} == {X, Z}
    assert balancer.pick({X, Y, Z}) is None
    assert {balancer.pick() for _ in range(60)} == {X, Y, Z}
    empty = make_balancer(kind, [], random.Random(3))
    assert empty.pick() is None and empty.pick({X}) is None and empty.scores(0.0) == []


def test_random_weighted_distribution() -> None:
    light, middle, heavy = (Endpoint(f"10.0.2.{w}", 80, weight=w) for w in (1, 3, 6))
    balancer = RandomBalancer([light, middle, heavy], random.Random(42))
    n = 10_000
    counts = Counter(balancer.pick() for _ in range(n))
    shares = {e.weight: counts[e] / n for e in (light, middle, heavy)}
    assert shares == {
        1: pytest.approx(0.1, abs=0.015),
        3: pytest.approx(0.3, abs=0.02),
        6: pytest.approx(0.6, abs=0.02),
    }
    # With one excluded: the others in proportion to their weights (3 : 1).
    counts = Counter(balancer.pick({heavy}) for _ in range(n))
    assert set(counts) == {light, middle}
    assert counts[middle] / n == pytest.approx(0.75, abs=0.02), counts


def test_random_scan_after_redraws() -> None:
    light, heavy = Endpoint("l", 1, weight=1), Endpoint("h", 1, weight=99)
    # Three draws land on the excluded heavy one; then one draw over what is left.
    script = Script(0.5, 0.5, 0.5, 0.4)  # 0.5 * 101 = 50.5: heavy's [1, 100)
    assert RandomBalancer([light, heavy, X], script).pick({heavy}) == light  # 0.4 * 2 = 0.8: light's [0, 1)
    assert not script.values
    script = Script(0.995)  # without an exclude set: one draw, 0.995 * 101 = 100.5: X's [100, 101)
    assert RandomBalancer([light, heavy, X], script).pick() == X
    assert not script.values
    assert RandomBalancer([light, heavy], Script(0.9, 0.9, 0.9)).pick({heavy, light}) is None


@pytest.mark.parametrize(("draw", "expected"), [(0.0, X), (0.2499, X), (0.25, Y), (0.9999, Y)])
def test_random_ranges_are_half_open(draw: float, expected: Endpoint) -> None:
    # weights 1 and 3: X has [0, 1) of 4, Y [1, 4)
    assert RandomBalancer([X, Endpoint(Y.host, Y.port, weight=3)], Script(draw)).pick() == expected


# --- zone preference ---

A1 = Endpoint("10.1.0.1", 80, labels={"zone": "a"})
A2 = Endpoint("10.1.0.2", 80, labels={"zone": "a"})
B1 = Endpoint("10.2.0.1", 80, labels={"zone": "b"})
NOZONE = Endpoint("10.3.0.1", 80)


@pytest.mark.parametrize("kind", KINDS)
def test_zone_preference_and_failover(kind: str) -> None:
    zoned = ZoneAware(kind, [A1, B1, A2, NOZONE], "a", random.Random(5))
    assert {zoned.pick() for _ in range(60)} == {A1, A2}
    assert {zoned.pick({A1}) for _ in range(30)} == {A2}
    assert {zoned.pick({A1, A2}) for _ in range(60)} == {B1, NOZONE}  # failover to all
    assert zoned.pick({A1, A2, B1, NOZONE}) is None
    assert [a for a, _ in zoned.scores(0.0)] == [A1.address, B1.address, A2.address, NOZONE.address]


@pytest.mark.parametrize("zone", [None, "c"])
def test_no_local_zone_is_all_endpoints(zone: str | None) -> None:
    zoned = ZoneAware("round_robin", [A1, B1, NOZONE], zone, random.Random(0))
    assert [zoned.pick() for _ in range(3)] == [A1, B1, NOZONE]


def test_zone_update_moves_endpoints_between_zones() -> None:
    zoned = ZoneAware("least_request", [A1, B1], "b", random.Random(0))
    assert {zoned.pick() for _ in range(20)} == {B1}
    zoned.started(B1)
    b1_now_in_a = Endpoint(B1.host, B1.port, labels={"zone": "a"})
    zoned.update([A1, b1_now_in_a])  # no local endpoint left
    assert zoned.states.in_flight(B1) == 1
    assert {zoned.pick() for _ in range(20)} == {A1}  # B1 has a request in flight
    assert zoned.pick({A1}) == b1_now_in_a
    zoned.update([A1, B1, A2])
    assert {zoned.pick() for _ in range(20)} == {B1}
    zoned.update([A1])
    assert len(zoned.states) == 1 and zoned.states.in_flight(B1) == 0


def test_zone_state_is_one_per_endpoint() -> None:
    """What ZoneAware hears reaches the local balancer: one state, not two copies."""
    zoned = ZoneAware("least_request", [A1, A2, B1], "a", Script(0.0, 0.0, 0.0, 0.0))
    zoned.started(A1)
    assert zoned.pick() == A2  # draws A1 then A2: A1 has a request in flight
    zoned.finished(A1, 0.01, now=1.0)
    assert zoned.pick() == A1
    ewma = ZoneAware("ewma", [A1, A2, B1], "a", Script(0.0, 0.0, 0.0, 0.0))
    ewma.finished(A1, 0.5, now=1.0)
    ewma.finished(A2, 0.02, now=1.0)
    assert ewma.pick() == A2
    # B1, never measured, scores as a typical success here: 0.5 then 0.02, an EWMA of 0.1
    assert dict(ewma.scores(1.0)) == {A1.address: 0.5, A2.address: 0.02, B1.address: pytest.approx(0.452)}
    ewma.finished(A2, 1.0, now=1.0, failed=True)
    assert ewma.pick() == A1


# --- a simulation: virtual time, a fixed arrival rate, one endpoint ten times slower ---


def simulate(kind: str, seed: int = 7, requests: int = 10_000, rate: float = 200.0) -> tuple[float, float]:
    """(the slow endpoint's share of requests, the p99 latency in seconds)."""
    fast = [Endpoint(f"10.9.0.{i}", 80) for i in range(3)]
    slow = Endpoint("10.9.0.9", 80)
    base = {**{e: 0.010 for e in fast}, slow: 0.100}
    balancer = make_balancer(kind, [*fast, slow], random.Random(seed))
    service = random.Random(seed + 1)  # the endpoints' own jitter
    in_flight = dict.fromkeys(base, 0)
    pending: list[tuple[float, int, Endpoint, float]] = []  # (finishes at, seq, endpoint, rtt)
    latencies: list[float] = []
    to_slow = 0
    for seq in range(requests):
        now = seq / rate
        while pending and pending[0][0] <= now:
            done, _, answered, took = heapq.heappop(pending)
            in_flight[answered] -= 1
            balancer.finished(answered, took, done)
        endpoint = balancer.pick()
        assert endpoint is not None
        # ±20 % jitter, and 2 % slower for each request already in flight there (queueing).
        rtt = base[endpoint] * (0.8 + 0.4 * service.random()) * (1 + 0.02 * in_flight[endpoint])
        in_flight[endpoint] += 1
        balancer.started(endpoint)
        heapq.heappush(pending, (now + rtt, seq, endpoint, rtt))
        latencies.append(rtt)
        to_slow += endpoint == slow
    latencies.sort()
    return to_slow / requests, latencies[int(0.99 * requests)]


def test_simulation_ewma_avoids_the_slow_endpoint() -> None:
    ewma_share, ewma_p99 = simulate("ewma")
    rr_share, rr_p99 = simulate("round_robin")
    report = (
        f"ewma: {ewma_share:.1%} to the slow endpoint, p99 {ewma_p99 * 1000:.1f} ms; "
        f"round_robin: {rr_share:.1%}, p99 {rr_p99 * 1000:.1f} ms"
    )
    assert rr_share == 0.25, report  # the simulation does send the slow one its turns
    assert ewma_share < 0.10, report
    assert ewma_p99 < rr_p99, report
    assert simulate("ewma") == (ewma_share, ewma_p99)  # deterministic


# --- properties over every kind ---

_kinds = st.sampled_from([*KINDS, *(f"zone:{k}" for k in KINDS)])
_zoned_lists = st.lists(
    st.builds(
        Endpoint,
        host=st.sampled_from(["a", "b", "c", "d", "e"]),
        port=st.integers(min_value=1, max_value=3),
        labels=st.sampled_from([{}, {"zone": "a"}, {"zone": "b"}]),
        weight=st.integers(min_value=1, max_value=5),
    ),
    max_size=6,
    unique_by=lambda e: e.address,
)


def build(kind: str, endpoints: list[Endpoint], seed: int) -> Balancer:
    if kind.startswith("zone:"):
        return ZoneAware(kind.removeprefix("zone:"), endpoints, "a", random.Random(seed))
    return make_balancer(kind, endpoints, random.Random(seed))


@settings(max_examples=100, deadline=None)
@given(kind=_kinds, endpoints=_zoned_lists, seed=st.integers(0, 2**32), data=st.data())
def test_pick_properties(kind: str, endpoints: list[Endpoint], seed: int, data: st.DataObject) -> None:
    balancer = build(kind, endpoints, seed)
    for endpoint in data.draw(st.lists(st.sampled_from(endpoints), max_size=8)) if endpoints else []:
        balancer.started(endpoint)
        balancer.finished(endpoint, data.draw(st.floats(0, 10)), now=data.draw(st.floats(0, 100)))
    exclude = frozenset(data.draw(st.sets(st.sampled_from(endpoints))) if endpoints else set())
    allowed = {e for e in endpoints if e not in exclude}
    for _ in range(10):
        chosen = balancer.pick(exclude)
        if allowed:
            assert chosen in allowed
        else:
            assert chosen is None


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("started"), st.integers(0, 5)),
        st.tuples(st.just("finished"), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("update"), st.sets(st.integers(0, 5))),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(kind=_kinds, ops=_ops)
def test_in_flight_never_negative(kind: str, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    pool = [Endpoint(f"10.5.0.{i}", 80, labels={"zone": "ab"[i % 2]}) for i in range(6)]
    present = set(range(4))
    balancer = build(kind, [pool[i] for i in sorted(present)], 0)
    states = balancer.states
    model = dict.fromkeys(present, 0)
    for now, op in enumerate(ops):
        if op[0] == "started":
            balancer.started(pool[op[1]])
            if op[1] in present:
                model[op[1]] += 1
        elif op[0] == "finished":
            balancer.finished(pool[op[1]], 0.01, float(now), failed=op[2])
            if op[1] in present:
                model[op[1]] = max(0, model[op[1]] - 1)
        else:
            present = op[1]
            balancer.update([pool[i] for i in sorted(present)])
            model = {i: model.get(i, 0) for i in present}
        assert {i: states.in_flight(pool[i]) for i in range(6)} == {i: model.get(i, 0) for i in range(6)}
        assert all(states.in_flight(e) >= 0 for e in pool)
        assert len(states) == len(present)


def test_an_address_listed_twice_counts_once() -> None:
    twice = [X, Endpoint(X.host, X.port, weight=5), Y]
    for kind in ("ewma", "least_request", "random"):
        assert make_balancer(kind, twice, random.Random(0)).scores(0.0)[0] == (
            X.address,
            1.0 if kind != "ewma" else 0.03,
        )
        assert len(make_balancer(kind, twice, random.Random(0)).scores(0.0)) == 2


def test_a_new_endpoint_is_taken_to_be_as_fast_as_the_others_so_it_gets_tried() -> None:
    """With fast endpoints and no load, a new endpoint at a fixed 30 ms would never win."""
    old, new = Endpoint("10.3.0.1", 80), Endpoint("10.3.0.2", 80)
    ewma = make_balancer("ewma", [old], random.Random(5))
    for i in range(50):
        ewma.finished(old, 0.001, now=i * 0.01)
    ewma.update([old, new])
    picks = Counter(ewma.pick() for _ in range(200))
    assert picks[new] > 50, picks  # ties between equal scores go to either
