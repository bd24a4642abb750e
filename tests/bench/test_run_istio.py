"""benchmarks/run.py's Istio-shape parts that can be checked without a benchmark: wrk's report
with p90, the vCPU and targets arithmetic, `--only istio`, and the joined mTLS mesh path the
scenario measures (real processes: a control plane and two sidecars). No timing asserted."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .test_run_h2 import load_run


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return load_run()


RESULT = (
    "RESULT requests={requests} duration_us={duration_us} connect=0 read=0 write=0 status={status} timeout=0 "
    "p50_us=512.0 p90_us=1500.5 p99_us=4200.0 mean_us=700.0 max_us=9000.0\n"
)


QUIET = {"0": 0.0, "1": 0.0}  # the noise gauges, per core


def test_wrk_report_gives_p90(run: ModuleType) -> None:
    result = run.wrk_result(
        ["wrk"], 0, "Running 10s test\n" + RESULT.format(requests=10000, duration_us=10_000_000, status=3), ""
    )
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == pytest.approx((0.512, 1.5005, 4.2))
    assert (result.requests, result.rps, result.error_text()) == (10000, pytest.approx(1000.0), "non-2xx/3xx 3")


def wrk(run: ModuleType, *, requests: int = 10000, p90_ms: float = 1.0, p99_ms: float = 2.0, status: int = 0) -> Any:
    errors = {"status": status, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    return run.WrkResult(requests, 10.0, 0.5, p90_ms, p99_ms, 0.6, errors)


def istio(
    run: ModuleType,
    *,
    cpu_a: float,
    cpu_b: float,
    p90_ms: float = 0.5,
    p99_ms: float = 0.9,
    mesh_errors: int = 0,
    requests: int = 9600,
    rss: tuple[float, float] = (35.0, 38.0),
) -> Any:
    """Measured results: direct p90 0.1 ms, p99 0.2 ms; the mTLS path's over 10 s, by default
    at 960 req/s (the rate held: at least 95 % of 1,000)."""
    cpu = run.CpuTime
    direct = run.IstioResult(run.ISTIO_DIRECT, wrk(run, p90_ms=0.1, p99_ms=0.2), 10.0, {}, {}, None, QUIET, QUIET)
    mtls = run.IstioResult(
        run.ISTIO_MTLS,
        wrk(run, requests=requests, p90_ms=p90_ms, p99_ms=p99_ms),
        10.0,
        {"A": cpu(cpu_a, 0.0), "B": cpu(0.0, cpu_b)},
        {"A": 40.0, "B": 40.0},
        mesh_errors,
        QUIET,
        QUIET,
    )
    memory = run.ControlPlaneMemory({"A": rss[0], "B": 30.0}, {"A": 30.0, "B": rss[1]}, wrk(run), {})
    return run.IstioMeasured({run.ISTIO_DIRECT: direct, run.ISTIO_MTLS: mtls}, memory)


def verdicts(targets: list[Any]) -> list[tuple[float | None, bool]]:
    return [(round(t.value, 4) if t.value is not None else None, t.passed) for t in targets]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            # B busier: 0.96 s CPU over 10 s = 0.096 vCPU at 960 req/s → 0.1 per 1,000 req/s
            dict(cpu_a=0.48, cpu_b=0.96),
            [(0.1, True), (0.1, False), (0.4, True), (0.7, True), (35.0, True), (38.0, True), (38.0, False)],
        ),
        (
            dict(cpu_a=1.44, cpu_b=0.96, p90_ms=0.8, p99_ms=1.3, rss=(29.0, 29.5)),
            [(0.15, False), (0.15, False), (0.7, False), (1.1, False), (30.0, True), (30.0, True), (30.0, True)],
        ),
        (
            # an error on the path: its cost and latency prove nothing (n/a, FAIL); memory still read
            dict(cpu_a=0.48, cpu_b=0.48, mesh_errors=2),
            [(None, False), (None, False), (None, False), (None, False), (35.0, True), (38.0, True), (38.0, False)],
        ),
        (
            # 900 req/s: the schedule fell behind, the run was not the shape
            dict(cpu_a=0.48, cpu_b=0.48, requests=9000),
            [(None, False), (None, False), (None, False), (None, False), (35.0, True), (38.0, True), (38.0, False)],
        ),
    ],
)
def test_istio_targets(run: ModuleType, case: dict[str, Any], expected: list[tuple[float | None, bool]]) -> None:
    targets = run.istio_targets(istio(run, **case))
    assert verdicts(targets) == expected
    for target in targets:  # an n/a says why
        assert ("[n/a, " in target.metric) == (target.value is None and "Istio shape" in target.metric)


def test_istio_tables_name_every_proxy(run: ModuleType) -> None:
    measured = istio(run, cpu_a=0.48, cpu_b=0.96, requests=9000)
    measured.results[run.ISTIO_HAPROXY] = run.IstioResult(
        run.ISTIO_HAPROXY, wrk(run), 10.0, {"haproxy-client": run.CpuTime(0.5, 0.0)}, {}, None, QUIET, QUIET
    )
    cost, latency, memory = run.istio_tables(measured, run.parse_settings([]))
    by_name = {row[0]: row for row in cost.rows}
    assert by_name[run.ISTIO_MTLS][1:4] == ["900 (not held)", "A 0.048, B 0.096", "A 0.053, B 0.107"]
    assert by_name[run.ISTIO_HAPROXY][1] == "1,000"
    assert by_name[run.ISTIO_DIRECT][2] == "(no proxy)"
    added = {row[0]: row[4:] for row in latency.rows}
    assert added[run.ISTIO_MTLS] == ["+0.000 / +0.400 / +0.700", "+0.000 / -0.500 / -1.100"]
    assert [row[0] for row in memory.rows] == ["A", "B"]


@pytest.mark.parametrize(
    ("argv", "out", "istio_s"),
    [
        (["--only", "istio"], None, 10),
        (["--only", "istio", "--quick"], None, 3),
        (["--only", "istio", "--out", "/tmp/x.md"], Path("/tmp/x.md"), 10),
        ([], "default", 10),
    ],
)
def test_only_istio_writes_apart(run: ModuleType, argv: list[str], out: Any, istio_s: int) -> None:
    settings = run.parse_settings(argv)
    expected = {None: run.ONLY_OUT, "default": run.DEFAULT_OUT}.get(out, out)
    assert (settings.out, settings.istio_s, settings.only) == (expected, istio_s, "istio" if argv else None)


class OneKilobyte(http.server.BaseHTTPRequestHandler):
    """The app behind sidecar B: 1 KB on /1k, keep-alive; anything else 404 (B's health
    probe: any answer below 500 is ready)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body, status = (b"x" * 1024, 200) if self.path == "/1k" else (b"no\n", 404)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def app() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneKilobyte)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_joined_mesh_path_serves_over_mtls(run: ModuleType, tmp_path: Path, app: int) -> None:
    if shutil.which("taskset") is None or not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs taskset and cores 0 and 1, as the benchmark")
    workdir = run.Workdir(tmp_path)
    with run.joined_mesh_path(workdir, app) as (port, proxies):
        run.wait_for_path(port, run.ISTIO_PATH, run.ISTIO_BODY)  # raises unless 200 and the 1 KB
        a, b = proxies
        assert (a.name, b.name) == ("A", "B")
        handshakes = {
            p.name: run.metric_sum(run.metrics_text(p.admin), "meshlet_tls_handshakes_total") for p in proxies
        }
        assert handshakes["A"] >= 1 and handshakes["B"] >= 1  # A dialled B with mTLS
        assert all(run.memory_mb(p.pid, "VmRSS") > 0 for p in proxies)
