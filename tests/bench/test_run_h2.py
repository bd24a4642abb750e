"""benchmarks/run.py's HTTP/2 parts that can be checked without a benchmark: reading h2load's
report, and the gRPC echo origin answering grpcio's client (a real process). No timing asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

REPORT = """\
finished in {finished}, 1234.50 req/s, 3.52MB/s
requests: {total} total, {started} started, {done} done, {ok} succeeded, {failed} failed, {errored} errored, 0 timeout
status codes: {s2} 2xx, 0 3xx, {s4} 4xx, {s5} 5xx
traffic: 134.96KB (138196) total, 93.75KB (96000) headers (space savings 51.02%), 5.86KB (6000) data
"""


def load_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return load_run()


@pytest.mark.parametrize(
    ("fields", "seconds", "status_2xx", "problems", "text"),
    [
        (
            dict(
                finished="4.00s", total=9040, started=9040, done=9000, ok=9000, failed=0, errored=0, s2=9000, s4=0, s5=0
            ),
            4.0,
            9000,
            0,
            "0",
        ),
        (
            dict(
                finished="37.48ms",
                total=2000,
                started=2000,
                done=2000,
                ok=2000,
                failed=0,
                errored=0,
                s2=1990,
                s4=4,
                s5=6,
            ),
            0.03748,
            1990,
            10,
            "non-2xx 10",
        ),
        (
            dict(finished="2.00s", total=100, started=100, done=100, ok=97, failed=3, errored=2, s2=97, s4=0, s5=0),
            2.0,
            97,
            5,
            "failed 3, errored 2",
        ),
    ],
)
def test_h2load_report_is_read(
    run: ModuleType, fields: dict[str, object], seconds: float, status_2xx: int, problems: int, text: str
) -> None:
    result = run.h2load_result(["h2load"], 0, REPORT.format(**fields))
    assert (result.seconds, result.status_2xx, result.problems, result.error_text()) == pytest.approx(
        (seconds, status_2xx, problems, text)
    )
    assert result.rps == pytest.approx(status_2xx / seconds)


@pytest.mark.parametrize(("returncode", "stdout"), [(1, "error: connect refused\n"), (0, "finished in 1.00s\n")])
def test_a_failed_h2load_stops_the_run(run: ModuleType, returncode: int, stdout: str) -> None:
    with pytest.raises(RuntimeError, match="h2load failed"):
        run.h2load_result(["h2load"], returncode, stdout)


def test_grpc_echo_answers_grpcio(run: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    workdir = run.Workdir(tmp_path)
    with run.run_grpc_echo(workdir) as server:
        run.grpc_sanity(server.port, calls=3)  # raises unless OK and echoed
