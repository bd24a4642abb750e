"""Control-plane replicas on a real etcd: real processes (etcd, two control planes, sidecars, apps).

Each test keeps to a key prefix of its own on the module's etcd (``etcd1``), or has three members of
its own (``etcd3``) when it kills some."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ..etcd_cluster import EtcdCluster
from ..helpers import CONTROL_PLANE_READY, SidecarProcess, run_meshlet, run_sidecar
from ..origin import Origin

TTL = "6s"  # short leases (longer than the sidecars' 5 s ping): a dead replica's instances go within seconds
BOUND = 30.0  # every wait on a condition is bounded by this

ROUTE = """
kind: Route
name: item
host: item
rules:
  - {name: all, destinations: [{service: item}]}
"""


def store_of(etcd: EtcdCluster, tmp_path: Path, members: list[str] | None = None) -> str:
    """An etcd store spec with a prefix of this test's own."""
    urls = [m.client_url for m in etcd.members if members is None or m.name in members]
    hosts = ",".join(url.removeprefix("http://") for url in urls)
    return f"etcd://{hosts}/{re.sub(r'[^a-z0-9]', '', tmp_path.name.lower())[-40:]}"


class Replica:
    def __init__(self, process: SidecarProcess, data_dir: Path) -> None:
        self.process = process
        self.data_dir = data_dir

    @property
    def push(self) -> str:
        return f"127.0.0.1:{self.process.ports['push']}"

    @property
    def api(self) -> str:
        return f"127.0.0.1:{self.process.ports['api']}"

    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://{self.api}{path}", headers={"authorization": f"Bearer {self.token()}"})
            response.raise_for_status()
            return response.json()

    async def status(self) -> Any:
        return await self.get("/v1/status")


@asynccontextmanager
async def replica(
    tmp_path: Path, name: str, store: str, extra: list[str] | None = None, *, listen: str = "127.0.0.1:0"
) -> AsyncIterator[Replica]:
    data_dir = tmp_path / name
    args = ["control-plane", "--listen", listen, "--api", "127.0.0.1:0", "--data-dir", str(data_dir)]
    args += ["--store", store, "--ttl", TTL, *(extra or [])]
    async with run_meshlet(tmp_path, name, args, CONTROL_PLANE_READY) as process:
        yield Replica(process, data_dir)


async def eventually(what: str, check: Callable[[], Awaitable[bool]], bound: float = BOUND) -> None:
    """Wait until ``check`` holds, polling; fail naming ``what`` (and the last error) after ``bound`` seconds."""
    last = ""
    with trio.move_on_after(bound):
        while True:
            try:
                if await check():
                    return
            except (httpx.HTTPError, KeyError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await trio.sleep(0.1)
    pytest.fail(f"not within {bound:g} s: {what} {last}")


def sidecar(tmp_path: Path, service: str, app: str, control_planes: list[Replica], first: Replica) -> Any:
    token = f"@{first.data_dir / 'join-token'}"
    push = ",".join(r.push for r in control_planes)
    return run_sidecar(tmp_path, service=service, app=app, control_plane=push, join_token=token)


async def call(user: SidecarProcess, path: str = "/hello") -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://{user.outbound}{path}", headers={"host": "item"})
        return response.status_code


def sidecars_of(status: Any) -> dict[str, Any]:
    return {s["service"]: s for s in status["sidecars"] if s["connected"]}


class Mesh:
    """Two replicas on one store, an app behind ``item``'s sidecar and a ``user`` sidecar that calls
    it, each sidecar on the replicas it is given (the first of the list first)."""

    def __init__(self, tmp_path: Path, stack: AsyncExitStack, a: Replica, b: Replica, origin: Origin) -> None:
        self.tmp_path = tmp_path
        self.stack = stack
        self.a, self.b = a, b
        self.origin = origin
        self.user: SidecarProcess | None = None

    async def sidecar(self, service: str, on: list[Replica]) -> SidecarProcess:
        app = f"127.0.0.1:{self.origin.port}" if service == "item" else "127.0.0.1:1"
        return await self.stack.enter_async_context(sidecar(self.tmp_path, service, app, on, self.a))

    async def routed(self, user: SidecarProcess) -> None:
        async def reached() -> bool:
            return await call(user) == 200

        await eventually("user reaches item", reached)

    async def apply(self, on: Replica) -> subprocess.CompletedProcess[bytes]:
        policy = self.tmp_path / "route.yaml"
        policy.write_text(ROUTE)
        command = [sys.executable, "-m", "meshlet", "apply", "-f", str(policy), "--api", on.api]
        command += ["--token-file", str(on.data_dir / "api-token")]
        return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)

    async def acked(self, on: Replica, service: str, what: str) -> None:
        """Wait until ``on`` serves the policy cp-a applied and ``service``'s sidecar, connected to
        ``on``, ACKed it."""
        version = (await self.a.get("/v1/policies"))["version"]
        assert version

        async def converged() -> bool:
            if (await on.get("/v1/policies"))["version"] != version:
                return False  # not read again from etcd yet
            held = sidecars_of(await on.status())[service]
            return bool(held["acked"].get("policies") == held["versions"].get("policies") != "")

        await eventually(what, converged)

    async def has_item(self, on: Replica) -> bool:
        return bool((await on.get("/v1/endpoints?service=item"))["endpoints"].get("item"))


