"""The micro-benchmark keeps working (it asserts its own counts); no timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_micro_path_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "micro_path.py"), "500"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "µs per request" in result.stdout


def test_micro_path_traced_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "micro_path.py"), "300", "--traced"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # it asserts a span per request itself
    assert "tracing adds" in result.stdout
