"""sidecar.core.balance: weighted round robin."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.balance import RoundRobin
from sidecar.core.config import Endpoint

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
