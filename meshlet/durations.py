"""Durations, as every place that takes one writes them: policies, the static file and
the command line. Pure.

The grammar is the one Envoy, Linkerd and Kubernetes users write: a decimal number and a
unit, ``500ms``, ``30s``, ``1.5m``, ``2h``; or a bare number of seconds, a number in
YAML or JSON (``timeout: 2``) or the same digits in a string (``"2"``, ``--timeout 2``,
``MESHLET_TIMEOUT=2``). A duration is greater than 0 and finite.
"""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?")  # fullmatch; \d would take any script's digits
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
ALLOWED = "allowed: 250ms, 2s, 1m, 1h"


def parse_duration(value: object) -> float:
    """``250ms``, ``2s``, ``1m``, ``1h`` or a number of seconds → seconds; ValueError
    says what is wrong."""
    if isinstance(value, bool):  # YAML's yes/no: an int to Python, never meant as 1 s
        raise ValueError(f"{value!r} is not a duration ({ALLOWED})")
    if isinstance(value, int | float):
        number, unit = value, 1.0
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        number, unit = float(match.group(1)), _UNITS[match.group(2)]
    else:
        raise ValueError(f"{_shown(value)} is not a duration ({ALLOWED})")
    try:
        seconds = float(number) * unit
    except OverflowError:  # an int past the largest float
        seconds = math.inf
    if not math.isfinite(seconds):  # .nan, .inf, 1e400: no deadline can be made of them
        raise ValueError(f"{_shown(value)} is not a duration ({ALLOWED})")
    if seconds <= 0:
        raise ValueError(f"{_shown(value)} must be greater than 0")
    return seconds


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
