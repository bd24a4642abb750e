"""sidecar/core/exposition.py writes what prometheus_client's generate_latest writes for the
same families, byte for byte: each kind of family and value on a table, and a sidecar's whole
/metrics page with every kind of series recorded."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import core as prometheus

from sidecar.core import exposition
from sidecar.telemetry import Telemetry, _Collector

LABELS = ("direction", "code")
ODD = ["plain", "", 'a "quoted" one', "back\\slash", "new\nline", "üñí©ødé", "{,}=", "x" * 300]
VALUES = [0, 1, 3.0, 0.1, 1e-9, 123456.0, 1234567.0, 2**53, 1e22, -5.5, float("inf"), float("-inf"), float("nan")]


def generated(families: Iterable[object]) -> bytes:
    class Collector:
        def collect(self) -> Iterable[object]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


def both(kind: str, name: str, documentation: str, rows: list[tuple[tuple[str, ...], object]]) -> tuple[bytes, bytes]:
    """The same family built both ways, then written both ways."""
    ours = {
        "counter": exposition.CounterFamily,
        "gauge": exposition.GaugeFamily,
        "histogram": exposition.HistogramFamily,
    }[kind](name, documentation, labels=LABELS)
    theirs = {
        "counter": prometheus.CounterMetricFamily,
        "gauge": prometheus.GaugeMetricFamily,
        "histogram": prometheus.HistogramMetricFamily,
    }[kind](name, documentation, labels=LABELS)
    for labels, value in rows:
        if kind == "histogram":
            buckets, total = value  # type: ignore[misc]
            ours.add_metric(labels, buckets, total)  # type: ignore[call-arg]
            theirs.add_metric(labels, buckets, total)
        else:
            ours.add_metric(labels, value)  # type: ignore[call-arg, arg-type]
            theirs.add_metric(labels, value)
    return exposition.text([ours]), generated([theirs])


@pytest.mark.parametrize("kind", ["counter", "gauge"])
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_a_value_is_written_as_prometheus_client_writes_it(kind: str, value: float) -> None:
    ours, theirs = both(kind, "meshlet_x", "Help.", [(("outbound", "200"), value)])
    assert ours == theirs


@pytest.mark.parametrize("label", ODD, ids=repr)
@pytest.mark.parametrize("kind", ["counter", "gauge"])
def test_label_values_and_help_are_escaped_as_prometheus_client_does(kind: str, label: str) -> None:
    ours, theirs = both(kind, "meshlet_x_total", f"Help with {label}.", [((label, "200"), 1), (("in", label), 2)])
    assert ours == theirs


def test_a_histogram_and_a_family_without_samples_or_with_short_labels() -> None:
    buckets = [("0.001", 1.0), ("0.5", 3.0), ("+Inf", 4.0)]
    ours, theirs = both("histogram", "meshlet_d_seconds", "Durations.", [(("out", "200"), (buckets, 0.75))])
    assert ours == theirs and b'meshlet_d_seconds_bucket{code="200",direction="out",le="0.5"} 3.0' in ours
    ours, theirs = both("histogram", "meshlet_d_seconds", "Durations.", [(("in",), (buckets, 2.0))])
    assert ours == theirs and b'meshlet_d_seconds_count{direction="in"} 4.0' in ours
    ours, theirs = both("counter", "meshlet_none", "No samples.", [])
    assert ours == theirs == b"# HELP meshlet_none_total No samples.\n# TYPE meshlet_none_total counter\n"


def test_a_whole_metrics_page_is_what_prometheus_client_wrote() -> None:
    telemetry = Telemetry()
    for code, reason, duration in ((200, "", 0.0007), (503, "no-healthy-endpoints", 0.0001), (200, "", 12.0)):
        telemetry.request_finished("outbound", "user", "item", "item-route/by-id", code, reason, duration)
    telemetry.request_finished("inbound", 'we"ird\\', "item", "", 404, "", 0.2)
    telemetry.status = lambda: ("abc123", 1)
    families = list(_Collector(lambda: [telemetry.snapshot()]).collect())
    assert sum(len(f.samples) for f in families) > 50  # the page has every kind of series

    theirs = []
    for family in families:
        kind = prometheus.Metric(family.name, family.documentation, family.type)
        for name, labels, value in family.samples:
            kind.add_sample(name, labels, value)
        theirs.append(kind)
    assert exposition.text(families) == generated(theirs)
