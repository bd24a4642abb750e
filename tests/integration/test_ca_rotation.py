"""A CA root rotation under steady traffic, end to end: three sidecars call each other over
mTLS while ``meshlet ca rotate`` stages a new root, it starts signing, every sidecar moves to
it and the old root leaves the bundle; a restart of the control plane in the overlap keeps
both roots trusted. Not one request fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from meshlet import processes

from ..helpers import SidecarProcess, sample
from ..mesh import Mesh
from .test_control_plane import eventually

LIFETIME = "20s"  # the sidecars' certificates: natural renewals at ~12 s, a rotation's window 2 s
OVERLAP = "20s"  # the shortest allowed: one certificate lifetime


async def meshlet(mesh: Mesh, *args: str) -> dict[str, Any]:
    command = [*processes.meshlet_command(*args), "--api", mesh.api, "--token-file", str(mesh.token_file), "-o", "json"]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)  # type: ignore[no-any-return]


async def identity(client: httpx.AsyncClient, sidecar: SidecarProcess) -> dict[str, Any]:
    dump = (await client.get(f"http://{sidecar.admin}/config_dump")).json()
    return dump["control_plane"]["identity"] or {}  # type: ignore[no-any-return]


async def on_root(client: httpx.AsyncClient, sidecars: dict[str, SidecarProcess], **expected: str) -> bool:
    """Whether every sidecar's identity (config_dump) shows ``expected``."""
    for sidecar in sidecars.values():
        shown = await identity(client, sidecar)
        if any(shown.get(key) != value for key, value in expected.items()):
            return False
    return True


class Traffic:
    """user → item and gateway → item, in bursts of concurrent calls (the bursts open new
    connections, and so new mTLS handshakes, as the sidecars' certificates change)."""

    def __init__(self, client: httpx.AsyncClient, callers: dict[str, SidecarProcess]) -> None:
        self.client = client
        self.callers = callers
        self.ok = 0
        self.failed: list[str] = []
        self.stop = trio.Event()

    async def run(self) -> None:
        width = 1
        while not self.stop.is_set():
            async with trio.open_nursery() as nursery:
                for name, caller in self.callers.items():
                    for _ in range(width):
                        nursery.start_soon(self.call, name, caller)
            width = width % 6 + 1  # 1..6 at once: the pool grows and shrinks back to idle
            await trio.sleep(0.05)

    async def call(self, name: str, caller: SidecarProcess) -> None:
        url = f"http://{caller.outbound}/delay/0.05"
        try:
            response = await self.client.get(url, headers={"host": "item"})
        except httpx.HTTPError as exc:
            self.failed.append(f"{name}: {exc!r}")
            return
        if response.status_code == 200:
            self.ok += 1
        else:
            self.failed.append(f"{name}: {response.status_code} {response.headers.get('x-meshlet-error')}")


async def test_a_root_rotation_under_traffic_fails_no_request(mesh: Mesh, tmp_path: Path) -> None:
    cp = await mesh.control_plane(extra=["--cert-lifetime", LIFETIME])
    item = await mesh.sidecar("item", app=await mesh.origin())
    user = await mesh.sidecar("user")
    gateway = await mesh.sidecar("gateway")
    audit = await mesh.sidecar("audit")  # misses the rotation: stopped before it, started after
    sidecars = {"item": item, "user": user, "gateway": gateway}
    async with httpx.AsyncClient(timeout=10) as client:

        async def routed() -> bool:
            for caller in (user, gateway):
                got = await client.get(f"http://{caller.outbound}/hello", headers={"host": "item"})
                if got.status_code != 200:
                    return False
            return await on_root(client, sidecars, state="valid")

        await eventually(routed, "user and gateway reach item over mTLS")
        await eventually(lambda: on_root(client, {"audit": audit}, state="valid"), "audit holds a certificate")
        await mesh.stop(audit)
        before = await meshlet(mesh, "ca", "status")
        old_root = before["current"]["fingerprint"]
        assert before["next"] is None and before["retired"] == [] and before["bundle_roots"] == 1
        handshakes_before = sum(
            [
                sample(
                    (await client.get(f"http://{s.admin}/metrics")).text, "meshlet_tls_handshakes_total", side="client"
                )
                for s in (user, gateway)
            ]
        )

        traffic = Traffic(client, {"user": user, "gateway": gateway})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run)
            await trio.sleep(1)
            rotated = await meshlet(mesh, "ca", "rotate", "--overlap", OVERLAP, "--propagation", "2s")
            new_root = rotated["next"]["fingerprint"]
            assert new_root != old_root and rotated["current"]["fingerprint"] == old_root
            assert rotated["bundle_roots"] == 2

            async def all_on_the_new_root() -> bool:
                return await on_root(client, sidecars, issuer_fingerprint=new_root)

            await eventually(all_on_the_new_root, "every sidecar holds a certificate of the new root", timeout=30)
            # A sidecar that missed the rotation trusts the old root only: it still verifies the
            # control plane (whose own certificate the old root signs through the overlap) and moves on.
            assert (tmp_path / "data-audit" / "audit.bundle.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 1
            audit = await mesh.sidecar("audit")
            await eventually(
                lambda: on_root(client, {"audit": audit}, issuer_fingerprint=new_root), "audit on the new root"
            )
            during = await meshlet(mesh, "ca", "status")
            assert during["current"]["fingerprint"] == new_root
            assert [r["fingerprint"] for r in during["retired"]] == [old_root]
            await trio.sleep(2)  # requests go on, on the new certificates

            # A restart in the overlap: both roots are still trusted, the new one still signs.
            await mesh.stop(cp)
            cp = await mesh.control_plane(listen=f"127.0.0.1:{cp.ports['push']}", extra=["--cert-lifetime", LIFETIME])
            restarted = await meshlet(mesh, "ca", "status")
            assert restarted["current"]["fingerprint"] == new_root
            assert [r["fingerprint"] for r in restarted["retired"]] == [old_root]
            assert restarted["bundle_roots"] == 2

            async def old_root_gone() -> bool:
                status = await meshlet(mesh, "ca", "status")
                return bool(status["retired"] == [] and status["bundle_roots"] == 1)

            await eventually(old_root_gone, "the old root leaves the bundle", timeout=40)

            async def sidecars_dropped_it() -> bool:
                for name in sidecars:
                    bundle = (tmp_path / f"data-{name}" / f"{name}.bundle.pem").read_bytes()
                    if bundle.count(b"BEGIN CERTIFICATE") != 1:
                        return False
                return True

            await eventually(sidecars_dropped_it, "every sidecar's bundle holds the new root only", timeout=15)
            await trio.sleep(1)
            traffic.stop.set()
        handshakes_after = sum(
            [
                sample(
                    (await client.get(f"http://{s.admin}/metrics")).text, "meshlet_tls_handshakes_total", side="client"
                )
                for s in (user, gateway)
            ]
        )
    assert traffic.failed == [], traffic.failed[:5]
    assert traffic.ok > 200, traffic.ok
    assert handshakes_after > handshakes_before  # new connections were made on the way
    print(
        f"rotation: {traffic.ok} requests, 0 failed, {handshakes_after - handshakes_before:g} handshakes",
        file=sys.stderr,
    )
