"""meshlet.durations: one grammar for every duration (policies, the static file, flags)."""

from __future__ import annotations

import math

import pytest

from meshlet.durations import parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("1ms", 0.001),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("0.5m", 30.0),
        ("2h", 7200.0),
        (" 3s ", 3.0),
        # A bare number is seconds, a YAML/JSON number or the same digits in a string (a
        # quoted YAML value, a flag, an environment variable).
        (3, 3.0),
        (0.25, 0.25),
        ("10", 10.0),
        ("2", 2.0),
        ("0.5", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


NOT_A_DURATION = "is not a duration (allowed: 250ms, 2s, 1m, 1h)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", f"'soon' {NOT_A_DURATION}"),
        ("2d", f"'2d' {NOT_A_DURATION}"),  # days are no unit: Go's time.ParseDuration has none either
        ("1m30s", f"'1m30s' {NOT_A_DURATION}"),
        ("-1s", f"'-1s' {NOT_A_DURATION}"),
        ("1 s", f"'1 s' {NOT_A_DURATION}"),
        ("1S", f"'1S' {NOT_A_DURATION}"),
        (".5s", f"'.5s' {NOT_A_DURATION}"),
        ("1e3", f"'1e3' {NOT_A_DURATION}"),
        ("", f"'' {NOT_A_DURATION}"),
        ("2s\n3", f"'2s\\n3' {NOT_A_DURATION}"),
        ("٣s", f"'٣s' {NOT_A_DURATION}"),  # a digit to str.isdigit(), not to us
        (None, f"None {NOT_A_DURATION}"),
        ([1], f"[1] {NOT_A_DURATION}"),
        (True, f"True {NOT_A_DURATION}"),  # YAML's yes
        (False, f"False {NOT_A_DURATION}"),
        (0, "0 must be greater than 0"),
        (-1, "-1 must be greater than 0"),
        (-0.5, "-0.5 must be greater than 0"),
        ("0", "'0' must be greater than 0"),
        ("0s", "'0s' must be greater than 0"),
        ("0ms", "'0ms' must be greater than 0"),
        (math.nan, f"nan {NOT_A_DURATION}"),
        (math.inf, f"inf {NOT_A_DURATION}"),
        (-math.inf, f"-inf {NOT_A_DURATION}"),
        pytest.param(10**400, NOT_A_DURATION, id="int-past-float"),
        pytest.param("9" * 400 + "s", NOT_A_DURATION, id="string-past-float"),
    ],
)
def test_parse_duration_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value).endswith(message)
    assert len(str(info.value)) < 100  # a long value is cut short in the message
