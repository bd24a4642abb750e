"""A sidecar given two control-plane replicas (``--control-plane A,B``) moves between them and
never stops serving: when A ends its session after the maximum age (``--max-session-age``),
and when A is killed. Each replica here has its own store and registry (and shares the CA and
the join token), so each knows the ``item`` instance whose sidecar talks to it: the caller's
requests go to item-a while it is on A, to item-b once on B. Real processes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from ..helpers import (
    CONTROL_PLANE_READY,
    SidecarProcess,
    run_control_plane,
    run_meshlet,
    run_sidecar,
    sample,
)
from ..origin import Origin
from .test_control_plane import calls, eventually, free_port, learns


@dataclass
class Replicas:
    a: SidecarProcess
    b: SidecarProcess
    item_a: SidecarProcess  # registered with A only
    item_b: SidecarProcess  # registered with B only
    user: SidecarProcess  # --control-plane A,B

    async def connected(self, cp: SidecarProcess) -> set[str]:
        """The services of the sidecars whose session is on ``cp`` now."""
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"http://127.0.0.1:{cp.ports['api']}/v1/status")).json()
        return {s["service"] for s in status["sidecars"] if s["connected"]}

    async def ended_for_age(self, cp: SidecarProcess) -> float:
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{cp.ports['api']}/metrics")).text
        return sample(metrics, "meshlet_cp_sessions_ended_total", reason="max-age")


@asynccontextmanager
async def replicas(
    tmp_path: Path, origin: Origin, a_extra: list[str], b_extra: tuple[str, ...] = (), a_listen: str = "127.0.0.1:0"
) -> AsyncIterator[Replicas]:
    async with run_control_plane(tmp_path, listen=a_listen, extra=a_extra) as a:
        b_dir = tmp_path / "cp-b"  # another store and registry; A's CA and join token
        b_dir.mkdir(mode=0o700)
        shutil.copy2(tmp_path / "cp" / "join-token", b_dir / "join-token")
        shutil.copytree(tmp_path / "cp" / "ca", b_dir / "ca")
        b_args = [
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--data-dir",
            str(b_dir),
            *b_extra,
        ]
        async with run_meshlet(tmp_path, "control-plane-b", b_args, CONTROL_PLANE_READY) as b:
            push_a, push_b = (f"127.0.0.1:{cp.ports['push']}" for cp in (a, b))
            app = f"127.0.0.1:{origin.port}"
            async with (
                run_sidecar(tmp_path, service="item", app=app, control_plane=push_a) as item_a,
                run_sidecar(
                    tmp_path,
                    service="item",
                    app=app,
                    control_plane=push_b,
                    extra=["--data-dir", str(tmp_path / "data-item-b")],
                ) as item_b,
                run_sidecar(
                    tmp_path,
                    service="user",
                    app="127.0.0.1:1",
                    control_plane=f"{push_a},{push_b}",
                    extra=["--control-plane-ca", str(tmp_path / "cp" / "ca" / "ca.crt")],  # no warning: no TOFU
                ) as user,
            ):
                yield Replicas(a, b, item_a, item_b, user)


class Traffic:
    """Requests through the user's sidecar to ``item``, one after another, until stopped."""

    def __init__(self, user: SidecarProcess) -> None:
        self.user = user
        self.statuses: dict[int, int] = {}
        self.stopped = False

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while not self.stopped:
                response = await client.get(f"http://{self.user.outbound}/hello", headers={"host": "item"})
                self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
                await trio.sleep(0.02)  # pacing, not synchronisation

    async def served_more(self, count: int, what: str) -> None:
        """Wait until ``count`` more requests succeeded (bounded)."""
        target = self.statuses.get(200, 0) + count

        async def done() -> bool:
            return self.statuses.get(200, 0) >= target

        await eventually(done, what, timeout=15)


async def test_a_session_past_its_maximum_age_moves_to_the_next_replica_without_a_failed_request(
    tmp_path: Path, origin: Origin
) -> None:
    async with replicas(tmp_path, origin, ["--max-session-age", "2s"]) as mesh:
        assert (await calls(mesh.user, "item")).status_code == 200  # A pushed item-a (B may have, if A was quick)
        traffic = Traffic(mesh.user)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run)

            async def moved() -> bool:
                return "user" in await mesh.connected(mesh.b)

            await eventually(moved, "the user's session moved to B", timeout=15)
            await learns(mesh.user, "item", [mesh.item_b.inbound])  # now from B
            await traffic.served_more(20, "requests served after the move")
            traffic.stopped = True
        assert set(traffic.statuses) == {200}, traffic.statuses
        assert await mesh.ended_for_age(mesh.a) >= 1
        assert await mesh.ended_for_age(mesh.b) == 0  # B's default age: 30 min
        assert "user" not in await mesh.connected(mesh.a)
        user_log = mesh.user.log()
        assert "ended the session after its maximum age; reconnecting to" in user_log
        assert " WARNING " not in user_log, user_log
        # Not a failure on A's side either: no warning; item-a, aged out too, came back to A.
        assert "session ended after its maximum age" in mesh.a.log()
        assert " WARNING " not in mesh.a.log(), mesh.a.log()
        assert "item" in await mesh.connected(mesh.a)


async def test_a_sidecar_whose_replica_is_killed_moves_to_the_next_within_its_backoff_and_back_by_age(
    tmp_path: Path, origin: Origin
) -> None:
    """Kill -9 A: the sidecar is on B after its first backoff. Restart A: B's maximum age (2 s
    here, A's the default) sends it back to A, the next address, where it stays."""
    a_listen = f"127.0.0.1:{free_port()}"
    async with replicas(tmp_path, origin, [], ("--max-session-age", "2s"), a_listen) as mesh:
        await learns(mesh.user, "item", [mesh.item_a.inbound])
        traffic = Traffic(mesh.user)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run)
            await traffic.served_more(5, "requests served before A dies")
            os.killpg(mesh.a.process.pid, signal.SIGKILL)

            async def on_b() -> bool:
                return "user" in await mesh.connected(mesh.b)

            # The first reconnect goes to B, after at most the first backoff (0.5 s) and a connect.
            await eventually(on_b, "the user's session on B", timeout=5)
            await traffic.served_more(20, "requests served once on B")

            async with run_control_plane(tmp_path, listen=a_listen) as again:  # the same store, CA and token

                async def back_on_a() -> bool:
                    return "user" in await mesh.connected(again)

                await eventually(back_on_a, "the user's session back on the restarted A", timeout=15)
                await traffic.served_more(20, "requests served once back on A")
                traffic.stopped = True
        assert set(traffic.statuses) == {200}, traffic.statuses
        assert await mesh.ended_for_age(mesh.b) >= 1
