"""``meshlet demo``: a small mesh on loopback, driven and explained in the terminal.

gateway → user → item (2 instances), each app with its own sidecar, configured from
static files (the control plane arrives later and replaces them). The demo drives
traffic through the gateway, shows requests balanced over both `item` instances,
stops one instance and shows what the callers get, then prints the per-hop metrics
table and the admin URLs, and keeps running until Ctrl-C or ``--duration``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "services.py"
console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    name: str
    process: trio.Process
    fields: dict[str, str] = field(default_factory=dict)


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.sidecars: dict[str, Proc] = {}
        self.apps: dict[str, Proc] = {}

    async def start(self, name: str, args: list[str]) -> Proc:
        # A log file per process, opened once at start: a blocking open here is fine.
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: ASYNC230
        process = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        line = b""
        with trio.move_on_after(20):
            while b"\n" not in line:
                data = await process.stdout.receive_some(4096)  # type: ignore[union-attr]
                if not data:
                    break
                line += data
        if not line:
            raise RuntimeError(f"{name} did not start; see {self.workdir / (name + '.log')}")
        fields = dict(item.partition("=")[::2] for item in line.decode().split() if "=" in item)
        if line.startswith(b"listening "):
            fields["port"] = line.split()[1].decode()
        proc = Proc(name, process, fields)
        self.procs.append(proc)
        return proc

    async def app(self, role: str, instance: str, port: int, proxy: str | None = None) -> Proc:
        args = [sys.executable, str(EXAMPLES), role, "--port", str(port), "--instance", instance]
        if proxy:
            args += ["--proxy", proxy]
        proc = await self.start(f"app-{instance}", args)
        self.apps[instance] = proc
        return proc

    async def sidecar(self, service: str, instance: str, app_port: int, services: dict[str, list[str]]) -> Proc:
        static = self.workdir / f"{instance}.yaml"
        static.write_text(yaml.safe_dump({"services": services}))
        args = [
            sys.executable,
            "-m",
            "sidecar",
            "sidecar",
            "--service",
            service,
            "--app",
            f"127.0.0.1:{app_port}",
            "--static",
            str(static),
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log-level",
            "warning",
        ]
        proc = await self.start(f"sidecar-{instance}", args)
        self.sidecars[instance] = proc
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.process.returncode is None:
            try:
                os.killpg(proc.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        with trio.move_on_after(5):
            for proc in self.procs:
                await proc.process.wait()
        for proc in self.procs:
            if proc.process.returncode is None:
                os.killpg(proc.process.pid, signal.SIGKILL)


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


async def drive(client: httpx.AsyncClient, url: str, count: int) -> dict[str, int]:
    """Send ``count`` requests; return how many ended how (instance name or error)."""
    outcomes: dict[str, int] = {}
    for i in range(count):
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
        style = "green" if key.startswith("item-") else "red"
        table.add_row(f"[{style}]{key}[/]", str(count), f"{100 * count / total:.0f} %")
    return table


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="meshlet-demo-") as tmp:
        demo = Demo(Path(tmp))
        try:
            await _story(demo, args)
        finally:
            with trio.CancelScope(shield=True):
                await demo.stop_all()


async def _story(demo: Demo, args: argparse.Namespace) -> None:
    say = console.print
    say("[bold]meshlet demo[/] — gateway → user → item ×2, each app with its own sidecar, all on 127.0.0.1\n")
    item_sidecars = []
    for instance in ("item-1", "item-2"):
        port = free_port()
        await demo.app("item", instance, port)
        sidecar = await demo.sidecar("item", instance, port, {})
        item_sidecars.append(sidecar.fields["inbound"])
        say(f"  started [cyan]{instance}[/] (app :{port}, sidecar inbound {sidecar.fields['inbound']})")
    user_port = free_port()
    user_sidecar = await demo.sidecar("user", "user", user_port, {"item": item_sidecars})
    await demo.app("user", "user", user_port, proxy=f"http://{user_sidecar.fields['outbound']}")
    say(f"  started [cyan]user[/]   → discovers item at {', '.join(item_sidecars)} (static file)")
    gateway_port = free_port()
    gateway_sidecar = await demo.sidecar("gateway", "gateway", gateway_port, {"user": [user_sidecar.fields["inbound"]]})
    await demo.app("gateway", "gateway", gateway_port, proxy=f"http://{gateway_sidecar.fields['outbound']}")
    say(f"  started [cyan]gateway[/] → user at {user_sidecar.fields['inbound']}\n")
    entry = f"http://{gateway_sidecar.fields['inbound']}"

    async with httpx.AsyncClient(timeout=10) as client:
        say(f"[bold]1. load balancing[/]: {args.requests} requests to {entry}/api/users/N")
        console.print(outcome_table("which item instance answered", await drive(client, entry, args.requests)))
        say("   Each request crossed 6 sidecar hops (out+in per call); item's calls alternate between instances.\n")

        say("[bold]2. an instance fails[/]: stopping item-2's app (its sidecar stays up)")
        demo.stop(demo.apps["item-2"])
        await demo.apps["item-2"].process.wait()
        console.print(outcome_table("after item-2 failed", await drive(client, entry, args.requests // 2)))
        say(
            "   item-2's sidecar answers 503 connect-failed (x-meshlet-error) instead of hanging;\n"
            "   health checks, retries and circuit breaking (next milestones) will hide it from callers.\n"
        )

        scrapes = {}
        for instance, proc in demo.sidecars.items():
            scrapes[instance] = (await client.get(f"http://{proc.fields['admin']}/metrics")).text
        console.print(metrics_table(scrapes))
    say("\n[bold]admin endpoints[/] (/metrics /ready /live /config_dump /clusters):")
    for instance, proc in demo.sidecars.items():
        say(f"  {instance:8} http://{proc.fields['admin']}/metrics")
    say(f"  entry    {entry}/api/users/1   (the gateway's inbound sidecar)")
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
