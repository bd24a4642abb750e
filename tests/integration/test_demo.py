"""`meshlet demo` runs to completion, tells the story, and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio


def _demo_processes(under: Path) -> list[int]:
    """PIDs of processes started by a demo run with TMPDIR=``under`` (their data dirs live in
    ``under``/meshlet-demo-*): this test's demo only, not one another run left or is running."""
    marker = f"{under}/meshlet-demo-".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


async def test_demo_runs_to_completion_without_orphans(tmp_path: Path) -> None:
    with trio.fail_after(180):
        result = await trio.run_process(
            [sys.executable, "-m", "meshlet", "demo", "--duration", "0", "--requests", "20"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "COLUMNS": "120", "TMPDIR": str(tmp_path)},
        )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    for line in (
        "registered item-1",
        "registered item-2",
        "registered user-1",
        "registered gateway-1",
        "ready, as spiffe://meshlet.local/service/gateway",  # its certificate, from the control plane's CA
        "mutual TLS",
        "deregistered item-2",
        "No errors",
        "registered item-2 again",
        "a flaky instance",
        "no caller saw an error",
        "circuit to item opened",
        "(meshlet_circuit_state=1)",
        "open ×1, half_open ×1, closed ×1",
        "per-hop metrics",
        "user → item",  # the caller its certificate proves
        "unauthenticated",  # the load generator is no sidecar: it calls the gateway in plaintext
        "5 spans",
        "one trace, a span per hop and side",
    ):
        assert line in out, line
    assert _demo_processes(tmp_path) == []


async def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "meshlet", "demo", "--duration", "60", "--requests", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "120", "TMPDIR": str(tmp_path)},
    )
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(120):
        while b"keeps running" not in seen:
            chunk = await process.stdout.receive_some(65536)
            assert chunk, seen.decode()[-2000:]
            seen += chunk
    process.send_signal(signal.SIGINT)
    with trio.fail_after(30):
        await process.wait()
    assert process.returncode == 0
    await trio.sleep(0.5)
    assert _demo_processes(tmp_path) == []
