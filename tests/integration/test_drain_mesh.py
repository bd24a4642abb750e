"""Draining one instance of a service under load, across the mesh (docs/architecture.md): a control
plane, a caller sidecar (`user`) and two `item` instances, each an app behind its own
sidecar. One item sidecar gets SIGTERM while steady load runs through the caller: it
deregisters, keeps serving while the caller learns, then stops accepting and finishes
what it has. No caller may see an error, nor need a retry to avoid one; the requests in
flight at SIGTERM finish; once the caller has dropped the instance, every request goes to
the other one; the drained sidecar exits 0 without cutting anything.

Half of the requests are POSTs: they are never retried (docs/policy.md), so a request sent to
a listener that stopped accepting too early would reach the caller as an error (and a GET
would need a retry, which is counted). The caller balances round robin, so the drained
instance keeps its share of new requests until the caller drops it (ewma would shun it
while it serves slow requests, and hide a drain that stops accepting too early)."""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass

import h11
import httpx
import trio

from ..helpers import SidecarProcess, sample
from ..mesh import Mesh
from ..origin import Origin

WORKERS = 8  # concurrent clients of the caller's outbound listener
SLOW_EVERY = 8  # every 8th request is slow: some are in flight at SIGTERM
SLOW_PATH = "/delay/0.5"
AFTER_EXIT = 150  # requests started after the drained sidecar exited
MAX_REQUESTS = 5000  # a bound on the load, whatever happens
DRAIN_TIMEOUT = 10.0
ROUND_ROBIN = "kind: DestinationPolicy\nname: item\nservice: item\nload_balancer: round_robin\n"

BEFORE, DRAINING, DROPPED, EXITED = range(4)  # the phases a request can start or end in