@asynccontextmanager
async def two_replicas(
    tmp_path: Path, nursery: trio.Nursery, stores: tuple[str, str], b_extra: list[str] | None = None
) -> AsyncIterator[Mesh]:
    origin = Origin()
    await nursery.start(origin.serve)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(replica(tmp_path, "cp-a", stores[0]))
        b = await stack.enter_async_context(replica(tmp_path, "cp-b", stores[1], b_extra))
        yield Mesh(tmp_path, stack, a, b, origin)


class Traffic:
    """Requests from ``user`` to item every 20 ms until stopped: how many, and which failed."""

    def __init__(self, user: SidecarProcess) -> None:
        self.user = user
        self.requests = 0
        self.failures: list[str] = []
        self._done = trio.Event()

    @property
    def stopped(self) -> bool:
        return self._done.is_set()

    async def run(self) -> None:
        while not self.stopped:
            status = await call(self.user)
            self.requests += 1
            if status != 200:
                self.failures.append(str(status))
            await trio.sleep(0.02)

    async def stop_after_more(self, count: int = 5) -> None:
        """A few more requests, so that they cover what just happened, then stop."""
        after = self.requests

        async def more() -> bool:
            return self.requests >= after + count

        await eventually(f"{count} more requests", more)
        self._done.set()


async def test_two_replicas_serve_one_mesh(etcd1: EtcdCluster, tmp_path: Path, nursery: trio.Nursery) -> None:
    store = store_of(etcd1, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store)) as mesh:
        a, b = mesh.a, mesh.b
        # One copy of the tokens for both: the first to start made them, the other took them.
        assert a.token() == b.token()
        assert (a.data_dir / "join-token").read_bytes() == (b.data_dir / "join-token").read_bytes()
        assert (a.data_dir / "ca" / "ca.crt").read_bytes() == (b.data_dir / "ca" / "ca.crt").read_bytes()
        await mesh.sidecar("item", [a])
        user = await mesh.sidecar("user", [b])
        await mesh.routed(user)  # item registered on cp-a, called through a sidecar of cp-b: from etcd
        status = await a.status()
        cluster = status["cluster"]
        b_id = (await b.status())["cluster"]["id"]
        assert sorted(r["id"] for r in cluster["replicas"]) == sorted([cluster["id"], b_id])
        assert cluster["leader"] in {cluster["id"], b_id}
        assert [m["error"] for m in cluster["members"]] == [""]
        assert status["store"] == (await b.status())["store"]
        # A policy applied on cp-a reaches the sidecar on cp-b.
        result = await mesh.apply(a)
        assert result.returncode == 0, result.stderr.decode()
        await mesh.acked(b, "user", "the policy applied on cp-a is ACKed by the sidecar on cp-b")
        assert (await b.get("/v1/policies"))["version"] == (await a.get("/v1/policies"))["version"]


async def test_a_killed_replicas_sidecars_move_and_nothing_is_lost(
    etcd1: EtcdCluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = store_of(etcd1, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store)) as mesh:
        a, b = mesh.a, mesh.b
        await mesh.sidecar("item", [a, b])
        user = await mesh.sidecar("user", [b])
        await mesh.routed(user)
        b_id = (await b.status())["cluster"]["id"]
        traffic = Traffic(user)

        async def endpoints_on_b() -> None:
            while traffic.failures == [] and not traffic.stopped:
                if not await mesh.has_item(b):
                    traffic.failures.append("cp-b had no endpoint of item")
                await trio.sleep(0.05)

        async with trio.open_nursery() as watchers:
            watchers.start_soon(traffic.run)
            watchers.start_soon(endpoints_on_b)
            a.process.process.send_signal(signal.SIGKILL)
            await a.process.process.wait()

            async def moved() -> bool:
                return "item" in sidecars_of(await b.status())

            await eventually("item's sidecar reconnects to cp-b", moved)

            async def leads_alone() -> bool:
                cluster = (await b.status())["cluster"]
                return bool(cluster["leader"] == b_id and [r["id"] for r in cluster["replicas"]] == [b_id])

            # Past cp-a's lease (its card goes with it): item's instance was written again under
            # cp-b's lease, so nothing expired.
            await eventually("cp-a's lease runs out and cp-b leads", leads_alone)
            await traffic.stop_after_more()
        assert traffic.failures == []
        item = (await b.get("/v1/endpoints?service=item"))["endpoints"]["item"]
        assert [e["ready"] for e in item] == [True]


