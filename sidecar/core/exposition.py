"""Prometheus text exposition (format 0.0.4) of counter, gauge and histogram families.

What prometheus_client's ``generate_latest`` writes for the families the sidecar exports,
byte for byte (tests/sidecar/core/test_exposition.py compares the two), in a few lines: so a
sidecar answers /metrics without importing prometheus_client, which brings its HTTP server,
WSGI and email modules along (~2.4 MiB of a sidecar's memory for its whole life).

A family is built as with prometheus_client's ``*MetricFamily`` (``add_metric`` with label
values in the order of the family's label names); :func:`text` writes families in turn:
``# HELP``, ``# TYPE``, then one line per sample, its labels sorted by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Labels = dict[str, str]


class Family:
    """A metric family and its samples: (sample name, labels, value), in the order added."""

    type = ""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(labels)
        self.samples: list[tuple[str, Labels, float]] = []

    def _labels(self, values: Sequence[str]) -> Labels:
        return dict(zip(self.label_names, values, strict=False))  # as prometheus_client: the shorter wins


class CounterFamily(Family):
    type = "counter"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labels)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((self.name + "_total", self._labels(labels), value))


class GaugeFamily(Family):
    type = "gauge"

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((self.name, self._labels(labels), value))


class HistogramFamily(Family):
    type = "histogram"

    def add_metric(self, labels: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float) -> None:
        """``buckets``: (upper bound as written, cumulative count), sorted, ``+Inf`` last."""
        for bound, count in buckets:
            self.samples.append((self.name + "_bucket", {**self._labels(labels), "le": bound}, count))
        if float(buckets[0][0]) >= 0:  # as prometheus_client: no count nor sum with a negative bucket
            self.samples.append((self.name + "_count", self._labels(labels), buckets[-1][1]))
            self.samples.append((self.name + "_sum", self._labels(labels), sum_value))


def text(families: Iterable[Family]) -> bytes:
    """The families in the Prometheus text format, UTF-8."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        documentation = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {documentation}\n# TYPE {name} {family.type}\n")
        for sample, labels, value in family.samples:
            if labels:
                pairs = ",".join(f'{key}="{_escape(labels[key])}"' for key in sorted(labels))
                out.append(f"{sample}{{{pairs}}} {go_float(value)}\n")
            else:
                out.append(f"{sample} {go_float(value)}\n")
    return "".join(out).encode()


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def go_float(value: float) -> str:
    """A value as Prometheus (Go) writes it: ``+Inf``, ``NaN``, ``1.0``, ``1.5e+07``."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


__all__ = ["CounterFamily", "Family", "GaugeFamily", "HistogramFamily", "go_float", "text"]
