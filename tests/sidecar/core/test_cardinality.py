"""Label bounds for the sidecar's metrics (sidecar/core/cardinality.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.cardinality import OTHER, IdleSeries, SeriesLimits

NAMES = ("direction", "source", "destination", "route", "code", "reason")


def series(source: str, code: str = "200", destination: str = "item") -> tuple[str, ...]:
    return ("inbound", source, destination, "", code, "")


def test_past_the_cap_new_values_are_other_and_counted() -> None:
    limits = SeriesLimits(NAMES, max_values=3)
    admitted = [limits.admit(series(f"caller-{i}")) for i in range(5)]
    assert [labels[1] for labels in admitted] == ["caller-0", "caller-1", "caller-2", OTHER, OTHER]
    assert limits.admit(series("caller-1")) == series("caller-1")  # a value already in stays itself
    assert limits.folded == {"source": 2}
    assert limits.distinct() == {"source": 3, "destination": 1, "route": 1, "reason": 1}


def test_direction_and_code_are_never_capped() -> None:
    limits = SeriesLimits(NAMES, max_values=1)
    codes = [limits.admit(series("a", code=str(code)))[4] for code in (200, 404, 503)]
    assert codes == ["200", "404", "503"]


def test_labels_left_out_of_the_allow_list_are_written_empty() -> None:
    limits = SeriesLimits(NAMES, allowed=("direction", "destination", "code"))
    assert limits.admit(("inbound", "gateway", "item", "r/1", "200", "")) == ("inbound", "", "item", "", "200", "")
    assert limits.distinct() == {"destination": 1}


def test_rebuild_frees_the_values_of_expired_series() -> None:
    limits = SeriesLimits(NAMES, max_values=2)
    limits.admit(series("a"))
    limits.admit(series("b"))
    assert limits.admit(series("c"))[1] == OTHER
    limits.rebuild([series("b"), series(OTHER)])  # "a" expired
    assert limits.admit(series("c"))[1] == "c"
    assert limits.distinct()["source"] == 2


@given(st.lists(st.text(max_size=8), max_size=300), st.integers(min_value=1, max_value=50))
def test_never_more_distinct_values_than_the_cap_plus_other(values: list[str], cap: int) -> None:
    limits = SeriesLimits(NAMES, max_values=cap)
    sources = {limits.admit(series(value))[1] for value in values}
    assert len(sources - {OTHER}) <= cap
    assert sources - {OTHER} <= set(values)


def test_a_series_is_idle_after_the_expiry_without_moving() -> None:
    idle = IdleSeries(expiry=600)
    counts = {"a": 1, "b": 1}
    assert idle.sweep(counts, now=0) == []
    counts["a"] = 2  # a moves at 300
    assert idle.sweep(counts, now=300) == []
    assert idle.sweep(counts, now=600) == ["b"]  # b has not moved since 0
    del counts["b"]
    assert idle.sweep(counts, now=899) == []
    assert idle.sweep(counts, now=900) == ["a"]  # a has not moved since 300
    assert idle.sweep({}, now=2000) == []


def test_a_series_that_came_back_is_judged_afresh() -> None:
    idle = IdleSeries(expiry=10)
    assert idle.sweep({"a": 5}, now=0) == []
    assert idle.sweep({"a": 5}, now=10) == ["a"]
    assert idle.sweep({"a": 1}, now=11) == []  # removed, then counted again from 0
    assert idle.sweep({"a": 1}, now=20) == []
    assert idle.sweep({"a": 1}, now=21) == ["a"]