class Instance(Origin):
    """A test origin that names itself in every response (``x-instance``) and counts
    the slow requests it is serving."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name.encode()
        self.slow_inflight = 0

    async def _handle(self, stream: trio.SocketStream, conn: h11.Connection, req: h11.Request, number: int) -> bool:
        slow = req.target.startswith(b"/delay/")
        self.slow_inflight += slow
        try:
            return await super()._handle(stream, conn, req, number)
        finally:
            self.slow_inflight -= slow

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, *events: object) -> None:
        named = [
            h11.Response(status_code=e.status_code, headers=[*e.headers, (b"x-instance", self.name)], reason=e.reason)
            if isinstance(e, h11.Response)
            else e
            for e in events
        ]
        await super()._send(stream, conn, *named)


@dataclass
class Outcome:
    index: int
    method: str
    path: str
    started: int  # phase
    ended: int = -1
    status: int = 0
    instance: str = ""
    mesh_error: str | None = None
    body: str = ""
    error: str = ""


async def endpoints_of(sidecar: SidecarProcess, service: str) -> list[str]:
    async with httpx.AsyncClient(trust_env=False) as client:
        dump = (await client.get(f"http://{sidecar.admin}/config_dump")).json()
    return [e["address"] for e in dump["config"]["services"].get(service, {}).get("endpoints", [])]


async def retries(sidecar: SidecarProcess) -> float:
    async with httpx.AsyncClient(trust_env=False) as client:
        metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
    return sample(metrics, "meshlet_retries_total", destination="item")


async def test_draining_an_instance_under_load_loses_no_request(mesh: Mesh, nursery: trio.Nursery) -> None:
    item1, item2 = Instance("item-1"), Instance("item-2")
    await nursery.start(item1.serve)  # the apps outlive their sidecars (the mesh stops first)
    await nursery.start(item2.serve)
    await mesh.control_plane()
    await mesh.apply(ROUND_ROBIN)
    drain = ["--drain-timeout", str(DRAIN_TIMEOUT)]
    await mesh.sidecar("item", app=item1, extra=["--instance-id", "item-1", *drain])
    drained = await mesh.sidecar("item", app=item2, extra=["--instance-id", "item-2", *drain])
    caller = await mesh.sidecar("user")
    await _check_drain_under_load(caller, drained, item2)


async def _check_drain_under_load(caller: SidecarProcess, drained: SidecarProcess, item2: Instance) -> None:
    url = f"http://{caller.outbound}"
    # The caller's app calls item until both instances have answered (registration, the lookup,
    # the push) and the caller holds the round-robin policy.
    seen: set[str] = set()
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:

        async def holds_policy() -> bool:
            dump = (await client.get(f"http://{caller.admin}/config_dump")).json()
            return "item" in dump["config"]["destination_policies"]

        with trio.fail_after(20):
            while seen != {"item-1", "item-2"} or not await holds_policy():
                response = await client.get(f"{url}/hello", headers={"host": "item"})
                if response.status_code == 200:
                    seen.add(response.headers["x-instance"])
                else:
                    await trio.sleep(0.1)
    retries_before = await retries(caller)

    phase = BEFORE
    outcomes: list[Outcome] = []
    pending: dict[int, Outcome] = {}
    counter = itertools.count()
    done = False

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=20, trust_env=False) as client:
            while not done:
                index = next(counter)
                if index >= MAX_REQUESTS:
                    return
                path = SLOW_PATH if index % SLOW_EVERY == 0 else "/hello"
                method = "POST" if index % 2 else "GET"
                outcome = Outcome(index, method, path, phase)
                pending[index] = outcome
                try:
                    response = await client.request(
                        method,
                        f"{url}{path}",
                        headers={"host": "item"},
                        content=b"an order" if method == "POST" else None,
                    )
                    outcome.status = response.status_code
                    outcome.instance = response.headers.get("x-instance", "")
                    outcome.mesh_error = response.headers.get("x-meshlet-error")
                    outcome.body = response.text
                except httpx.HTTPError as exc:
                    outcome.error = repr(exc)
                outcome.ended = phase
                del pending[index]
                outcomes.append(outcome)
                await trio.sleep(0.005)  # steady, not flat out

    drain_seconds = 0.0
    dropped_after: float | None = None  # seconds from SIGTERM until the caller no longer held item-2
    with trio.fail_after(60):
        async with trio.open_nursery() as load:
            for _ in range(WORKERS):
                load.start_soon(worker)
            # SIGTERM once the load is steady and item-2 is serving a slow request.
            while len(outcomes) < 100 or item2.slow_inflight < 1:  # noqa: ASYNC110 - other tasks' progress
                await trio.sleep(0.01)
            in_flight_at_sigterm = list(pending.values())
            slow_at_item2 = item2.slow_inflight
            phase = DRAINING
            drained.process.send_signal(signal.SIGTERM)
            sent = trio.current_time()
            # Until it exits: when does the caller stop holding it? (its /config_dump, polled)
            async with trio.open_nursery() as watch:

                async def watch_caller() -> None:
                    nonlocal phase, dropped_after
                    while drained.inbound in await endpoints_of(caller, "item"):  # noqa: ASYNC110 - another process
                        await trio.sleep(0.02)
                    phase = DROPPED
                    dropped_after = trio.current_time() - sent

                watch.start_soon(watch_caller)
                with trio.fail_after(DRAIN_TIMEOUT + 5):  # the grace, and a margin
                    await drained.process.wait()
                drain_seconds = trio.current_time() - sent
                watch.cancel_scope.cancel()
            exited_in = phase  # the caller had dropped it by then (DROPPED), or not (DRAINING)
            phase = EXITED
            while sum(o.started == EXITED for o in outcomes) < AFTER_EXIT and len(outcomes) < MAX_REQUESTS:  # noqa: ASYNC110
                await trio.sleep(0.01)
            done = True
    retried = await retries(caller) - retries_before

    by_phase = {p: [o for o in outcomes if o.started == p] for p in (BEFORE, DRAINING, DROPPED, EXITED)}
    dropped = "never" if dropped_after is None else f"after {dropped_after:.2f} s"
    print(
        f"{len(outcomes)} requests ({len(in_flight_at_sigterm)} in flight at SIGTERM, {slow_at_item2} slow at item-2); "
        f"started before SIGTERM {len(by_phase[BEFORE])}, draining {len(by_phase[DRAINING])}, "
        f"after the caller dropped item-2 {len(by_phase[DROPPED])}, after exit {len(by_phase[EXITED])}; "
        f"item-2 served {sum(o.instance == 'item-2' for o in by_phase[DRAINING])} of those started while draining; "
        f"caller dropped item-2 {dropped}, it exited after {drain_seconds:.2f} s; retries {retried:g}"
    )
    # No error reached the caller, and none was hidden by a retry.
    failed = [
        o for o in outcomes if o.error or o.status != 200 or o.mesh_error or o.instance not in ("item-1", "item-2")
    ]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[:5]}"
    assert retried == 0
    assert len(outcomes) < MAX_REQUESTS  # the load ended by its phases, not by its bound
    # Both instances served before; the requests in flight at SIGTERM finished, on item-2 too.
    assert {o.instance for o in by_phase[BEFORE]} == {"item-1", "item-2"}
    finished = {o.index: o for o in outcomes}
    assert all(finished[o.index].status == 200 for o in in_flight_at_sigterm)
    slow_on_item2 = [
        finished[o.index]
        for o in in_flight_at_sigterm
        if o.path == SLOW_PATH and finished[o.index].instance == "item-2"
    ]
    assert slow_on_item2 and all(o.body == "late" and o.ended >= DRAINING for o in slow_on_item2)
    # Deregistered first: the caller dropped item-2 while it still served; from then on
    # (and after it exited), every new request went to item-1.
    assert exited_in == DROPPED
    later = by_phase[DROPPED] + by_phase[EXITED]
    assert len(by_phase[EXITED]) >= AFTER_EXIT
    assert {o.instance for o in later} == {"item-1"}
    # It exited by itself, 0, within its grace, cutting nothing.
    assert drained.process.returncode == 0
    log = drained.log()
    assert "signal SIGTERM: stopping" in log
    assert "still in flight" not in log
