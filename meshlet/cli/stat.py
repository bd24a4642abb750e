"""`meshlet stat` and `meshlet top`: golden metrics from the control plane's /v1/stat, as an
aligned table, once or refreshed in place."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .client import JSON, ApiClient

WARM_UP_LIMIT = 15.0  # seconds to wait for the control plane's first two scrapes
REFRESH = 2.0  # seconds between frames with --watch / top


def add_commands(commands: Any, api_option: Callable[[argparse.ArgumentParser], None]) -> None:
    stat = commands.add_parser(
        "stat",
        help="golden metrics per service or per edge: success rate, RPS, p50/p95/p99",
        description="Success rate, requests per second and latency percentiles over a window, from the sidecars' "
        "own counters (the control plane reads them while you look). --by service: what each service served "
        "(its inbound sidecars); --by edge: each caller → callee as the caller saw it, the mesh's own errors "
        "included. Examples: meshlet stat; meshlet stat --by edge --window 60 --watch",
    )
    stat.add_argument("--by", choices=["service", "edge"], default="service", help="rows per service (default) or edge")
    _common(stat)
    stat.add_argument("--watch", action="store_true", help="refresh the table in place until Ctrl-C")
    api_option(stat)

    top = commands.add_parser(
        "top",
        help="the busiest routes, live (like linkerd viz top)",
        description="Destinations and Route rules (ROUTE/RULE; '-' where no rule matched) by requests per "
        "second, refreshed in place until Ctrl-C. Examples: meshlet top; meshlet top --once --limit 5",
    )
    _common(top)
    top.add_argument("--limit", type=int, default=20, metavar="N", help="rows shown (default 20)")
    top.add_argument("--once", action="store_true", help="one table, then exit")
    api_option(top)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--window",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the span rates are computed over (1..300, default 30)",
    )
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def run(args: argparse.Namespace, api: ApiClient) -> int:
    if not 1 <= args.window <= 300:
        print(f"meshlet: --window {args.window:g}: between 1 and 300 seconds", file=sys.stderr)
        return 2
    by = "route" if args.command == "top" else args.by
    live = args.command == "top" and not args.once or getattr(args, "watch", False)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    data = _first(api, by, args.window, console)
    if data is None:
        return 1
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    limit = getattr(args, "limit", None)
    if not live:
        console.print(stat_table(data, limit))
        return 0
    try:
        with Live(stat_table(data, limit), console=console, auto_refresh=False) as screen:
            while True:
                time.sleep(REFRESH)
                screen.update(stat_table(api.stat(by, args.window), limit), refresh=True)
    except KeyboardInterrupt:
        return 0


def _first(api: ApiClient, by: str, window: float, console: Console) -> JSON | None:
    """The first answer; the control plane needs two scrapes of each sidecar for rates."""
    data = api.stat(by, window)
    if not data["warming_up"]:
        return data
    deadline = time.monotonic() + WARM_UP_LIMIT
    with console.status("reading the sidecars' metrics (two scrapes, a few seconds)...", spinner="dots"):
        while data["warming_up"] and time.monotonic() < deadline:
            time.sleep(0.5)
            data = api.stat(by, window)
    if data["warming_up"]:
        print(
            f"meshlet: no sidecar answered the control plane's scrapes within {WARM_UP_LIMIT:g} s; "
            "check `meshlet status` and each sidecar's admin /metrics",
            file=sys.stderr,
        )
        return None
    return data


def stat_table(data: JSON, limit: int | None = None) -> Table:
    by = data["by"]
    first = {"service": "SERVICE", "edge": "EDGE", "route": "DESTINATION ROUTE", "destination": "DESTINATION"}[by]
    title = f"last {data['window_seconds']:g}s · {data['sidecars']} sidecars"
    covered = data.get("covered_seconds", data["window_seconds"])
    if covered < data["window_seconds"] - 2.5:  # scraping began less than a window ago
        title += f" (scraped for {covered:.0f}s so far)"
    table = Table(first, "SUCCESS", "RPS", "P50", "P95", "P99", "REQUESTS", box=None, title=title, title_justify="left")
    for column in table.columns[1:]:
        column.justify = "right"
    rows = data["rows"][:limit] if limit else data["rows"]
    for row in rows:
        table.add_row(
            row["name"],
            _success(row["success"]),
            f"{row['rps']:.1f}",
            _ms(row["p50_ms"]),
            _ms(row["p95_ms"]),
            _ms(row["p99_ms"]),
            f"{row['requests']:.0f}",
        )
    if not rows:
        table.add_row("(no requests in the window)", "", "", "", "", "", "")
    return table


def _success(share: float | None) -> str:
    if share is None:
        return "-"
    colour = "green" if share >= 0.99 else "yellow" if share >= 0.95 else "red"
    return f"[{colour}]{100 * share:.2f}%[/]"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}ms" if value < 1000 else f"{value / 1000:.2f}s"


__all__ = ["add_commands", "run", "stat_table"]
