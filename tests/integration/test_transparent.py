"""Transparent mode end to end (docs/architecture.md, issue 8): two hosts in network namespaces,
``meshlet init-iptables`` in each, a sidecar with ``--transparent`` next to each app, and
an unmodified app (curl, no proxy settings, running as nobody) that dials the other
service's IP:PORT. The control plane runs on host b, as a real process.

    host a 10.77.0.1                          host b 10.77.0.2
    curl ──REDIRECT──▶ sidecar user :15001 ──▶ sidecar item :15006 ──▶ app item :8080
                                              control plane :15010/:15000, app :9090 :7070
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ..helpers import SidecarProcess, join_token_file, run_meshlet, sample
from ..netns import Host, need_netns, run_app, two_hosts

ITEM_URL = "http://10.77.0.2:8080/items/1"


@dataclass
class Mesh:
    a: Host
    b: Host
    user: SidecarProcess
    item: SidecarProcess
    tmp_path: Path

    async def apply(self, text: str) -> None:
        """``meshlet apply`` on host b (the control plane's API is on its loopback)."""
        policy = self.tmp_path / "policy.yaml"
        policy.write_text(text)
        token = str(self.tmp_path / "cp" / "api-token")
        await self.b.meshlet("apply", "--token-file", token, "-f", str(policy), "--api", "127.0.0.1:15000")


def _sidecar(host: Host, service: str, control_plane: str, tmp_path: Path) -> list[str]:
    return [
        "sidecar",
        "--service",
        service,
        "--app",
        "127.0.0.1:8080",
        "--inbound",
        "0.0.0.0:15006",
        "--outbound",
        "127.0.0.1:15001",
        "--admin",
        "127.0.0.1:15090",
        "--advertise",
        host.ip,
        "--control-plane",
        control_plane,
        "--data-dir",
        str(tmp_path / f"data-{service}"),
        "--transparent",
        "--join-token",
        f"@{join_token_file(tmp_path)}",
    ]


@asynccontextmanager
async def transparent_mesh(tmp_path: Path, *, proxy_uid: int = 0) -> AsyncIterator[Mesh]:
    """Rules first (an init container's job), then the control plane, apps and sidecars.
    The sidecars run as root here, so root is the exempt uid (``--proxy-uid 0``); the app
    runs as nobody, whose traffic is redirected."""
    need_netns()
    async with AsyncExitStack() as stack:
        a, b = await stack.enter_async_context(two_hosts())
        await a.meshlet("init-iptables", "--proxy-uid", str(proxy_uid), "--exclude-outbound-ports", "9090")
        await b.meshlet("init-iptables", "--proxy-uid", str(proxy_uid), "--inbound-ports", "8080")
        cp_args = ["control-plane", "--listen", "0.0.0.0:15010", "--api", "0.0.0.0:15000"]
        cp_args += ["--data-dir", str(tmp_path / "cp")]
        await stack.enter_async_context(
            run_meshlet(tmp_path, "control-plane", cp_args, "meshlet control-plane ready", prefix=b.exec())
        )
        await stack.enter_async_context(run_app(a, "user", 8080, log_dir=tmp_path))
        await stack.enter_async_context(run_app(b, "item", 8080, 9090, 7070, log_dir=tmp_path))
        item = await stack.enter_async_context(
            run_meshlet(
                tmp_path,
                "sidecar-item",
                _sidecar(b, "item", "127.0.0.1:15010", tmp_path),
                "meshlet sidecar ready",
                prefix=b.exec(),
            )
        )
        user = await stack.enter_async_context(
            run_meshlet(
                tmp_path,
                "sidecar-user",
                _sidecar(a, "user", f"{b.ip}:15010", tmp_path),
                "meshlet sidecar ready",
                prefix=a.exec(),
            )
        )
        mesh = Mesh(a, b, user, item, tmp_path)
        with trio.fail_after(30):  # until user's sidecar has item's endpoint (and item is ready)
            while '"item"' not in (await a.curl("http://127.0.0.1:15090/config_dump", uid=0)).body:  # noqa: ASYNC110
                await trio.sleep(0.2)
        yield mesh


async def test_an_unmodified_app_goes_through_both_sidecars(tmp_path: Path) -> None:
    async with transparent_mesh(tmp_path) as mesh:
        a, b = mesh.a, mesh.b
        replies = [await a.curl(f"{ITEM_URL}?n={n}") for n in range(5)]
        for reply in replies:
            assert (reply.exit_code, reply.status) == (0, 200), reply
            seen = reply.json()
            assert seen["app"] == "item" and seen["port"] == 8080
            # Both hops on the way: each sidecar added a via; the caller's counted the attempt.
            assert seen["headers"].get("x-meshlet-attempt") == "1", seen["headers"]
            assert seen["headers"]["via"].count("meshlet") == 2, seen["headers"]
            assert "traceparent" in seen["headers"]
            assert seen["headers"]["host"] == "10.77.0.2:8080"  # what the app sent, untouched
        out, into = await a.metrics(), await b.metrics()
        # Each request crossed each sidecar exactly once: no loop, no bypass.
        outbound = {"direction": "outbound", "destination": "item", "code": "200"}
        assert sample(out, "meshlet_requests_total", **outbound) == 5
        assert sample(into, "meshlet_requests_total", direction="inbound", source="user", code="200") == 5
        intercepted = {"outcome": "service", "destination": "item"}
        assert sample(out, "meshlet_transparent_connections_total", **intercepted) == 5

        # The trace of one request: spans from both sidecars, in the control plane's store.
        trace_id = replies[0].json()["headers"]["traceparent"].split("-")[1]
        with trio.fail_after(20):
            while True:
                found = await b.curl(f"http://127.0.0.1:15000/api/v2/trace/{trace_id}", uid=0)
                services = {s["localEndpoint"]["serviceName"] for s in found.json()} if found.status == 200 else set()
                if services >= {"user", "item"}:
                    break
                await trio.sleep(0.3)

        # An excluded port is reached directly: neither sidecar sees it.
        direct = await a.curl("http://10.77.0.2:9090/direct")
        assert (direct.status, direct.json()["port"]) == (200, 9090)
        assert "via" not in direct.json()["headers"]
        assert direct.json()["peer"] == a.ip
        out = await a.metrics()
        assert sample(out, "meshlet_requests_total", **outbound) == 5
        assert sample(out, "meshlet_transparent_connections_total", outcome="passthrough") == 0

        # An address no service has: passed through as TCP (ALLOW_ANY, the default) ...
        passed = await a.curl("http://10.77.0.2:7070/elsewhere")
        assert (passed.status, passed.json()["port"]) == (200, 7070)
        assert "via" not in passed.json()["headers"]  # bytes copied, not proxied as HTTP
        out = await a.metrics()
        assert sample(out, "meshlet_transparent_connections_total", outcome="passthrough", destination="") == 1

        # ... or refused under REGISTRY_ONLY, while mesh services still work.
        await mesh.apply("kind: MeshConfig\nname: mesh\noutbound_traffic_policy: REGISTRY_ONLY\n")
        with trio.fail_after(20):
            while (refused := await a.curl("http://10.77.0.2:7070/elsewhere")).exit_code == 0:  # noqa: ASYNC110
                await trio.sleep(0.2)
        assert refused.status == 0 and refused.exit_code in (7, 52, 56), refused  # reset at once
        assert (await a.curl(ITEM_URL)).status == 200
        out = await a.metrics()
        assert sample(out, "meshlet_transparent_connections_total", outcome="blocked", destination="") >= 1
        assert "outbound_traffic_policy is REGISTRY_ONLY" in mesh.user.log()


async def test_remove_restores_direct_traffic(tmp_path: Path) -> None:
    async with transparent_mesh(tmp_path) as mesh:
        a = mesh.a
        assert (await a.curl(ITEM_URL)).status == 200
        removed = await a.meshlet("init-iptables", "--remove")
        assert b"removed" in removed.stdout
        saved = (await a.run("iptables-save", "-t", "nat")).stdout.decode()
        assert "MESHLET" not in saved, saved
        direct = await a.curl(ITEM_URL)
        # Not through user's sidecar any more; item's (whose rules stay) still takes it in.
        assert direct.status == 200 and direct.json()["headers"]["via"].count("meshlet") == 1
        out = await a.metrics()
        assert sample(out, "meshlet_transparent_connections_total", outcome="service", destination="item") == 1
        again = await a.meshlet("init-iptables", "--remove")
        assert b"nothing to remove" in again.stdout


async def test_a_sidecar_whose_traffic_is_not_exempt_does_not_loop(tmp_path: Path) -> None:
    """Rules that exempt another uid than the sidecar's: its own call to item comes back
    to it. It says so (508 loop-detected) instead of sending it round for ever."""
    async with transparent_mesh(tmp_path) as mesh:
        a = mesh.a
        # Before any request: the sidecar's pooled connection to item would be NATed already.
        await a.meshlet("init-iptables", "--proxy-uid", "4242", "--exclude-outbound-ports", "9090")
        looped = await a.curl(ITEM_URL)
        assert looped.status == 508, looped
        assert looped.headers.get("x-meshlet-error") == "loop-detected"
        assert "--proxy-uid" in looped.body
        out = await a.metrics()
        # The request went round once: the app's connection, and the sidecar's own (mTLS), back.
        assert sample(out, "meshlet_transparent_connections_total", outcome="service", destination="item") == 1
        assert sample(out, "meshlet_transparent_connections_total", outcome="loop", destination="item") == 1
        # The same for plain TCP passthrough: the sidecar's own connection is recognised.
        passed = await a.curl("http://10.77.0.2:7070/elsewhere", max_time=5)
        assert passed.status == 0 and passed.exit_code != 0, passed
        out = await a.metrics()
        assert sample(out, "meshlet_transparent_connections_total", outcome="loop", destination="") == 1
