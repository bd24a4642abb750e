"""Per-hop metrics through real sidecars (docs/observability.md): exact counts after scripted
traffic, the route label, promtool's verdict on the real output, and the bounds on label
values under 250 callers with certificates of their own and 10,000 paths."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ..certs import TestCA, context, sidecar_flags
from ..helpers import raw_exchange, sample, write_static
from ..mesh import Mesh
from ..origin import Origin

ROUTE = """\
kind: Route
name: item-api
host: item
rules:
  - {name: hello, match: {path: {prefix: /hello}}, destinations: [{service: item}]}
  - {name: status, match: {path: {prefix: /status}}, destinations: [{service: item}]}
  - {name: echo, match: {path: {prefix: /echo}}, destinations: [{service: item}]}
"""


value = sample  # the summed samples of a name whose labels include those given


def inbound_requests(metrics: str) -> list[Any]:
    """The inbound samples of meshlet_requests_total, one per series."""
    return [
        s
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == "meshlet_requests_total" and s.labels["direction"] == "inbound"
    ]


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("MESHLET_REQUIRE_ALL"):
            pytest.fail("promtool is missing (Debian package prometheus)")
        pytest.skip("promtool is missing: apt-get install prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_scripted_traffic_gives_exact_per_hop_counts_that_promtool_accepts(
    tmp_path: Path, mesh: Mesh, origin: Origin
) -> None:
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    await mesh.apply(ROUTE)
    async with httpx.AsyncClient(base_url=f"http://{user.outbound}", headers={"host": "item"}) as client:
        with trio.fail_after(15):  # until user's sidecar routes item by the new rules
            while (await client.get("/hello")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
        # from here on, counted: read the counts before, compare after
        before_user = (await client.get(f"http://{user.admin}/metrics")).text
        before_item = (await client.get(f"http://{item.admin}/metrics")).text
        for _ in range(30):
            assert (await client.get("/hello")).status_code == 200
        for _ in range(7):
            assert (await client.get("/status/404")).status_code == 404
        assert (await client.get("/nothing")).status_code == 404  # no rule: the mesh's no-route
        echoed = await client.post("/echo", content=b"x" * 5000)
        assert echoed.status_code == 200 and len(echoed.content) == 5000
        user_metrics = (await client.get(f"http://{user.admin}/metrics")).text
        item_metrics = (await client.get(f"http://{item.admin}/metrics")).text
        cp_metrics = (await client.get(f"http://{mesh.api}/metrics")).text
        report = (await client.get(f"http://{user.admin}/metrics/cardinality")).json()

    def delta(after: str, before: str, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    hop = {"direction": "outbound", "source": "user", "destination": "item"}
    assert delta(user_metrics, before_user, "meshlet_requests_total", **hop, route="item-api/hello", code="200") == 30
    assert delta(user_metrics, before_user, "meshlet_requests_total", **hop, route="item-api/status", code="404") == 7
    no_route = {"direction": "outbound", "code": "404", "reason": "no-route"}
    assert delta(user_metrics, before_user, "meshlet_requests_total", **no_route) == 1
    assert delta(user_metrics, before_user, "meshlet_request_duration_seconds_count", **hop, code="200") == 31
    inbound = {"direction": "inbound", "source": "user", "destination": "item", "route": ""}
    assert delta(item_metrics, before_item, "meshlet_requests_total", **inbound, code="200") == 31  # and the echo
    assert delta(item_metrics, before_item, "meshlet_requests_total", **inbound, code="404") == 7
    echo = {**hop, "route": "item-api/echo", "code": "200"}
    for name in ("meshlet_request_bytes", "meshlet_response_bytes"):  # the body each way, per hop
        assert delta(user_metrics, before_user, f"{name}_sum", **echo) == 5000
        assert delta(user_metrics, before_user, f"{name}_bucket", **echo, le="1000.0") == 0
        assert delta(user_metrics, before_user, f"{name}_bucket", **echo, le="10000.0") == 1
    assert delta(item_metrics, before_item, "meshlet_request_bytes_sum", **inbound, code="200") == 5000
    assert value(user_metrics, "meshlet_control_plane_connected") == 1
    versions = [
        s.labels["version"]
        for f in text_string_to_metric_families(user_metrics)
        for s in f.samples
        if s.name == "meshlet_config_version_info"
    ]
    assert len(versions) == 1 and versions[0]
    assert report["series"]["meshlet_requests"] >= 3 and report["limits"]["max_label_values"] == 200
    for text in (user_metrics, item_metrics, cp_metrics):
        promtool_check(text)


async def _call_as(port: int, context: ssl.SSLContext, requests: bytes, count: int) -> bytes:
    """``requests`` over one mTLS connection; what came back once ``count`` answers did."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
    received = bytearray()
    await stream.send_all(requests)
    while received.count(b"HTTP/1.1 ") < count:
        data = await stream.receive_some(65536)
        if not data:
            break
        received += data
    await stream.aclose()
    return bytes(received)


