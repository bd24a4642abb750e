"""A real Prometheus (Debian's) finds every sidecar through the control plane's HTTP
service discovery (/v1/prometheus/targets) and scrapes them: `up == 1` per sidecar, with
the service and instance labels, and the per-hop series queryable."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from meshlet import processes

from ..mesh import Mesh
from ..origin import Origin

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    # Prometheus cannot listen on port 0 and tell us the port; a port the kernel just gave
    # out (and we closed) is the next best thing.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def run_prometheus(tmp_path: Path, discovery_url: str) -> AsyncIterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("MESHLET_REQUIRE_ALL"):
            pytest.fail("prometheus is missing (Debian package prometheus)")
        pytest.skip("prometheus is missing: apt-get install prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: meshlet-sidecars\n"
        f"    http_sd_configs: [{{url: '{discovery_url}', refresh_interval: 1s}}]\n"
    )
    address = f"127.0.0.1:{free_port()}"
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={address}",
    ]
    async with processes.open_child("prometheus", argv, tmp_path / "prometheus.log", check_traceback=False) as child:
        async with httpx.AsyncClient() as client:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await client.get(f"http://{address}/-/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert child.process.poll() is None, child.log_text()
                    await trio.sleep(0.2)
        yield f"http://{address}"


async def query(client: httpx.AsyncClient, prometheus: str, promql: str) -> list[dict]:
    answer = (await client.get(f"{prometheus}/api/v1/query", params={"query": promql})).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


async def test_prometheus_discovers_and_scrapes_every_sidecar(tmp_path: Path, mesh: Mesh, origin: Origin) -> None:
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    async with httpx.AsyncClient(timeout=10) as client:
        discovery, hello = f"http://{mesh.api}/v1/prometheus/targets", f"http://{user.outbound}/hello"
        with trio.fail_after(15):  # both registered
            while len(targets := (await client.get(discovery)).json()) < 2:  # noqa: ASYNC110
                await trio.sleep(0.2)
        with trio.fail_after(15):  # user's sidecar routes to item
            while (await client.get(hello, headers={"host": "item"})).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.2)
        async with run_prometheus(tmp_path, discovery) as prometheus:
            with trio.fail_after(40):
                while True:
                    up = await query(client, prometheus, 'up{job="meshlet-sidecars"} == 1')
                    requests = await query(
                        client, prometheus, 'meshlet_requests_total{direction="inbound", service="item"}'
                    )
                    if len(up) == 2 and requests:
                        break
                    await trio.sleep(0.5)
            # every query of the Grafana dashboard in docs/ is valid PromQL on real data
            dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
            exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
            answered = {expr: await query(client, prometheus, expr) for expr in exprs}
    assert {t["targets"][0] for t in targets} == {item.admin, user.admin}
    assert {t["labels"]["service"] for t in targets} == {"item", "user"}
    assert {(r["metric"]["service"], r["metric"]["instance"]) for r in up} == {
        (t["labels"]["service"], t["labels"]["instance"]) for t in targets
    }
    assert requests[0]["metric"]["source"] == "user" and float(requests[0]["value"][1]) >= 1
    assert len(answered) >= 8  # query() asserted each one succeeded


async def test_an_admin_listener_reported_under_a_name_is_listed_at_the_sessions_address(
    mesh: Mesh, origin: Origin
) -> None:
    # As in a container: --admin 0.0.0.0:PORT, --advertise the name others reach it by. The name
    # is never resolved (it could name any host): the target is the push channel's peer.
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin, extra=["--admin", "0.0.0.0:0", "--advertise", "localhost"])
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(15):
            while not (targets := (await client.get(f"http://{mesh.api}/v1/prometheus/targets")).json()):  # noqa: ASYNC110
                await trio.sleep(0.2)
    assert targets[0]["targets"] == [f"127.0.0.1:{item.ports['admin']}"]
