"""One trace across the mesh (issue 6): gateway → user → item, each a plain Python app
(meshlet/examples/services.py, which passes the trace headers on) with its own sidecar and a
control plane whose trace store gets every span. The tree: a SERVER and a CLIENT span
per hop, one more CLIENT span per retry (and the SERVER span of the instance it
reached); visible through the Zipkin API and `meshlet trace`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from meshlet.demo import Demo

from ..helpers import start_demo_mesh


def tree(spans: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(service, kind, parent's service/kind) per span, in start order."""
    by_id = {s["id"]: s for s in spans}
    out = []
    for span in sorted(spans, key=lambda s: s["timestamp"]):
        parent = by_id.get(span.get("parentId", ""))
        up = f"{parent['localEndpoint']['serviceName']}/{parent['kind']}" if parent else None
        out.append((span["localEndpoint"]["serviceName"], span["kind"], up))
    return out


async def test_one_trace_through_three_hops_with_a_retry(tmp_path: Path) -> None:
    demo = Demo(tmp_path)
    try:
        api, entry = await start_demo_mesh(demo)
        async with httpx.AsyncClient(timeout=10) as client:
            # Round robin, so that calls do reach the failing instance (ewma would soon avoid it).
            token = (tmp_path / "cp" / "api-token").read_text().strip()
            policy = "kind: DestinationPolicy\nname: item\nservice: item\nload_balancer: round_robin\n"
            applied = await client.put(
                f"http://{api}/v1/policies",
                json={"files": [["item.yaml", policy]], "source": "test"},
                headers={"authorization": f"Bearer {token}"},
            )
            assert applied.status_code == 200, applied.text
            await trio.sleep(1)  # the push reaches user's sidecar (its ACK is not awaited here)
            broken = f"http://127.0.0.1:{demo.apps['item-1'].fields['port']}/fault"
            await client.put(broken, json={"failing": 1.0})  # item-1 answers 503: a call there is retried
            for i in range(10):
                assert (await client.get(f"{entry}/api/users/{i}")).status_code == 200
            found: list[list[dict[str, Any]]] = []
            with trio.fail_after(15):  # spans are sent in batches, every second
                while not any(len(t) == 7 for t in found):
                    await trio.sleep(0.5)
                    found = (await client.get(f"http://{api}/api/v2/traces", params={"limit": 50})).json()
            admin = demo.sidecars["user-1"].fields["admin"]
            metrics = (await client.get(f"http://{admin}/metrics")).text
        retried = next(t for t in found if len(t) == 7)
        result = await trio.run_process(
            [sys.executable, "-m", "meshlet", "trace", retried[0]["traceId"], "--api", api],
            capture_stdout=True,
            check=False,
        )
    finally:
        await demo.stop_all()
    assert tree(retried) == [
        ("gateway", "SERVER", None),
        ("gateway", "CLIENT", "gateway/SERVER"),
        ("user", "SERVER", "gateway/CLIENT"),
        ("user", "CLIENT", "user/SERVER"),  # to item-1 ...
        ("item", "SERVER", "user/CLIENT"),  # ... which answers 503
        ("user", "CLIENT", "user/SERVER"),  # the retry, to item-2
        ("item", "SERVER", "user/CLIENT"),
    ]
    statuses = [s["tags"]["http.status_code"] for s in sorted(retried, key=lambda s: s["timestamp"])]
    assert statuses[3:5] == ["503", "503"] and statuses[5:] == ["200", "200"]
    attempts = [
        s["tags"].get("meshlet.attempt")
        for s in retried
        if s["kind"] == "CLIENT" and s["localEndpoint"]["serviceName"] == "user"
    ]
    assert sorted(attempts) == ["1", "2"]
    assert {s["traceId"] for s in retried} == {retried[0]["traceId"]}
    out = result.stdout.decode()
    assert result.returncode == 0 and "7 spans" in out and out.count("user") >= 3
    # a trace without a retry has the five spans of three hops
    assert any(len(t) == 5 for t in found)
    exported = [line for line in metrics.splitlines() if line.startswith("meshlet_spans_exported_total ")]
    assert exported and float(exported[0].split()[1]) >= 4  # user's SERVER and CLIENT spans reached the store
    assert "meshlet_spans_dropped_total{" not in metrics
