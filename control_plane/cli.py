"""`meshlet control-plane`, `meshlet get`, `meshlet status`: the control plane's commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

DEFAULT_API = "127.0.0.1:15000"


def add_commands(commands: Any, address: Any, listen: Any) -> None:
    cp = commands.add_parser(
        "control-plane",
        help="run the control plane: registry, push channel, HTTP API",
        description="Run the control plane. Sidecars connect to the push channel (--listen) to register and "
        "receive endpoints; `meshlet get` and `meshlet status` read the HTTP API (--api).",
    )
    cp.add_argument(
        "--listen",
        type=listen,
        default=("127.0.0.1", 15010),
        metavar="ADDR",
        help="push channel listener (default 127.0.0.1:15010)",
    )
    cp.add_argument(
        "--api",
        type=listen,
        default=("127.0.0.1", 15000),
        metavar="ADDR",
        help="HTTP API listener (default 127.0.0.1:15000)",
    )
    cp.add_argument(
        "--store",
        default="file",
        metavar="memory|file|file:PATH",
        help="where applied configuration is kept (default: a file in --data-dir)",
    )
    cp.add_argument("--data-dir", type=Path, default=Path(".meshlet-cp"), help="default ./.meshlet-cp")
    cp.add_argument("--ttl", type=float, default=10.0, help="registration lease after a sidecar goes silent (s)")
    cp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    get = commands.add_parser("get", help="list services or endpoints known to the control plane")
    get.add_argument("what", choices=["services", "endpoints"])
    get.add_argument("name", nargs="?", help="one service")
    get.add_argument("-o", "--output", choices=["table", "json"], default="table")
    get.add_argument("--api", default=DEFAULT_API, metavar="H:P", help=f"control plane API (default {DEFAULT_API})")

    status = commands.add_parser("status", help="every sidecar: connected?, config versions applied, last NACK")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    status.add_argument("--api", default=DEFAULT_API, metavar="H:P", help=f"control plane API (default {DEFAULT_API})")


def run(args: argparse.Namespace) -> int:
    if args.command == "control-plane":
        return _control_plane(args)
    try:
        if args.command == "get":
            return _get(args)
        return _status(args)
    except httpx.HTTPError as exc:
        print(
            f"meshlet: cannot reach the control plane API at {args.api}: {exc}\n"
            f"  is `meshlet control-plane` running? (--api H:P to point elsewhere)",
            file=sys.stderr,
        )
        return 1


def _control_plane(args: argparse.Namespace) -> int:
    import trio

    from .app import ControlPlaneOptions, run
    from .store import StoreError

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    options = ControlPlaneOptions(
        listen=args.listen, api=args.api, store=args.store, data_dir=args.data_dir, ttl=args.ttl
    )
    try:
        trio.run(run, options)
    except (ValueError, StoreError) as exc:
        print(f"meshlet: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meshlet: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _fetch(api: str, path: str) -> Any:
    response = httpx.get(f"http://{api}{path}", timeout=5)
    response.raise_for_status()
    return response.json()


def _get(args: argparse.Namespace) -> int:
    console = _console()
    if args.what == "services":
        data = _fetch(args.api, "/v1/services")
        services = [s for s in data["services"] if not args.name or s["name"] == args.name]
        if args.output == "json":
            print(json.dumps({"services": services}, indent=2, sort_keys=True))
            return 0
        table = Table("SERVICE", "INSTANCES", "READY", "VERSION", box=None)
        for s in services:
            table.add_row(s["name"], str(s["instances"]), str(s["ready"]), s["version"])
        console.print(table)
        return 0
    path = "/v1/endpoints" + (f"?service={args.name}" if args.name else "")
    data = _fetch(args.api, path)
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    table = Table("SERVICE", "INSTANCE", "ADDRESS", "READY", "CONNECTED", "LEASE", "LABELS", box=None)
    for service, endpoints in sorted(data["endpoints"].items()):
        for e in endpoints:
            labels = ",".join(f"{k}={v}" for k, v in sorted(e["labels"].items()))
            table.add_row(
                service,
                e["id"],
                e["address"],
                _yes(e["ready"]),
                _yes(e["connected"]),
                f"{e['lease_expires_in']:.1f}s",
                labels or "-",
            )
    console.print(table)
    return 0


def _status(args: argparse.Namespace) -> int:
    data = _fetch(args.api, "/v1/status")
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    console = _console()
    table = Table(
        "SIDECAR",
        "SERVICE",
        "CONNECTED",
        "LAST SEEN",
        "READY",
        "WATCHING",
        "ENDPOINTS VERSION",
        "ACKED",
        "LAST NACK",
        box=None,
    )
    for s in data["sidecars"]:
        nack = s["last_nack"]
        version = s["versions"].get("endpoints", "") or "-"
        acked = s["acked"].get("endpoints", "") or "-"
        table.add_row(
            s["node"],
            s["service"],
            _yes(s["connected"]),
            f"{s['last_seen_s']:.1f}s ago",
            _yes(s["ready"]),
            _watching(s["watching"].get("endpoints")),
            version,
            "[green]yes[/]" if acked == version != "-" else acked,
            "-" if nack is None else f"{nack['type']} {','.join(nack['names'])}: {nack['message']}",
        )
    console.print(table)
    registry = data["registry"]
    line = (
        f"{registry['instances']} instances ({registry['ready']} ready) in {registry['services']} services; "
        f"{data['pushes_total']} pushes, {data['nacks_total']} NACKs"
    )
    if registry["self_preservation"]:
        line += f"\n[bold red]self-preservation: lease expiry frozen[/] ({registry['self_preservation_reason']})"
    console.print(line)
    return 0


def _console() -> Console:
    """Rich at the terminal's width; piped, wide enough that rows do not wrap."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _watching(names: list[str] | None) -> str:
    """The services a sidecar receives endpoints of (None: all of them, protocol v1)."""
    if names is None:
        return "all"
    if not names:
        return "-"
    shown = ",".join(names[:3])
    return shown if len(names) <= 3 else f"{shown} +{len(names) - 3}"


def _yes(value: bool) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"
