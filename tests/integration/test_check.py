"""`meshlet check` against a real mesh: a healthy one passes every check (exit 0, every line
✓); a plaintext caller of a permissive service's inbound port is reported as a warning naming
the service; `-o json` parses. The verdicts one by one are in tests/meshlet/test_check.py."""

from __future__ import annotations

import json
import sys
import time

import httpx
import trio

from ..helpers import raw_exchange
from ..mesh import Mesh
from ..origin import Origin

MESH_CONFIG = "kind: MeshConfig\nname: mesh\nmtls: {mode: permissive}\n"
PLAINTEXT = b"GET /hello HTTP/1.1\r\nHost: item\r\nConnection: close\r\n\r\n"


async def check(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", "check", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_a_healthy_mesh_passes_and_a_plaintext_caller_is_a_warning(mesh: Mesh, origin: Origin) -> None:
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    await mesh.apply(MESH_CONFIG)  # returns once both sidecars ACKed it
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(15):  # user's sidecar routes item, over mTLS
            while (await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.2)
        status = (await client.get(f"http://{mesh.api}/v1/status")).json()
    identities = {s["service"]: s["identity"] for s in status["sidecars"]}
    assert identities["item"]["spiffe_id"] == "spiffe://meshlet.local/service/item"
    assert 23 * 3600 < identities["item"]["not_after"] - time.time() <= 24 * 3600  # issued at its join, for 24 h

    code, out, err = await check("--api", mesh.api)
    assert code == 0, out + err
    marked = [line for line in out.splitlines() if line[:2] in ("✓ ", "‼ ", "✗ ")]
    assert len(marked) >= 13 and all(line.startswith("✓ ") for line in marked), out
    for words in (
        f"the control plane API answers at {mesh.api}",
        "the root certificate is valid now",
        "item-",
        "holds a certificate for item",
        "mode permissive",
    ):
        assert words in out
    assert out.rstrip().endswith("Status check results are ✓")

    assert (await raw_exchange(item.ports["inbound"], PLAINTEXT)).startswith(b"HTTP/1.1 200 ")  # a plain curl
    with trio.fail_after(30):  # the control plane scrapes item's sidecar every 2 s
        while True:
            code, out, err = await check("--api", mesh.api, "-o", "json")
            lines = json.loads(out)
            warned = [line for line in lines if line["group"] == "traffic" and not line["ok"]]
            if warned:
                break
            await trio.sleep(0.5)
    assert code == 0, err  # a warning is not a failure
    (edge,) = warned
    assert edge["severity"] == "warning" and edge["check"] == "no plaintext callers reach item"
    assert "item served 1 plaintext request in the last" in edge["detail"] and "mode permissive" in edge["detail"]
    assert edge["hint"]
    assert {line["group"] for line in lines} == {"control plane", "certificate authority", "sidecars", "traffic"}
    assert all(line["ok"] for line in lines if line is not edge)


async def test_an_unreachable_control_plane_fails_the_check(mesh: Mesh) -> None:
    code, out, _ = await check("--api", "127.0.0.1:1")
    assert code == 1
    assert (
        "✗ the control plane API answers at 127.0.0.1:1" in out and "hint: is `meshlet control-plane` running?" in out
    )


async def test_the_status_follows_each_certificate_issued(mesh: Mesh) -> None:
    """The control plane records each certificate it issues (at the join, then at each renewal):
    what `meshlet check` judges a sidecar's expiry by."""
    await mesh.control_plane(extra=["--cert-lifetime", "6s"])  # renewal due after ~4 s
    await mesh.sidecar("item")

    async def issued_after(after: float) -> dict[str, float]:
        """item's certificate, once the control plane has issued one expiring after ``after``."""
        async with httpx.AsyncClient(timeout=10) as client:
            with trio.fail_after(20):
                while True:
                    sidecars = (await client.get(f"http://{mesh.api}/v1/status")).json()["sidecars"]
                    if sidecars and sidecars[0]["identity"]["not_after"] > after:
                        return sidecars[0]["identity"]  # type: ignore[no-any-return]
                    await trio.sleep(0.5)

    joined = await issued_after(0)
    assert joined["not_after"] - joined["not_before"] == 6 + 60  # its lifetime, and the clock skew allowed
    renewed = await issued_after(joined["not_after"])  # its renewal
    assert renewed["not_before"] > joined["not_before"]
    code, out, _ = await check("--api", mesh.api, "-o", "json")
    (held,) = [line for line in json.loads(out) if line["check"].endswith("holds a certificate for item")]
    assert held["ok"] and held["detail"] == "spiffe://meshlet.local/service/item"
