"""`meshlet stat` and `meshlet top` against a real control plane reading real sidecars:
the numbers agree with the traffic sent."""

from __future__ import annotations

import json
import sys

import httpx
import trio

from ..mesh import Mesh
from ..origin import Origin


async def meshlet(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def first_event(api: str, name: str) -> dict[str, object]:
    """The first Hystrix stream event for ``name`` (over a raw socket: the stream never ends)."""
    host, port = api.split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    buffer = b""
    try:
        await stream.send_all(f"GET /v1/stream HTTP/1.1\r\nhost: {api}\r\n\r\n".encode())
        with trio.fail_after(10):  # an event per destination each second
            while True:
                buffer += await stream.receive_some(65536)
                assert b"text/event-stream" in buffer.partition(b"\r\n\r\n")[0]
                for line in buffer.split(b"\n"):
                    if line.startswith(b"data: {") and line.endswith(b"}"):
                        event = json.loads(line[6:])
                        if event["name"] == name:
                            return event
    finally:
        await stream.aclose()


async def test_stat_and_top_agree_with_the_traffic_sent(mesh: Mesh, origin: Origin) -> None:
    await mesh.control_plane()
    api = mesh.api
    await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    async with httpx.AsyncClient(base_url=f"http://{user.outbound}", headers={"host": "item"}) as client:
        with trio.fail_after(15):  # user's sidecar routes item
            while (await client.get("/hello")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.2)
        stat = f"http://{api}/v1/stat"
        with trio.fail_after(20):  # the control plane has scraped both sidecars twice
            while (await client.get(stat, params={"window": "300"})).json()["warming_up"]:  # noqa: ASYNC110
                await trio.sleep(0.5)
        for _ in range(40):
            assert (await client.get("/hello")).status_code == 200
        for _ in range(10):
            assert (await client.get("/status/500")).status_code == 500
        with trio.fail_after(20):  # a scrape after the traffic
            while True:
                rows = (await client.get(stat, params={"by": "edge", "window": "300"})).json()["rows"]
                if rows and rows[0]["requests"] >= 50:
                    break
                await trio.sleep(0.5)
        event = await first_event(api, "item")
    by_service = await meshlet("stat", "-o", "json", "--window", "300", "--api", api)
    by_edge = await meshlet("stat", "--by", "edge", "-o", "json", "--window", "300", "--api", api)
    table = await meshlet("stat", "--window", "300", "--api", api)
    top = await meshlet("top", "--once", "--window", "300", "--api", api)
    bad = await meshlet("stat", "--window", "0", "--api", api)
    code, out, err = by_service
    assert code == 0, err
    (item,) = json.loads(out)["rows"]
    assert (item["name"], item["requests"], item["success"]) == ("item", 50, 0.8)
    assert item["rps"] > 0 and 0 < item["p50_ms"] <= item["p95_ms"] <= item["p99_ms"]
    code, out, err = by_edge
    (edge,) = json.loads(out)["rows"]
    assert (edge["name"], edge["requests"], edge["success"]) == ("user → item", 50, 0.8)
    code, out, err = table
    assert code == 0 and "SERVICE" in out and "80.00%" in out and "item" in out, err
    code, out, err = top
    assert code == 0 and "item -" in out and "80.00%" in out, err
    assert event is not None and event["type"] == "HystrixCommand" and event["isCircuitBreakerOpen"] is False
    assert (event["requestCount"], event["errorCount"], event["errorPercentage"]) == (50, 10, 20)
    code, _, err = bad
    assert code == 2 and "--window 0: between 1 and 300 seconds" in err
