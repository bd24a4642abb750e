"""A control plane started on an empty data directory (a lost volume) does not open an
AccessPolicy: the sidecars keep it, the new control plane reports the conflict, and once the
policies are applied to it the sidecars adopt its store and removals work again.

Both control planes sign with the operator's root (--ca-cert/--ca-key, kept outside the data
directory, as a Kubernetes secret would be): with a root of its own in the lost volume, the new
control plane would have a new CA that the sidecars refuse, and they would stay on what they
hold without ever hearing of it (fail-static, closed too, but no store conflict to resolve)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from control_plane import ca

from ..helpers import SidecarProcess, run_control_plane, sample
from ..mesh import Mesh
from .test_control_plane import eventually, free_port, learns, meshlet

DENY_GATEWAY = """\
kind: AccessPolicy
name: item-callers
service: item
rules:
  - sources: [user]
"""
KEPT = ["AccessPolicy/item-callers"]


def copy_api(process: SidecarProcess) -> str:
    return f"127.0.0.1:{process.ports['api']}"


TTL = "6"  # the new control plane's warm-up: one lease TTL (above the 5 s pings that renew leases)


async def test_an_empty_store_does_not_open_an_access_policy(tmp_path: Path, mesh: Mesh) -> None:
    listen = f"127.0.0.1:{free_port()}"
    ca.write_root(tmp_path / "operator", ca.create_root("meshlet.local", time.time(), random.Random(3)))
    root = [
        "--ca-cert",
        str(tmp_path / "operator" / ca.CERT_FILE),
        "--ca-key",
        str(tmp_path / "operator" / ca.KEY_FILE),
    ]
    item = await mesh.origin()
    old = await mesh.control_plane(listen=listen, extra=["--ttl", TTL, *root])
    item_sidecar = await mesh.sidecar("item", app=item)
    user = await mesh.sidecar("user")
    gateway = await mesh.sidecar("gateway")
    async with httpx.AsyncClient(timeout=10) as client:

        async def status() -> dict[str, Any]:
            answer: dict[str, Any] = (await client.get(f"http://{mesh.api}/v1/status")).json()
            return answer

        async def code(caller: SidecarProcess) -> int:
            response = await client.get(f"http://{caller.outbound}/hello", headers={"host": "item"})
            return response.status_code

        async def policies_store(sidecar: SidecarProcess) -> str:
            dump = (await client.get(f"http://{sidecar.admin}/config_dump")).json()
            return str(dump["control_plane"]["policies_store"])

        async def served_by_item() -> bool:  # both callers know item (and item its policy's absence)
            return await code(user) == 200 and await code(gateway) == 200

        await eventually(served_by_item, "both callers reach item")
        await mesh.apply(DENY_GATEWAY)
        assert (await code(gateway), await code(user)) == (403, 200)
        old_store = (await status())["store"]
        assert await policies_store(item_sidecar) == old_store

        # The volume is lost: a control plane on the same port, on an empty data dir.
        await mesh.stop(old)
        (tmp_path / "cp").rename(tmp_path / "cp-lost")
        await mesh.control_plane(listen=listen, extra=["--ttl", TTL, *root])
        new_store = (await status())["store"]
        assert new_store != old_store

        async def all_in_conflict() -> bool:
            sidecars = (await status())["sidecars"]
            conflicted = [s for s in sidecars if s["connected"] and (s["store_conflict"] or {}).get("kept") == KEPT]
            return len(conflicted) == 3

        await eventually(all_in_conflict, "the three sidecars reconnect, each keeping the AccessPolicy")
        await trio.sleep(float(TTL) + 1)  # past the warm-up, when removals would go out
        assert (await code(gateway), await code(user)) == (403, 200)  # not 200: nothing opened
        current = await status()
        assert current["store_conflicts"] == 3
        assert {s["policies_store"] for s in current["sidecars"]} == {old_store}
        metrics = (await client.get(f"http://{mesh.api}/metrics")).text
        assert sample(metrics, "meshlet_cp_store_conflicts") == 3
        exit_code, out, _ = await meshlet("status", "--api", mesh.api)
        assert exit_code == 0 and "store-conflict: 3 sidecar(s) keep policies" in out and "re-apply" in out
        assert (
            "ERROR" in item_sidecar.log() and "store-conflict: keeping AccessPolicy/item-callers" in item_sidecar.log()
        )

        # A sidecar restarted now serves from its cache and still names the old store.
        await mesh.stop(item_sidecar)
        item_sidecar = await mesh.sidecar("item", app=item)
        assert await policies_store(item_sidecar) == old_store
        await learns(gateway, "item", [item_sidecar.inbound])
        assert await code(gateway) == 403
        assert await all_in_conflict()

        # The way out: the policies, read from a copy of the old data dir, applied to the new store.
        async with run_control_plane(tmp_path, extra=["--data-dir", str(tmp_path / "cp-lost")]) as copy:
            exit_code, stream, _ = await meshlet("get", "policies", "-o", "yaml", "--api", copy_api(copy))
        assert exit_code == 0 and "name: item-callers" in stream
        await mesh.apply(stream)  # returns once every sidecar ACKed: each adopts the new store

        async def none_in_conflict() -> bool:
            current = await status()
            return current["store_conflicts"] == 0 and all(s["store_conflict"] is None for s in current["sidecars"])

        await eventually(none_in_conflict, "the conflict clears")
        for sidecar in (item_sidecar, user, gateway):
            assert await policies_store(sidecar) == new_store
        assert (await code(gateway), await code(user)) == (403, 200)

        # ... and then a removal is a removal.
        await mesh.apply("kind: AccessPolicy\nname: other\nservice: pay\nrules:\n  - sources: [user]\n")
        assert await code(gateway) == 200
