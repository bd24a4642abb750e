"""``meshlet demo``: a small mesh on loopback, driven and explained in the terminal.

A control plane, and gateway → user → item (2 instances), each app with its own sidecar
that registers it. The demo shows the instances registering, drives traffic through
the gateway balanced over both `item` instances, stops one (it deregisters; traffic
goes on with no error), brings it back; makes one instance flaky (retries hide it),
then every instance fail (the circuit opens, callers get a fallback at once) and
recover (the circuit closes); then prints `meshlet status`, the per-hop metrics table
and the URLs, and keeps running until Ctrl-C or ``--duration``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from .cli.client import JSON, ApiClient
from .processes import AsyncChild, meshlet_command, start_child, stop_child

EXAMPLE_APPS = "meshlet.examples.services"  # run as a module: an installed wheel has it too
APP_READY = "listening"  # an example app's first line: "listening PORT"
EXIT_GRACE = 5.0  # SIGTERM → SIGKILL when the demo ends: nothing in flight is worth a longer drain
console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    """A process of the demo and what its ready line says (``push``, ``api``, ``inbound``,
    ``admin`` ... as ``host:port``; an example app's ``port``)."""

    name: str
    child: AsyncChild
    fields: dict[str, str] = field(default_factory=dict)


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.sidecars: dict[str, Proc] = {}
        self.apps: dict[str, Proc] = {}

    async def start(self, name: str, args: list[str], ready: str) -> Proc:
        child = await start_child(name, args, self.workdir / f"{name}.log", ready=ready)
        assert child.ready is not None
        fields = dict(child.ready.fields)
        if ready == APP_READY:  # "listening PORT"
            fields["port"] = child.ready.banner.split()[1]
        proc = Proc(name, child, fields)
        self.procs.append(proc)
        return proc

    async def stop_and_wait(self, proc: Proc) -> None:
        await stop_child(proc.child)
        self.procs.remove(proc)

    async def app(self, role: str, instance: str, port: int, proxy: str | None = None) -> Proc:
        args = [sys.executable, "-m", EXAMPLE_APPS, role, "--port", str(port), "--instance", instance]
        if proxy:
            args += ["--proxy", proxy]
        proc = await self.start(f"app-{instance}", args, APP_READY)
        self.apps[instance] = proc
        return proc

    async def control_plane(self) -> Proc:
        args = meshlet_command(
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--data-dir",
            str(self.workdir / "cp"),
            "--log-level",
            "warning",
        )
        return await self.start("control-plane", args, "meshlet control-plane ready")

    async def sidecar(
        self, service: str, instance: str, app_port: int, outbound_port: int, push: str, labels: dict[str, str]
    ) -> Proc:
        args = meshlet_command(
            "sidecar",
            "--service",
            service,
            "--app",
            f"127.0.0.1:{app_port}",
            "--control-plane",
            push,
            "--instance-id",
            instance,
            "--data-dir",
            str(self.workdir / instance),
            # The control plane wrote its bootstrap join token there at start: the demo's
            # sidecars present it, so a newcomer types nothing.
            "--join-token",
            f"@{self.workdir / 'cp' / 'join-token'}",
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            f"127.0.0.1:{outbound_port}",
            "--admin",
            "127.0.0.1:0",
            "--log-level",
            "warning",
        )
        for key, value in labels.items():
            args += ["--label", f"{key}={value}"]
        proc = await self.start(f"sidecar-{instance}", args, "meshlet sidecar ready")
        self.sidecars[instance] = proc
        return proc

    async def service(self, role: str, instance: str, push: str, labels: dict[str, str] | None = None) -> Proc:
        """An app and its sidecar; the app is told its sidecar's outbound port up front."""
        app_port, outbound_port = free_port(), free_port()
        await self.app(role, instance, app_port, proxy=f"http://127.0.0.1:{outbound_port}")
        return await self.sidecar(role, instance, app_port, outbound_port, push, labels or {})

    async def stop_all(self) -> None:
        """Every process at once, each SIGTERM then SIGKILL after a short grace."""
        async with trio.open_nursery() as nursery:
            for proc in reversed(self.procs):
                nursery.start_soon(stop_child, proc.child, EXIT_GRACE)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style histogram_quantile over cumulative (bound, count) pairs."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / span if span else 1)
        prev_bound, prev_count = bound, count
    return None


def hop_rows(metrics_text: str) -> dict[tuple[str, str, str], dict[str, float]]:
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    buckets: dict[tuple[str, str, str], dict[float, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if "direction" not in labels or "source" not in labels:
                continue
            key = (labels["direction"], labels["source"], labels["destination"])
            row = rows.setdefault(key, {"requests": 0.0, "ok": 0.0})
            if sample.name == "meshlet_requests_total":
                row["requests"] += sample.value
                if int(labels["code"]) < 500 and not labels["reason"]:
                    row["ok"] += sample.value
            elif sample.name == "meshlet_request_duration_seconds_bucket":
                bound = float(labels["le"])
                into = buckets.setdefault(key, {})
                into[bound] = into.get(bound, 0.0) + sample.value
    for key, by_bound in buckets.items():
        ordered = sorted(by_bound.items())
        rows[key]["p50"] = _quantile(ordered, 0.5) or 0.0
        rows[key]["p99"] = _quantile(ordered, 0.99) or 0.0
    return rows


def metrics_table(scrapes: dict[str, str]) -> Table:
    table = Table(title="per-hop metrics (from each sidecar's /metrics)")
    for column in ("sidecar", "direction", "source → destination", "requests", "success", "p50", "p99"):
        table.add_column(column, justify="right" if column in ("requests", "success", "p50", "p99") else "left")
    for instance, text in scrapes.items():
        for (direction, source, destination), row in sorted(hop_rows(text).items()):
            if not row["requests"]:
                continue
            success = 100 * row["ok"] / row["requests"]
            colour = "green" if success >= 99 else "yellow" if success >= 90 else "red"
            table.add_row(
                instance,
                direction,
                f"{source} → {destination}",
                f"{row['requests']:.0f}",
                f"[{colour}]{success:.1f} %[/]",
                f"{row.get('p50', 0) * 1000:.1f} ms",
                f"{row.get('p99', 0) * 1000:.1f} ms",
            )
    return table


async def drive(client: httpx.AsyncClient, url: str, count: int, first: int = 0) -> dict[str, int]:
    """Send ``count`` requests; return how many ended how (instance name or error)."""
    outcomes: dict[str, int] = {}
    for i in range(first, first + count):
        try:
            response = await client.get(f"{url}/api/users/{i}")
            body = response.json()
            key = (
                body["item"]["instance"]
                if response.status_code == 200
                else (f"{response.status_code} {body.get('mesh_error') or body.get('error')}")
            )
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            key = type(exc).__name__
        outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


def outcome_table(title: str, outcomes: dict[str, int]) -> Table:
    table = Table(title=title)
    table.add_column("answered by / outcome")
    table.add_column("requests", justify="right")
    table.add_column("share", justify="right")
    total = sum(outcomes.values()) or 1
    for key, count in sorted(outcomes.items()):
        style = "green" if key.startswith("item-") else "yellow" if key == "fallback" else "red"
        table.add_row(f"[{style}]{key}[/]", str(count), f"{100 * count / total:.0f} %")
    return table


ITEM_POLICY = """\
kind: DestinationPolicy
name: item
service: item
circuit_breaker: {min_requests: 10, open_for: 3s}
fallback:
  status: 200
  headers: {content-type: application/json}
  body: '{"id": "0", "name": "unavailable", "instance": "fallback"}'
"""


async def _fault(client: httpx.AsyncClient, demo: Demo, instance: str, failing: float) -> int:
    """Make an item app fail that share of its requests; how many it has failed so far."""
    url = f"http://127.0.0.1:{demo.apps[instance].fields['port']}/fault"
    return int((await client.put(url, json={"failing": failing})).json()["faults"])


def _sample(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def _resilience_chapters(
    demo: Demo, client: httpx.AsyncClient, api: ApiClient, entry: str, requests: int, flaky: str
) -> None:
    """Chapters 4-6. ``flaky``: the item instance the balancer prefers now (it gets the traffic)."""
    other = "item-2" if flaky == "item-1" else "item-1"
    say = console.print
    user_admin = f"http://{demo.sidecars['user-1'].fields['admin']}"

    async def user_metric(name: str, **labels: str) -> float:
        return _sample((await client.get(f"{user_admin}/metrics")).text, name, destination="item", **labels)

    say(f"[bold]4. a flaky instance[/]: {flaky} (the one getting the traffic) now answers 503 to 30 % of requests")
    await _fault(client, demo, flaky, 0.3)
    retried = await user_metric("meshlet_retries_total", outcome="retried")
    outcomes = await drive(client, entry, requests)
    faults = await _fault(client, demo, flaky, 0.0)
    retried = await user_metric("meshlet_retries_total", outcome="retried") - retried
    console.print(outcome_table(f"{flaky} flaky", outcomes))
    failed = sum(n for k, n in outcomes.items() if not k.startswith("item-"))
    say(
        f"   {flaky} failed {faults} time(s); user's sidecar retried {retried:.0f} time(s) on {other} "
        "(retrying a 503 is a default, within a retry budget), and its balancer counts each failure as 5 s of "
        f"latency, so it steers away from {flaky} — {'no caller saw an error' if not failed else f'{failed} failed'}.\n"
    )

    say("[bold]5. item fails hard[/]: every item instance answers 503. A DestinationPolicy gives item a fallback:")
    for line in ITEM_POLICY.splitlines():
        say(f"     [dim]{line}[/]")
    await trio.to_thread.run_sync(partial(api.apply, [("item-policy.yaml", ITEM_POLICY)], source="meshlet demo"))
    await _wait_for_policy(client, user_admin, "item")
    for instance in ("item-1", "item-2"):
        await _fault(client, demo, instance, 1.0)
    outcomes, took = await drive_timed(client, entry, requests)
    console.print(outcome_table("item failing", outcomes))
    state = await user_metric("meshlet_circuit_state")
    open_ms = sorted(took[-max(1, requests // 2) :])
    say(
        f"   The first calls failed (after retries); then user's circuit to item [bold]opened[/] "
        f"(meshlet_circuit_state={state:.0f}) and callers got the fallback at once: "
        f"median {1000 * open_ms[len(open_ms) // 2]:.1f} ms a request, item left alone.\n"
    )

    say("[bold]6. item recovers[/]: after 3 s the circuit lets one trial through; it succeeds, the circuit closes")
    for instance in ("item-1", "item-2"):
        await _fault(client, demo, instance, 0.0)
    await trio.sleep(3.2)
    console.print(outcome_table("item recovered", await drive(client, entry, requests // 2)))
    moves = [f"{to} ×{await user_metric('meshlet_circuit_transitions_total', to=to):.0f}" for to in CIRCUIT_STATES]
    say(f"   circuit transitions so far: {', '.join(moves)} (meshlet_circuit_transitions_total)\n")


CIRCUIT_STATES = ("open", "half_open", "closed")


async def _show_a_trace(api: ApiClient) -> None:
    """The last request through the mesh, as the control plane's trace store has it."""
    from .cli.commands import waterfall_table

    with trio.move_on_after(5):  # sidecars send spans in batches, every second
        while True:
            traces = await trio.to_thread.run_sync(partial(api.traces, limit=1))
            if traces and len(traces[0]) >= 5:
                break
            await trio.sleep(0.5)
    if traces:
        console.print(waterfall_table(traces[0], width=16))
        console.print(
            f"   one trace, a span per hop and side: [dim]meshlet trace {traces[0][0]['traceId']} --api {api.api}[/]\n"
        )


async def _identity(client: httpx.AsyncClient, admin: str) -> str:
    """The SPIFFE ID a sidecar's certificate proves (its /config_dump), or why there is none."""
    dump = (await client.get(f"http://{admin}/config_dump")).json()
    identity = dump.get("control_plane", {}).get("identity") or {}
    return str(identity.get("spiffe_id") or f"no certificate ({identity.get('state', 'unknown')})")


async def _wait_for_policy(client: httpx.AsyncClient, admin: str, service: str, patience: float = 20) -> None:
    with trio.fail_after(patience):
        while (await client.get(f"{admin}/config_dump")).json()["config"]["destination_policies"].get(service) is None:  # noqa: ASYNC110 - another process
            await trio.sleep(0.1)


async def drive_timed(client: httpx.AsyncClient, url: str, count: int) -> tuple[dict[str, int], list[float]]:
    outcomes: dict[str, int] = {}
    took: list[float] = []
    for i in range(count):
        start = trio.current_time()
        one = await drive(client, url, 1, first=i)
        took.append(trio.current_time() - start)
        for key, n in one.items():
            outcomes[key] = outcomes.get(key, 0) + n
    return outcomes, took


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="meshlet-demo-") as tmp:
        demo = Demo(Path(tmp))
        try:
            await _story(demo, args)
        finally:
            with trio.CancelScope(shield=True):
                await demo.stop_all()


async def _wait_for(
    api: ApiClient, check: Callable[[dict[str, list[JSON]]], bool], what: str, patience: float = 20
) -> None:
    """Until the registry (service → instances) passes ``check``."""
    with trio.move_on_after(patience):
        while not check(await trio.to_thread.run_sync(api.endpoints)):  # noqa: ASYNC110 - another process
            await trio.sleep(0.1)
        return
    raise RuntimeError(f"the demo waited {patience:g} s for {what}; logs in the demo's temp directory")


async def _wait_for_callers(client: httpx.AsyncClient, admin: str, service: str, count: int) -> None:
    """Until a caller's sidecar holds ``count`` endpoints of ``service`` (pushed after the
    control plane's debounce)."""
    with trio.move_on_after(20):
        while True:
            dump = (await client.get(f"http://{admin}/config_dump")).json()
            if len(dump["config"]["services"].get(service, {}).get("endpoints", [])) == count:
                return
            await trio.sleep(0.05)
    raise RuntimeError(f"the caller's sidecar never received {count} endpoints of {service}")


def _ready_ids(registry: dict[str, list[JSON]], service: str) -> set[str]:
    return {str(e["id"]) for e in registry.get(service, []) if e["ready"]}


def _is_ready(registry: dict[str, list[JSON]], *, service: str, instance: str) -> bool:
    return instance in _ready_ids(registry, service)


async def _story(demo: Demo, args: argparse.Namespace) -> None:
    say = console.print
    say(
        "[bold]meshlet demo[/] — a control plane; gateway → user → item ×2, each app with its own sidecar; "
        "all on 127.0.0.1\n"
    )
    cp = await demo.control_plane()
    push, address = cp.fields["push"], cp.fields["api"]
    say(f"  control plane: push channel {push}, API http://{address}")
    token = (demo.workdir / "cp" / "api-token").read_text().strip()  # chapter 5 applies a policy
    with ApiClient(address, token, timeout=10) as api:
        async with httpx.AsyncClient(timeout=10) as client:
            for role, instance, labels in (
                ("item", "item-1", {"version": "v1"}),
                ("item", "item-2", {"version": "v1"}),
                ("user", "user-1", {}),
                ("gateway", "gateway-1", {}),
            ):
                sidecar = await demo.service(role, instance, push, labels)
                registered = partial(_is_ready, service=role, instance=instance)
                await _wait_for(api, registered, f"{instance} to register")
                identity = await _identity(client, sidecar.fields["admin"])
                say(
                    f"  [green]registered[/] {instance:10} ({role}) at {sidecar.fields['inbound']}, ready, as {identity}"
                )
            say(
                "  each sidecar joined with the control plane's join token and holds a certificate from its CA "
                "for its service: every hop between two sidecars is mutual TLS, and a caller is who its "
                "certificate says (a client outside the mesh is 'unauthenticated')"
            )
            entry = f"http://{demo.sidecars['gateway-1'].fields['inbound']}"
            # The first call: each caller's sidecar looks up the service its app calls (on
            # demand) and from then on receives its endpoints.
            first = await drive(client, entry, 1)
            await _wait_for_callers(client, demo.sidecars["user-1"].fields["admin"], "item", 2)
            await _wait_for_callers(client, demo.sidecars["gateway-1"].fields["admin"], "user", 1)
            say(
                f"  first request, answered by {', '.join(first)}: gateway's sidecar looked up user, user's looked up item; "
                "each now watches what its app calls\n"
            )

            say(f"[bold]1. discovery and load balancing[/]: {args.requests} requests to {entry}/api/users/N")
            console.print(outcome_table("which item instance answered", await drive(client, entry, args.requests)))
            say(
                "   user's sidecar learned both item instances from the control plane. Its balancer (ewma: peak latency "
                "× requests in flight, best of two) sends each request to the one answering faster.\n"
            )

            say("[bold]2. an instance leaves[/]: SIGTERM to item-2's sidecar (it deregisters first), then its app")
            await demo.stop_and_wait(demo.sidecars.pop("item-2"))
            await demo.stop_and_wait(demo.apps.pop("item-2"))
            await _wait_for(api, lambda r: _ready_ids(r, "item") == {"item-1"}, "item-2 to leave the registry")
            say("  [yellow]deregistered[/] item-2; the control plane pushed the change to the sidecars that call item")
            outcomes = await drive(client, entry, args.requests // 2)
            console.print(outcome_table("after item-2 left", outcomes))
            failed = sum(n for k, n in outcomes.items() if not k.startswith("item-"))
            if failed:
                say(f"   [red]{failed} request(s) failed[/] while the change propagated.\n")
            else:
                say("   No errors: item-2 deregistered, kept serving until callers knew, then stopped.\n")

            say("[bold]3. it comes back[/]: item-2 starts again and registers")
            await demo.service("item", "item-2", push, {"version": "v1"})
            await _wait_for(api, lambda r: _ready_ids(r, "item") == {"item-1", "item-2"}, "item-2 to return")
            await _wait_for_callers(client, demo.sidecars["user-1"].fields["admin"], "item", 2)
            say("  [green]registered[/] item-2 again; user's sidecar has both endpoints")
            back = await drive(client, entry, args.requests // 2)
            console.print(outcome_table("with item-2 back", back))
            say("")

            busiest = max(("item-1", "item-2"), key=lambda i: back.get(i, 0))
            await _resilience_chapters(demo, client, api, entry, args.requests, busiest)

            status = await trio.to_thread.run_sync(api.status)
            table = Table(title="meshlet status (which sidecar runs which endpoints version)")
            for column in ("sidecar", "service", "connected", "ready", "endpoints version", "acked", "last NACK"):
                table.add_column(column)
            for row in status["sidecars"]:
                table.add_row(
                    row["node"],
                    row["service"],
                    "yes" if row["connected"] else "no",
                    "yes" if row["ready"] else "no",
                    row["versions"].get("endpoints", "-"),
                    row["acked"].get("endpoints", "-"),
                    "-" if row["last_nack"] is None else "yes",
                )
            console.print(table)

            scrapes = {}
            for instance, proc in demo.sidecars.items():
                scrapes[instance] = (await client.get(f"http://{proc.fields['admin']}/metrics")).text
            console.print(metrics_table(scrapes))
            await _show_a_trace(api)
    say("\n[bold]try[/]:")
    say(f"  open http://{address}/           the dashboard: service graph, instances, circuits, traces")
    say(f"  meshlet stat --by edge --watch --api {address}")
    say(f"  meshlet top --api {address}")
    say(f"  meshlet status --api {address}")
    say(f"  meshlet get endpoints --api {address}")
    say(f"  curl {entry}/api/users/1        (the gateway's inbound sidecar)")
    for instance, proc in demo.sidecars.items():
        say(f"  {instance:10} metrics http://{proc.fields['admin']}/metrics")
    if args.duration is None:
        say("\nThe mesh keeps running; press Ctrl-C to stop it.")
        await trio.sleep_forever()
    elif args.duration > 0:
        say(f"\nThe mesh keeps running for {args.duration:g} s.")
        await trio.sleep(args.duration)


def run_demo(args: argparse.Namespace) -> int:
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        console.print("\nstopped.")
    return 0
