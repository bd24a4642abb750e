"""The control plane's trace store through its real HTTP API (Zipkin v2) and `meshlet
trace`: spans posted by a client, read back as a waterfall; a malformed batch refused."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import trio

from ..helpers import run_control_plane

T = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(i: int, parent: int | None, service: str, kind: str, start: int, duration: int, status: str) -> dict:
    now = int(time.time() * 1_000_000)
    made = {
        "traceId": T,
        "id": f"{i:016x}",
        "kind": kind,
        "name": "get /items/1",
        "timestamp": now + start,
        "duration": duration,
        "localEndpoint": {"serviceName": service},
        "tags": {"http.status_code": status, **({"error": status} if status >= "500" else {})},
    }
    if parent is not None:
        made["parentId"] = f"{parent:016x}"
    return made


def api_token(tmp_path: Path) -> dict[str, str]:
    """The Authorization header with the control plane's API token (run_control_plane's data dir)."""
    return {"authorization": f"Bearer {(tmp_path / 'cp' / 'api-token').read_text().strip()}"}


async def meshlet(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_spans_posted_are_drawn_by_meshlet_trace(tmp_path: Path) -> None:
    spans = [
        span(1, None, "user", "SERVER", 0, 9_000, "200"),
        span(2, 1, "user", "CLIENT", 500, 2_000, "503"),
        span(3, 1, "user", "CLIENT", 3_000, 5_000, "200"),
        span(4, 3, "item", "SERVER", 3_200, 4_500, "200"),
    ]
    async with run_control_plane(tmp_path) as cp:
        api = f"127.0.0.1:{cp.ports['api']}"
        async with httpx.AsyncClient(base_url=f"http://{api}", headers=api_token(tmp_path)) as client:
            anonymous = await client.post("/api/v2/spans", json=spans, headers={"authorization": ""})
            assert anonymous.status_code == 401  # spans take a sidecar's span token, or the API token
            assert (await client.post("/api/v2/spans", json=spans)).status_code == 202
            refused = await client.post("/api/v2/spans", json=[{"traceId": "x", "id": "1"}])
            assert (await client.get("/api/v2/services")).json() == ["item", "user"]
            found = (await client.get("/api/v2/traces", params={"serviceName": "item"})).json()
            metrics = (await client.get("/metrics")).text
        code, out, err = await meshlet("trace", T, "--api", api)
        last_code, last, _ = await meshlet("trace", "--last", "1", "--service", "user", "--api", api)
        none_code, _, none_err = await meshlet("trace", "f" * 32, "--api", api)
    assert refused.status_code == 400 and "spans[0]: traceId" in refused.json()["problems"][0]
    assert len(found) == 1 and len(found[0]) == 4
    assert "meshlet_cp_spans_stored 4.0" in metrics
    assert code == 0, err
    lines = [line for line in out.splitlines() if "get /items/1" in line]
    assert [line.split()[0] for line in lines] == ["user", "user", "user", "item"]  # tree order
    assert "503" in lines[1] and f"trace {T} · 4 spans · 9.0 ms" in out
    assert last_code == 0 and f"trace {T}" in last
    assert none_code == 1 and "no trace" in none_err


async def test_a_third_party_zipkin_exporter_writes_to_the_store(tmp_path: Path) -> None:
    # OpenTelemetry's Zipkin JSON exporter, as an app instrumented for Zipkin would send:
    # the store takes its batches as Zipkin does, and the query API answers with the tree.
    import requests
    from opentelemetry.exporter.zipkin.json import ZipkinExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind

    async with run_control_plane(tmp_path) as cp:
        api = f"127.0.0.1:{cp.ports['api']}"
        session = requests.Session()
        session.headers.update(api_token(tmp_path))  # an app the operator gave the API token to
        exporter = ZipkinExporter(endpoint=f"http://{api}/api/v2/spans", timeout=5, session=session)
        provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("test")

        def record() -> str:  # the exporter POSTs with requests (blocking): off the event loop
            with tracer.start_as_current_span("get /cart", kind=SpanKind.SERVER) as root:
                with tracer.start_as_current_span("get /items", kind=SpanKind.CLIENT) as call:
                    call.set_attribute("http.status_code", 200)
            provider.shutdown()
            return f"{root.get_span_context().trace_id:032x}"

        trace_id = await trio.to_thread.run_sync(record)
        async with httpx.AsyncClient(base_url=f"http://{api}") as client:
            trace = (await client.get(f"/api/v2/trace/{trace_id}")).json()
            services = (await client.get("/api/v2/services")).json()
        code, out, err = await meshlet("trace", trace_id, "--api", api)
    assert services == ["checkout"]
    by_kind = {s["kind"]: s for s in trace}
    assert set(by_kind) == {"SERVER", "CLIENT"}
    assert by_kind["CLIENT"]["parentId"] == by_kind["SERVER"]["id"]
    assert by_kind["CLIENT"]["tags"]["http.status_code"] == "200"  # attributes arrive as Zipkin's string tags
    assert code == 0 and "get /cart" in out and "2 spans" in out, err
