"""The sidecar's metric store (sidecar/telemetry.py): bounded series, idle expiry, the
Prometheus text it renders, and the cardinality report."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.core.cardinality import MetricsSettings
from sidecar.telemetry import Telemetry, cardinality, render


def text(telemetry: Telemetry) -> str:
    return render(lambda: [telemetry.snapshot()]).decode()


def value(out: str, name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels``, parsed as Prometheus parses it (a label
    with an empty value is no label)."""
    for family in text_string_to_metric_families(out):
        for sample in family.samples:
            if sample.name == name and _present(sample.labels) == _present(labels):
                return sample.value
    return None


def _present(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if v}


def test_a_request_is_one_sample_with_every_per_hop_label_and_a_histogram() -> None:
    telemetry = Telemetry()
    for _ in range(3):
        telemetry.request_finished("outbound", "user", "item", "item-route/by-id", 200, "", 0.0007)
    telemetry.request_finished("outbound", "user", "item", "", 503, "no-healthy-endpoints", 0.0001)
    out = text(telemetry)
    hop = {"direction": "outbound", "source": "user", "destination": "item", "route": "item-route/by-id"}
    ok = {**hop, "code": "200", "reason": ""}
    assert value(out, "meshlet_requests_total", **ok) == 3
    assert value(out, "meshlet_request_duration_seconds_bucket", **ok, le="0.0005") == 0
    assert value(out, "meshlet_request_duration_seconds_bucket", **ok, le="0.001") == 3
    assert value(out, "meshlet_request_duration_seconds_bucket", **ok, le="30.0") == 3
    assert value(out, "meshlet_request_duration_seconds_bucket", **ok, le="+Inf") == 3
    assert value(out, "meshlet_request_duration_seconds_count", **ok) == 3
    failed = {**hop, "route": "", "code": "503", "reason": "no-healthy-endpoints"}
    assert value(out, "meshlet_requests_total", **failed) == 1


def test_callers_past_the_cap_are_other_and_the_folds_are_counted() -> None:
    telemetry = Telemetry(MetricsSettings(max_label_values=10))
    for i in range(10_000):
        telemetry.request_finished("inbound", f"caller-{i}", "item", "", 200, "", 0.001)
    assert len(telemetry.requests) == 11  # ten callers and "other"
    assert telemetry.requests[("inbound", "other", "item", "", "200", "", "")] == 9_990
    report = cardinality(render(lambda: [telemetry.snapshot()]), telemetry)
    assert report["series"]["meshlet_requests"] == 11
    assert report["series"]["meshlet_request_duration_seconds"] == 11
    assert report["label_values"]["source"] == 10
    assert report["folded"] == {"source": 9_990}
    assert 'meshlet_metrics_series_folded_total{label="source"} 9990.0' in text(telemetry)


def test_the_series_cap_folds_every_bounded_label_of_a_new_series() -> None:
    telemetry = Telemetry(MetricsSettings(max_label_values=1000, max_series=100))
    for i in range(300):
        telemetry.request_finished("outbound", "user", f"svc-{i}", "", 200, "", 0.001)
    assert len(telemetry.requests) == 101
    assert telemetry.requests[("outbound", "other", "other", "other", "200", "other", "")] == 200


def test_labels_left_out_are_empty_and_series_merge() -> None:
    telemetry = Telemetry(MetricsSettings(labels=("direction", "destination", "code")))
    telemetry.request_finished("inbound", "a", "item", "", 200, "", 0.001)
    telemetry.request_finished("inbound", "b", "item", "", 200, "", 0.001)
    assert telemetry.requests == {("inbound", "", "item", "", "200", "", ""): 2}


def test_idle_series_are_removed_and_their_values_freed() -> None:
    telemetry = Telemetry(MetricsSettings(max_label_values=2, idle_expiry=600))
    telemetry.request_finished("inbound", "a", "item", "", 200, "", 0.001)
    telemetry.request_finished("inbound", "b", "item", "", 200, "", 0.001)
    assert telemetry.sweep(0) == 0
    telemetry.request_finished("inbound", "a", "item", "", 200, "", 0.001)  # a moves, b does not
    assert telemetry.sweep(300) == 0
    assert telemetry.sweep(600) == 1
    assert set(telemetry.requests) == {("inbound", "a", "item", "", "200", "", "")}
    assert all(key in telemetry.requests for key in telemetry.durations)
    telemetry.request_finished("inbound", "c", "item", "", 200, "", 0.001)  # b's place is free again
    assert ("inbound", "c", "item", "", "200", "", "") in telemetry.requests


def test_new_bounds_start_the_series_again_and_the_same_bounds_change_nothing() -> None:
    telemetry = Telemetry()
    telemetry.request_finished("inbound", "a", "item", "", 200, "", 0.001)
    telemetry.configure(None)  # the defaults again: nothing changes
    assert len(telemetry.requests) == 1
    telemetry.configure(MetricsSettings(max_label_values=5))
    assert telemetry.requests == {} and telemetry.settings.max_label_values == 5


def test_version_and_channel_state_are_exported() -> None:
    telemetry = Telemetry()
    assert "meshlet_config_version_info{" not in text(telemetry)
    telemetry.status = lambda: ("abc123", 1)
    out = text(telemetry)
    assert 'meshlet_config_version_info{version="abc123"} 1.0' in out
    assert "meshlet_control_plane_connected 1.0" in out
    telemetry.status = lambda: ("abc123", None)  # static mode: no channel to report
    assert "meshlet_control_plane_connected " not in text(telemetry)
