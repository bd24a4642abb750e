"""A fault soak (issue 15, the proof): mixed traffic through a control plane, a caller
sidecar (`user`) and three `item` instances, each a token-echo app (tests/token_app.py)
behind its own sidecar, while a fixed schedule of faults runs:

  1. item-1's sidecar is killed (-9), then started again;
  2. item-2's sidecar is paused (SIGSTOP) past its lease, shorter than the push channel's
     silence limit (3 pings), then continued (SIGCONT);
  3. the control plane is killed (-9) and started again on the same push port;
and all along the apps misbehave, drawn from a seeded rng: they reset mid-body, stall,
write a second response or stray bytes after an answer, and close idle connections.
(Stray bytes here come in the answer's own write: bytes that arrive later, while a
connection idles, race with its reuse under steady load, whatever a proxy does; the
fuzz test, tests/sidecar/net/test_fuzz_path.py, sends those between its lockstep rounds.)

The soak runs once per module (``soak``); each test checks one of its promises:
  - every request that got a response got its own (the app echoes each request's token),
    and the apps parsed each request at most once per attempt; mesh errors (a 5xx with
    x-meshlet-error) and responses cut mid-body are acceptable during faults;
  - no registration stays lost for longer than one lease after its fault ends;
  - the file descriptors and RSS of the processes that lived through it return to
    their baseline (within FD_MARGIN and RSS_MARGIN).

Bounded: about 50 s; every process in its own process group, stopped at the end.
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from ..helpers import SidecarProcess, run_control_plane, run_sidecar
from ..token_app import TokenApp

SEED = 15
TTL = 8.0  # the control plane's lease (--ttl): longer than the sidecars' 5 s ping, so leases hold
PAUSE = 11.0  # past the lease, short of the push channel's 15 s silence limit
MARGIN = 3.0  # on top of one lease: a push, a reconnect's backoff, a loaded machine
KILLED_FOR = 2.0  # how long item-1 stays dead
WORKERS = 6  # concurrent clients of the caller's outbound listener, each keep-alive
FD_MARGIN = WORKERS + 8  # a pool may hold each worker's connection to another instance than before
RSS_MARGIN = 32 * 1024 * 1024  # bytes: allocator slack and metric series, not a leak per request
TOKEN = re.compile(rb"tk\d+z")

# The apps' answers and their shares; a token not drawn here is answered normally.
APP_FAULTS = {"reset-mid-body": 0.03, "stall": 0.03, "extra": 0.03, "garbage": 0.02, "late-close": 0.04}
STALL = 0.5  # seconds


@dataclass
class Outcome:
    token: str
    method: str
    status: int = 0
    got_token: str | None = None
    mesh_error: str | None = None
    body: bytes = b""
    error: str = ""


@dataclass
class SoakResult:
    outcomes: list[Outcome] = field(default_factory=list)
    parsed: Counter[tuple[str, str]] = field(default_factory=Counter)
    faults_injected: Counter[str] = field(default_factory=Counter)
    registration: list[str] = field(default_factory=list)  # what was lost past a lease, and when
    baseline: dict[str, tuple[int, int]] = field(default_factory=dict)  # name → (fds, rss)
    final: dict[str, tuple[int, int]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


def fds_and_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    return fds, rss


class Mesh:
    """The processes, started and stopped through one exit stack."""

    def __init__(self, tmp_path: Path, stack: AsyncExitStack, apps: dict[str, TokenApp], ports: dict[str, int]):
        self.tmp_path = tmp_path
        self.stack = stack
        self.apps = apps
        self.app_ports = ports
        self.cp: SidecarProcess
        self.push_port = 0
        self.items: dict[str, SidecarProcess] = {}
        self.caller: SidecarProcess

    @property
    def api(self) -> str:
        return f"127.0.0.1:{self.cp.ports['api']}"

    async def start_control_plane(self) -> None:
        listen = f"127.0.0.1:{self.push_port}"
        self.cp = await self.stack.enter_async_context(
            run_control_plane(self.tmp_path, listen=listen, extra=["--ttl", str(TTL)])
        )
        self.push_port = self.cp.ports["push"]

    async def start_item(self, name: str) -> None:
        self.items[name] = await self.stack.enter_async_context(
            run_sidecar(
                self.tmp_path,
                service="item",
                app=f"127.0.0.1:{self.app_ports[name]}",
                control_plane=f"127.0.0.1:{self.push_port}",
                extra=["--instance-id", name],
            )
        )

    async def registered(self) -> set[str]:
        """The ids of the item instances the control plane holds as ready."""
        try:
            async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
                body = (await client.get(f"http://{self.api}/v1/endpoints", params={"service": "item"})).json()
        except httpx.HTTPError:
            return set()
        return {i["id"] for i in body["endpoints"].get("item", []) if i["ready"]}

    async def routable(self) -> set[str]:
        """The item inbound addresses the caller holds."""
        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
            dump = (await client.get(f"http://{self.caller.admin}/config_dump")).json()
        return {e["address"] for e in dump["config"]["services"].get("item", {}).get("endpoints", [])}


async def run_soak(tmp_path: Path) -> SoakResult:
    result = SoakResult()
    rng = random.Random(SEED)
    names = ("item-1", "item-2", "item-3")

    def pick(token: str) -> str:
        if not token.startswith("tk"):
            return "normal"  # the sidecar's health probe
        draw = rng.random()
        for fault, share in APP_FAULTS.items():
            if draw < share:
                result.faults_injected[fault] += 1
                return fault
            draw -= share
        return "normal"

    apps = {name: TokenApp(pick=pick, stall_seconds=STALL) for name in names}
    # The processes stop after the apps (the stack is outside the nursery the apps run in,
    # so that stopping them is not cancelled with it).
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        ports = {}
        for name, app in apps.items():
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            ports[name] = listener.socket.getsockname()[1]
            nursery.start_soon(app.serve, listener)
            nursery.start_soon(_act_late, app)
        mesh = Mesh(tmp_path, stack, apps, ports)
        await mesh.start_control_plane()
        for name in names:
            await mesh.start_item(name)
        mesh.caller = await stack.enter_async_context(
            run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=f"127.0.0.1:{mesh.push_port}")
        )
        await _soak(mesh, result, rng)
        nursery.cancel_scope.cancel()
    for app in apps.values():
        result.parsed.update(app.counts())
    return result


async def _act_late(app: TokenApp) -> None:
    while True:
        await app.act_late()  # "late-close": the app closes a connection it answered on, while it idles
        await trio.sleep(0.2)


async def _soak(mesh: Mesh, result: SoakResult, rng: random.Random) -> None:
    url = f"http://{mesh.caller.outbound}"
    counter = iter(range(10**9))
    with trio.fail_after(30):  # the caller reaches all three instances
        async with httpx.AsyncClient(timeout=5, trust_env=False, headers={"host": "item"}) as client:
            while len(await mesh.routable()) < 3 or await mesh.registered() != {"item-1", "item-2", "item-3"}:
                await client.get(f"{url}/t/warm{next(counter)}")  # the first call subscribes to item
                await trio.sleep(0.2)

    async def load(stop: trio.Event, worker_rng: random.Random) -> None:
        async with httpx.AsyncClient(timeout=30, trust_env=False, headers={"host": "item"}) as client:
            while not stop.is_set():
                outcome = Outcome(
                    f"tk{next(counter)}z", worker_rng.choice(("GET", "GET", "POST", "POST", "POST-chunked"))
                )
                await _request(client, url, outcome, worker_rng)
                result.outcomes.append(outcome)
                await trio.sleep(0.01)

    async def run_load(seconds: float | None, stop: trio.Event) -> None:
        async with trio.open_nursery() as workers:
            for index in range(WORKERS):
                workers.start_soon(load, stop, random.Random(rng.random() + index))
            if seconds is not None:
                await trio.sleep(seconds)
                stop.set()

    # Warm up under load, then the baseline of the processes that live through the soak.
    await run_load(3.0, trio.Event())
    await trio.sleep(1.0)
    survivors = {"caller": mesh.caller, "item-2": mesh.items["item-2"], "item-3": mesh.items["item-3"]}
    result.baseline = {name: fds_and_rss(p.process.pid) for name, p in survivors.items()}

    stop = trio.Event()
    async with trio.open_nursery() as soak:
        soak.start_soon(run_load, None, stop)

        # 1. kill -9 item-1's sidecar; start it again.
        result.log.append("kill -9 item-1")
        os.killpg(mesh.items["item-1"].process.pid, signal.SIGKILL)
        await trio.sleep(KILLED_FOR)
        await mesh.start_item("item-1")
        await _registered_within_a_lease(mesh, result, "after item-1 was killed and started again")

        # 2. SIGSTOP item-2's sidecar past its lease; SIGCONT.
        result.log.append("SIGSTOP item-2")
        paused = mesh.items["item-2"].process.pid
        os.kill(paused, signal.SIGSTOP)
        try:
            await trio.sleep(PAUSE)
        finally:
            os.kill(paused, signal.SIGCONT)
        await _registered_within_a_lease(mesh, result, "after item-2 was paused past its lease and continued")

        # 3. kill -9 the control plane; start it again on the same push port.
        result.log.append("kill -9 the control plane")
        os.killpg(mesh.cp.process.pid, signal.SIGKILL)
        await trio.sleep(1.0)
        await mesh.start_control_plane()
        await _registered_within_a_lease(mesh, result, "after the control plane was killed and started again")

        await trio.sleep(2.0)  # faults over: a little steady traffic
        stop.set()

    await trio.sleep(2.0)  # the clients are closed; requests still in flight have ended
    result.final = {name: fds_and_rss(p.process.pid) for name, p in survivors.items()}


async def _registered_within_a_lease(mesh: Mesh, result: SoakResult, when: str) -> None:
    """The fault has ended: within one lease (and MARGIN), every instance is registered and
    ready again, and the caller holds all three."""
    wanted = {"item-1", "item-2", "item-3"}
    with trio.move_on_after(TTL + MARGIN):
        while await mesh.registered() != wanted or len(await mesh.routable()) != 3:  # noqa: ASYNC110 - other processes
            await trio.sleep(0.25)
        return
    registered = await mesh.registered()
    result.registration.append(
        f"{when}: after {TTL + MARGIN:g} s the control plane holds {sorted(registered)} ready "
        f"(missing {sorted(wanted - registered)}), the caller {len(await mesh.routable())} endpoints"
    )


class _Pieces(httpx.AsyncByteStream):
    """A chunked upload that is no async generator. Given one, httpx iterates it from a
    generator of its own, left unfinished when the sidecar cuts the upload; collected after
    trio.run has returned, that one is a ResourceWarning (an error here), however often the
    run collects garbage first."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        if not self.pieces:
            raise StopAsyncIteration
        return self.pieces.pop(0)


