"""A sidecar does not load pydantic (nor h2) at start: the policy schema (meshlet.policy) is imported
when the first policy is pushed (sidecar/core/policies.py), so a sidecar that never receives
one never pays for it. Nor what costs it memory for nothing (benchmarks/README.md, "Memory"):
httpx (an h2c app's probe, an https collector), prometheus_client (/metrics/cardinality),
rich and the other commands' modules, PyYAML (a --static file); and a static sidecar without
TLS no cryptography (a key and certificates come with a control plane). The import contracts
(pyproject.toml) say so about the code; these tests check running processes, from the imports
Python itself reports (-X importtime)."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import trio

from ..helpers import sidecar_process, write_static
from ..mesh import Mesh

SCHEMA = ("pydantic", "pydantic_core", "meshlet.policy")
# Imported with the first HTTP/2 connection only (sidecar/net/downstream.py, inbound.py).
HTTP2 = ("h2", "hpack", "hyperframe")
# Imported where first needed, if ever (see the docstring); PyYAML by a --static sidecar only.
UNNEEDED = ("httpx", "httpcore", "prometheus_client", "rich", "meshlet.cli.commands", "meshlet.cli.check")


def imported(log: str) -> set[str]:
    """The modules a ``-X importtime`` log names (its lines: ``import time: SELF | CUMULATIVE | NAME``)."""
    return {
        line.rpartition("|")[2].strip() for line in log.splitlines() if line.startswith("import time:") and "|" in line
    }


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == name or m.startswith(f"{name}.") for name in names))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_sidecar_with_a_static_configuration_never_imports_the_policy_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the child reports each import on stderr
    port = closed_port()
    static = write_static(tmp_path / "static.yaml", {"item": {"endpoints": [f"127.0.0.1:{port}"]}})
    args = ["--service", "start-cost", "--app", f"127.0.0.1:{port}", "--static", str(static)]
    args += ["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    log = tmp_path / "sidecar.log"
    with sidecar_process(args, log) as ports:
        admin = f"http://127.0.0.1:{ports['admin']}"
        with httpx.Client(timeout=10) as client:
            # The admin views and one request through the outbound path (to an endpoint that
            # refuses): what a sidecar that is up and serving has imported by then.
            assert client.get(f"{admin}/config_dump").status_code == 200
            assert client.get(f"{admin}/metrics").status_code == 200
            call = client.get(f"http://127.0.0.1:{ports['outbound']}/", headers={"host": "item"})
            assert call.status_code == 503 and call.headers["x-meshlet-error"] == "connect-failed"
        modules = imported(log.read_text(errors="replace"))
    assert "sidecar.app" in modules, "no -X importtime report: the check would see nothing"
    assert not loaded(modules, SCHEMA), f"the sidecar imported the policy schema at start: {loaded(modules, SCHEMA)}"
    assert not loaded(modules, HTTP2), (
        f"the sidecar imported HTTP/2 before any HTTP/2 connection: {loaded(modules, HTTP2)}"
    )
    assert not loaded(modules, UNNEEDED), f"the sidecar imported what it does not need: {loaded(modules, UNNEEDED)}"
    # No control plane, no certificate: no identity, no push channel, so no cryptography (sidecar/app.py).
    crypto = loaded(modules, ("cryptography", "sidecar.net.identity", "sidecar.net.control", "meshlet.wire"))
    assert not crypto, f"a static sidecar without TLS imported the control plane's side: {crypto}"


async def test_a_sidecar_with_a_control_plane_imports_only_what_it_uses(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joined (a key, a CSR, its certificate: cryptography is needed), its app probed, a request
    served over mTLS to another sidecar and /metrics scraped."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=await mesh.origin())
    user = await mesh.sidecar("user")
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(15):
            while (await client.get(f"http://{user.outbound}/info", headers={"host": "item"})).status_code != 200:  # noqa: ASYNC110 - another process
                await trio.sleep(0.1)
        for sidecar in (item, user):
            assert "meshlet_tls_handshakes_total" in (await client.get(f"http://{sidecar.admin}/metrics")).text
    for sidecar in (item, user):
        modules = imported(sidecar.log())
        assert "sidecar.app" in modules and "cryptography.x509" in modules, "no -X importtime report, or no join"
        unneeded = loaded(modules, (*SCHEMA, *HTTP2, *UNNEEDED, "yaml"))
        assert not unneeded, f"a sidecar with a control plane imported what it does not need: {unneeded}"