async def test_quorum_lost_the_mesh_keeps_serving_and_resumes(
    etcd3: EtcdCluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = store_of(etcd3, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store)) as mesh:
        a, b = mesh.a, mesh.b
        await mesh.sidecar("item", [a])
        user = await mesh.sidecar("user", [b])
        await mesh.routed(user)
        lost = [m.name for m in etcd3.members][:2]
        for name in lost:
            await etcd3.kill(name)

        async def reported() -> bool:
            cluster = (await a.status())["cluster"]
            failing = [m for m in cluster["members"] if m["error"]]
            return len(failing) >= 2 and not cluster["etcd"]["watching"]

        await eventually("cp-a reports etcd's members down and its watch cut", reported)
        statuses = [await call(user) for _ in range(20)]  # fail-static: what was pushed still routes
        assert statuses == [200] * 20
        refused = await mesh.apply(a)
        assert refused.returncode == 1
        assert b"etcd" in refused.stderr, refused.stderr.decode()

        for name in lost:
            await etcd3.start(name)
        result = await mesh.apply(a)
        assert result.returncode == 0, result.stderr.decode()
        await mesh.acked(b, "user", "pushes resume: the sidecar on cp-b ACKs the policy")
        assert await call(user) == 200


async def test_a_compaction_while_cut_off_means_a_fresh_listing(
    etcd3: EtcdCluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    first, *others = [m.name for m in etcd3.members]
    # cp-a knows one member only: with it down, cp-a is cut off from etcd.
    stores = (store_of(etcd3, tmp_path, [first]), store_of(etcd3, tmp_path, others))
    async with two_replicas(tmp_path, nursery, stores) as mesh:
        a, b = mesh.a, mesh.b
        await etcd3.kill(first)
        # Meanwhile item registers on cp-b, and etcd compacts its history past cp-a's revision.
        await mesh.sidecar("item", [b])

        async def registered_on_b() -> bool:
            return await mesh.has_item(b)

        await eventually("item registers on cp-b", registered_on_b)
        async with httpx.AsyncClient(timeout=10) as client:
            endpoint = etcd3.member(others[0]).client_url
            header = (await client.post(f"{endpoint}/v3/kv/range", json={"key": "AA=="})).json()["header"]
            compaction = {"revision": header["revision"], "physical": True}
            (await client.post(f"{endpoint}/v3/kv/compaction", json=compaction)).raise_for_status()
        await etcd3.start(first)

        async def relisted() -> bool:
            relists = (await a.status())["cluster"]["etcd"]["relists"]
            return relists >= 1 and await mesh.has_item(a)

        await eventually("cp-a lists again and has item", relisted)


async def test_a_replica_that_lost_its_lease_writes_its_sessions_again(
    etcd1: EtcdCluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = store_of(etcd1, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store)) as mesh:
        a, b = mesh.a, mesh.b
        await mesh.sidecar("item", [a])

        async def item_on_b() -> bool:
            return await mesh.has_item(b)

        await eventually("item (on cp-a) is seen by cp-b", item_on_b)
        lease = next(r["lease"] for r in (await a.status())["cluster"]["replicas"] if r["self"])
        # etcd drops cp-a's lease (as when cp-a was cut off for longer than the TTL): with it go
        # item's key and cp-a's card. cp-a finds out at its next keepalive and writes them again.
        async with httpx.AsyncClient(timeout=10) as client:
            revoked = await client.post(f"{etcd1.endpoints[0]}/v3/lease/revoke", json={"ID": str(int(lease, 16))})
            revoked.raise_for_status()

        async def new_lease() -> bool:
            mine = [r for r in (await a.status())["cluster"]["replicas"] if r["self"]]
            return bool(mine and mine[0]["lease"] != lease)

        await eventually("cp-a takes a new lease", new_lease)
        await eventually("item is back on cp-b, under cp-a's new lease", item_on_b)


async def test_a_dead_sidecars_instance_goes_when_its_lease_runs_out(
    etcd1: EtcdCluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = store_of(etcd1, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store)) as mesh:
        a, b = mesh.a, mesh.b
        item = await mesh.sidecar("item", [a])

        async def item_on_b() -> bool:
            return await mesh.has_item(b)

        await eventually("item (on cp-a) is seen by cp-b", item_on_b)
        item.process.send_signal(signal.SIGKILL)  # no goodbye: only its lease on cp-a can end it

        async def gone() -> bool:
            return not await mesh.has_item(b)

        await eventually("item's instance leaves every replica once its lease ran out", gone)
        assert (await a.status())["registry"]["instances"] == 0


async def test_a_restarted_replica_gets_sidecars_back_by_session_age(
    etcd1: EtcdCluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = store_of(etcd1, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store), ["--max-session-age", "2s"]) as mesh:
        first, b = mesh.a, mesh.b
        push_a = first.push  # a restarted cp-a listens where the sidecars were told it is
        await mesh.sidecar("item", [b])
        for n in range(3):
            await mesh.sidecar(f"user{n}", [first, b])
        first.process.process.send_signal(signal.SIGKILL)
        await first.process.process.wait()

        async def all_on_b() -> bool:
            return len(sidecars_of(await b.status())) == 4

        await eventually("every sidecar is on cp-b", all_on_b)
        a = await mesh.stack.enter_async_context(replica(tmp_path, "cp-a-again", store, listen=push_a))

        async def some_on_a() -> bool:
            return len(sidecars_of(await a.status())) >= 1

        await eventually("cp-b's session age sends sidecars back to the restarted cp-a", some_on_a)


async def test_a_ca_rotation_on_one_replica_is_every_replicas(
    etcd1: EtcdCluster, tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = store_of(etcd1, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store)) as mesh:
        a, b = mesh.a, mesh.b
        old = (await a.get("/v1/ca"))["current"]["fingerprint"]
        assert (await b.get("/v1/ca"))["current"]["fingerprint"] == old
        async with httpx.AsyncClient(timeout=10) as client:
            rotated = await client.post(
                f"http://{a.api}/v1/ca/rotate",
                json={"propagation": 1},
                headers={"authorization": f"Bearer {a.token()}"},
            )
            assert rotated.status_code == 201, rotated.text
        new = rotated.json()["next"]["fingerprint"]

        async def staged_on_b() -> bool:
            staged = (await b.get("/v1/ca"))["next"]
            return bool(staged and staged["fingerprint"] == new)

        await eventually("cp-b trusts the root cp-a staged", staged_on_b)

        # One second later the leader (whichever replica it is) lets the new root sign, for all.
        async def signs_everywhere() -> bool:
            signing = [(await r.get("/v1/ca"))["current"]["fingerprint"] for r in (a, b)]
            return signing == [new, new]

        await eventually("the new root signs on both replicas", signs_everywhere)
        assert (a.data_dir / "ca" / "ca.crt").read_bytes() == (b.data_dir / "ca" / "ca.crt").read_bytes()
        retired = [r["fingerprint"] for r in (await b.get("/v1/ca"))["retired"]]
        assert retired == [old]  # still trusted for the overlap


async def test_etcds_leader_killed_during_traffic(etcd3: EtcdCluster, tmp_path: Path, nursery: trio.Nursery) -> None:
    """The replicas' watches move to another member: changes keep flowing, no request fails."""
    store = store_of(etcd3, tmp_path)
    async with two_replicas(tmp_path, nursery, (store, store)) as mesh:
        a, b = mesh.a, mesh.b
        await mesh.sidecar("item", [a])
        user = await mesh.sidecar("user", [b])
        await mesh.routed(user)
        traffic = Traffic(user)
        async with trio.open_nursery() as callers:
            callers.start_soon(traffic.run)
            await etcd3.kill(await etcd3.leader())
            # A change after the kill reaches the other replica's sidecar: the watches moved on.
            result = await mesh.apply(a)
            assert result.returncode == 0, result.stderr.decode()
            await mesh.acked(b, "user", "the sidecar on cp-b ACKs the policy applied after the kill")
            await traffic.stop_after_more()
        assert traffic.failures == []
        for r in (a, b):
            assert (await r.status())["cluster"]["etcd"]["watching"]