async def _request(client: httpx.AsyncClient, url: str, outcome: Outcome, rng: random.Random) -> None:
    token = outcome.token
    headers = {"x-token": token}
    content: bytes | None = None
    stream: _Pieces | None = None
    if outcome.method == "POST":
        content = rng.randbytes(rng.randrange(0, 8192))
    elif outcome.method == "POST-chunked":
        stream = _Pieces([rng.randbytes(rng.randrange(1, 4096)) for _ in range(rng.randrange(1, 4))])
        headers["transfer-encoding"] = "chunked"
    method = "GET" if outcome.method == "GET" else "POST"
    try:
        request = client.build_request(method, f"{url}/t/{token}", headers=headers, content=content)
        if stream is not None:
            request.stream = stream
        response = await client.send(request)
    except httpx.HTTPError as exc:  # cut mid-body (the app reset), or the caller gave up
        outcome.error = type(exc).__name__
        return
    outcome.status = response.status_code
    outcome.got_token = response.headers.get("x-token")
    outcome.mesh_error = response.headers.get("x-meshlet-error")
    outcome.body = response.content


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> SoakResult:
    result = trio.run(run_soak, tmp_path_factory.mktemp("soak"))
    statuses = Counter(o.status or o.error for o in result.outcomes)
    print(f"soak: {len(result.outcomes)} requests {dict(statuses)}; app faults {dict(result.faults_injected)}")
    print(f"soak: fds, rss before {result.baseline} after {result.final}")
    return result