CALLERS = 250  # past the default cap of 200 values a label
PER_CALLER = 40  # 10,000 requests, each to a path of its own


async def test_ten_thousand_requests_from_250_callers_stay_within_the_caps(
    tmp_path: Path, mesh: Mesh, origin: Origin
) -> None:
    """250 callers, each proving its name with a certificate of its own (a header cannot name
    a caller any more), 40 paths each: the first 200 callers keep their name in the source
    label, the rest are folded into "other"."""
    authority = TestCA()
    item = await mesh.sidecar(
        "item",
        app=origin,
        static=write_static(tmp_path / "s.yaml", {}),
        extra=sidecar_flags(authority, tmp_path, "item"),
    )
    port = item.ports["inbound"]
    with trio.fail_after(120):
        for caller in range(CALLERS):
            requests = b"".join(
                b"GET /hello/%d HTTP/1.1\r\nhost: item\r\nx-meshlet-source: user\r\n\r\n" % (caller * PER_CALLER + i)
                for i in range(PER_CALLER)
            )
            credentials = authority.credentials(f"caller-{caller}")
            answer = await _call_as(port, context(credentials, tmp_path, server_side=False), requests, PER_CALLER)
            assert answer.count(b"HTTP/1.1 404 ") == PER_CALLER  # the origin has no /hello/N
        last = await raw_exchange(port, b"GET /hello HTTP/1.1\r\nhost: item\r\nconnection: close\r\n\r\n")
        assert last.startswith(b"HTTP/1.1 200 ")
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://{item.admin}/metrics")).text
        report = (await client.get(f"http://{item.admin}/metrics/cardinality")).json()
    inbound = inbound_requests(metrics)
    # the first 200 callers by name, then "other": the other 50 callers' 404s and the
    # plaintext (unauthenticated) last request's 200
    assert len(inbound) == 200 + 2
    assert {
        (s.labels["source"], s.labels["code"]) for s in inbound if not s.labels["source"].startswith("caller-")
    } == {("other", "404"), ("other", "200")}
    folded = (CALLERS - 200) * PER_CALLER + 1
    assert value(metrics, "meshlet_requests_total", source="other") == folded
    assert value(metrics, "meshlet_requests_total", source="user") == 0  # the header named nobody
    assert sum(s.value for s in inbound) == CALLERS * PER_CALLER + 1  # nothing lost, only folded
    # one folded series per caller past the cap (and the unauthenticated one), not per request
    assert value(metrics, "meshlet_metrics_series_folded_total", label="source") == CALLERS - 200 + 1
    assert report["series"]["meshlet_requests"] == 202 and report["label_values"]["source"] == 200
    promtool_check(metrics)


async def test_a_mesh_config_sets_the_bounds_on_every_sidecar(mesh: Mesh, origin: Origin) -> None:
    config = "kind: MeshConfig\nname: mesh\nmetrics:\n  labels: [destination, code]\n  max_label_values: 5\n"
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    async with httpx.AsyncClient(base_url=f"http://{user.outbound}", headers={"host": "item"}) as client:
        with trio.fail_after(15):
            while (await client.get("/hello")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
        await mesh.apply(config)  # returns once every sidecar ACKed it
        for _ in range(12):
            assert (await client.get("/hello")).status_code == 200
        metrics = (await client.get(f"http://{item.admin}/metrics")).text
        report = (await client.get(f"http://{item.admin}/metrics/cardinality")).json()
    inbound = inbound_requests(metrics)
    # source, route and reason are written empty: one series, counted from the change on
    assert [(s.labels["source"], s.labels["route"], s.labels["destination"], s.value) for s in inbound] == [
        ("", "", "item", 12.0)
    ]
    assert report["limits"]["labels"] == ["direction", "destination", "code"]
    assert report["limits"]["max_label_values"] == 5
