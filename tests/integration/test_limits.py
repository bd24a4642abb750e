"""Connection limits of a real sidecar process with few file descriptors: idle connections
past the inbound listener's limit are closed at once (counted, logged once), the admin port
and the app's calls out stay reachable, and the idle ones go after the header timeout."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import trio

from meshlet.io import derived_connection_limits

from ..helpers import run_meshlet, run_sidecar, sample, write_static
from ..origin import Origin

SOFT, HARD = 256, 512  # the sidecar raises its soft limit to the hard one at start
IDLE_CONNECTIONS = 300  # more than the soft limit: before limits, this starved every listener


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


async def test_idle_connections_past_the_limit_leave_admin_and_the_data_path_reachable(
    tmp_path: Path, origin: Origin
) -> None:
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [f"127.0.0.1:{origin.port}"]}})
    args = ["sidecar", "--service", "item", "--app", f"127.0.0.1:{origin.port}", "--static", str(static)]
    args += ["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    args += ["--header-timeout", "1"]
    prefix = ["prlimit", f"--nofile={SOFT}:{HARD}", "--"]
    async with run_meshlet(tmp_path, "sidecar", args, "meshlet sidecar ready", prefix=prefix) as sidecar:
        limit = derived_connection_limits(HARD).inbound
        idle = [socket.create_connection(("127.0.0.1", sidecar.ports["inbound"])) for _ in range(IDLE_CONNECTIONS)]
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                with trio.fail_after(10):
                    assert (await client.get(f"http://{sidecar.admin}/ready")).status_code == 200
                    while True:  # every connection past the limit was closed at once
                        metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
                        rejected = sample(metrics, "meshlet_downstream_connections_rejected_total", listener="inbound")
                        if rejected == IDLE_CONNECTIONS - limit:
                            break
                        await trio.sleep(0.1)
                assert sample(metrics, "meshlet_downstream_connections", listener="inbound") == limit
                assert sample(metrics, "meshlet_downstream_connections_limit", listener="inbound") == limit
                out = await client.get(f"http://{sidecar.outbound}/hello", headers={"host": "item"})
                assert out.status_code == 200  # the app's calls out: their own limit, and descriptors left

                with trio.fail_after(15):  # the held ones sent nothing: closed after the 1 s header timeout
                    while True:
                        metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
                        if sample(metrics, "meshlet_downstream_connections", listener="inbound") == 0:
                            break
                        await trio.sleep(0.2)
                timed_out = sample(metrics, "meshlet_downstream_timeouts_total", listener="inbound", phase="first-byte")
                assert timed_out == limit
                response = await client.get(f"http://{sidecar.inbound}/hello")
                assert response.status_code == 200 and response.text == "hello"
        finally:
            for sock in idle:
                sock.close()
        assert _open_files_limit(sidecar.process.pid) == (HARD, HARD)
        warnings = [line for line in sidecar.log().splitlines() if "connections: new ones are closed" in line]
        assert len(warnings) == 1, sidecar.log()  # once, not per connection


async def test_the_limit_flags_reach_every_worker(tmp_path: Path, origin: Origin) -> None:
    static = write_static(tmp_path / "w.yaml", {"item": [f"127.0.0.1:{origin.port}"]})
    extra = ["--workers", "2", "--max-inbound-connections", "5", "--max-outbound-connections", "7"]
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static, extra=extra) as sidecar:
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
    # /metrics adds the workers up: each has its own listeners' limits
    assert sample(metrics, "meshlet_downstream_connections_limit", listener="inbound") == 2 * 5
    assert sample(metrics, "meshlet_downstream_connections_limit", listener="outbound") == 2 * 7