def test_the_soak_carried_traffic_and_faults(soak: SoakResult) -> None:
    answered = [o for o in soak.outcomes if 200 <= o.status < 300]
    assert len(answered) >= 500, f"only {len(answered)} of {len(soak.outcomes)} requests answered 2xx"
    assert all(soak.faults_injected[fault] > 0 for fault in APP_FAULTS), soak.faults_injected
    assert soak.log == ["kill -9 item-1", "SIGSTOP item-2", "kill -9 the control plane"]


def test_every_response_belongs_to_its_request(soak: SoakResult) -> None:
    wrong = []
    for o in soak.outcomes:
        if o.error:
            continue  # no response, or one cut mid-body: never someone else's
        foreign = set(TOKEN.findall(o.body)) - {o.token.encode()}
        if (o.got_token is not None and o.got_token != o.token) or foreign:
            wrong.append(f"{o.method} {o.token}: {o.status} carrying {o.got_token} {sorted(foreign)}")
        elif 200 <= o.status < 300 and (o.got_token != o.token or o.body != o.token.encode()):
            wrong.append(f"{o.method} {o.token}: {o.status} without its token: {o.body[:100]!r}")
        elif not 200 <= o.status < 300 and o.mesh_error is None:
            wrong.append(f"{o.method} {o.token}: {o.status} that the mesh does not explain: {o.body[:100]!r}")
    sent = {o.token: o for o in soak.outcomes}
    twice = [
        f"{sent.get(t)}, attempt {a}: parsed {n} times"
        for (t, a), n in soak.parsed.items()
        if n > 1 and t.startswith("tk")
    ]
    assert not wrong and not twice, "\n".join(wrong[:20] + twice[:20])


def test_no_registration_is_lost_past_a_lease(soak: SoakResult) -> None:
    assert not soak.registration, "\n".join(soak.registration)


def test_fds_and_rss_return_to_baseline(soak: SoakResult) -> None:
    grown = []
    for name, (fds, rss) in soak.final.items():
        base_fds, base_rss = soak.baseline[name]
        if fds > base_fds + FD_MARGIN or rss > base_rss + RSS_MARGIN:
            grown.append(f"{name}: {base_fds} → {fds} fds, {base_rss >> 20} → {rss >> 20} MiB")
    assert soak.final.keys() == soak.baseline.keys()
    assert not grown, "\n".join(grown)
