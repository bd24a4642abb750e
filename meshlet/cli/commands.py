"""`meshlet control-plane`, `get`, `status`, `apply`, `explain`, `trace`, `stat`, `top`: the
control plane's commands."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import ca as ca_cli
from . import stat as stat_cli
from .client import JSON, AdminClient, ApiClient, ApiError

DEFAULT_API = "127.0.0.1:15000"


def add_commands(commands: Any) -> None:
    get = commands.add_parser("get", help="list services, endpoints or policies known to the control plane")
    get.add_argument("what", choices=["services", "endpoints", "policies"])
    get.add_argument("name", nargs="?", help="one service")
    get.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "yaml"],
        default="table",
        help="yaml: policies only, the running policy's files as one stream `meshlet apply -f` takes",
    )
    get.add_argument("--history", action="store_true", help="policies: every version applied, newest first")
    _api_option(get)

    apply = commands.add_parser(
        "apply",
        help="validate and apply policy files (docs/policy.md)",
        description="Validate policy files and make them the running policy: the files given are the whole "
        "policy (a document left out is removed). Nothing changes on any error; every error is listed as "
        "file:line: field: what is wrong. Then waits until every sidecar has ACKed or NACKed it.",
        epilog=_APPLY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    apply.add_argument("-f", "--filename", type=Path, required=True, metavar="FILE|DIR", help="a file or directory")
    apply.add_argument("--dry-run", action="store_true", help="validate and show what would change; apply nothing")
    apply.add_argument("--wait", type=float, default=30.0, metavar="S", help="wait for sidecars (default 30 s; 0: no)")
    _api_option(apply)

    rollback = commands.add_parser(
        "rollback",
        help="apply an earlier policy version again",
        epilog=_APPLY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rollback.add_argument("version", help="a version from `meshlet get policies --history` (a prefix will do)")
    rollback.add_argument("--wait", type=float, default=30.0, metavar="S", help="wait for sidecars (default 30 s)")
    _api_option(rollback)

    explain = commands.add_parser(
        "explain",
        help="which route, rule, destinations and policy a request would get, and why",
        description="Explain what the mesh would do with a request: the Route and rule that match, the "
        "destinations with their shares and endpoints, the rule's changes, the DestinationPolicy, and (with "
        "--from) what the AccessPolicy says. Example: meshlet explain http://item/items/1 --from user",
    )
    explain.add_argument("url", nargs="?", help="http://SERVICE/path?query (the Host is the service)")
    explain.add_argument(
        "--request-id",
        metavar="ID",
        help="instead: what happened to a request that was made (its x-meshlet-request-id), from the calling "
        "sidecar's admin listener (--admin); with --admin alone, the recent ones",
    )
    explain.add_argument("--admin", metavar="HOST:PORT", help="the calling sidecar's admin listener (for --request-id)")
    explain.add_argument("-X", "--method", default="GET")
    explain.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE", help="repeatable")
    explain.add_argument(
        "--from",
        dest="source",
        metavar="SERVICE",
        help="the calling service, as its mTLS certificate proves it to the destination's sidecar; "
        "'unauthenticated' for a plaintext caller (a header such as x-meshlet-source proves nothing)",
    )
    explain.add_argument("-o", "--output", choices=["text", "json"], default="text")
    _api_option(explain)

    trace = commands.add_parser(
        "trace",
        help="draw a trace as a waterfall (from the control plane's trace store)",
        description="Draw a trace from the embedded Zipkin-compatible store: each span under its parent, with "
        "its service, operation, start offset, duration bar and status. Examples: meshlet trace 4bf92f35...; "
        "meshlet trace --last 3 --service user",
    )
    trace.add_argument("trace_id", nargs="?", help="the trace id (16 or 32 hex)")
    trace.add_argument("--last", type=int, metavar="N", help="the N most recent traces instead")
    trace.add_argument("--service", metavar="NAME", help="with --last: only traces through this service")
    trace.add_argument("-o", "--output", choices=["text", "json"], default="text")
    _api_option(trace)

    status = commands.add_parser("status", help="every sidecar: connected?, config versions applied, last NACK")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _api_option(status)

    stat_cli.add_commands(commands, _api_option)
    _add_token_command(commands)
    ca_cli.add_command(commands, _api_option)


def _add_token_command(commands: Any) -> None:
    from .options import duration, service_name

    token = commands.add_parser("token", help="join tokens: what a sidecar presents on its first connection")
    actions = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="mint a join token (printed once, alone on stdout: TOKEN=$(meshlet token create ...))",
        description="Mint a join token for sidecars (meshlet sidecar --join-token). The control plane keeps only "
        "its hash; the token is printed once, and nothing else goes to stdout.",
    )
    create.add_argument("--service", type=service_name, metavar="NAME", help="the one service it may join as")
    create.add_argument(
        "--ttl", type=duration, default=24 * 3600.0, metavar="DURATION", help="valid for this long (default 24h)"
    )
    _api_option(create)


def run(args: argparse.Namespace) -> int:
    command = _COMMANDS[args.command]
    ca = args.api_ca or (Path(os.environ["MESHLET_API_CA"]) if os.environ.get("MESHLET_API_CA") else None)
    try:
        client = ApiClient(args.api, _token(args), ca=ca)
    except OSError as exc:  # ssl.SSLError too: the --api-ca file is not a CA certificate
        print(f"meshlet: --api-ca {ca}: cannot be read as PEM CA certificates: {exc}", file=sys.stderr)
        return 1
    try:
        with client as api:
            return command(args, api)
    except ApiError as exc:
        if exc.status is None:
            hint = (
                "the API's certificate is not trusted: --api-ca FILE (or MESHLET_API_CA) names the CA that signed it"
                if "CERTIFICATE_VERIFY_FAILED" in str(exc)
                else "is `meshlet control-plane` running? (--api H:P, or https://H:P, to point elsewhere)"
            )
            print(f"meshlet: cannot reach the control plane API at {args.api}: {exc}\n  {hint}", file=sys.stderr)
        else:  # it answered, with an error: say what it said
            print(f"meshlet: the control plane answered {exc.status}: {'; '.join(exc.problems)}", file=sys.stderr)
        return 1


def _get(args: argparse.Namespace, api: ApiClient) -> int:
    console = _console()
    if args.output == "yaml" and (args.what != "policies" or args.history or args.name):
        print("meshlet: -o yaml is for `get policies` only: the running policy's files, whole", file=sys.stderr)
        return 2
    if args.what == "policies":
        return _get_policies(args, api, console)
    if args.what == "services":
        services = [s for s in api.services() if not args.name or s["name"] == args.name]
        if args.output == "json":
            print(json.dumps({"services": services}, indent=2, sort_keys=True))
            return 0
        table = Table("SERVICE", "INSTANCES", "READY", "VERSION", box=None)
        for s in services:
            table.add_row(s["name"], str(s["instances"]), str(s["ready"]), s["version"])
        console.print(table)
        return 0
    by_service = api.endpoints(args.name)
    if args.output == "json":
        print(json.dumps({"endpoints": by_service}, indent=2, sort_keys=True))
        return 0
    table = Table(
        "SERVICE", "INSTANCE", "ADDRESS", "APP PORT", "PROTOCOL", "READY", "CONNECTED", "LEASE", "LABELS", box=None
    )
    for service, endpoints in sorted(by_service.items()):
        for e in endpoints:
            labels = ",".join(f"{k}={v}" for k, v in sorted(e["labels"].items()))
            table.add_row(
                service,
                e["id"],
                e["address"],
                str(e.get("app_port") or "-"),  # what transparent-mode callers dial, at ADDRESS's host
                e.get("protocol") or "-",  # the app's, as its sidecar declared it (-: undeclared, detected)
                _yes(e["ready"]),
                _yes(e["connected"]),
                f"{e['lease_expires_in']:.1f}s",
                labels or "-",
            )
    console.print(table)
    return 0


def _status(args: argparse.Namespace, api: ApiClient) -> int:
    data = _every_replica(api.status(), api)
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    console = _console()
    cluster = data.get("cluster")
    table = Table(
        "SIDECAR",
        "SERVICE",
        *(["REPLICA"] if cluster else []),
        "CONNECTED",
        "LAST SEEN",
        "READY",
        "WATCHING",
        "ENDPOINTS VERSION",
        "ACKED",
        "POLICIES",
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
            *([s.get("replica", "-")] if cluster else []),
            _yes(s["connected"]),
            f"{s['last_seen_s']:.1f}s ago",
            _yes(s["ready"]) if s.get("registered", True) else "[red]not registered[/]",
            _watching(s["watching"].get("endpoints")),
            version,
            "[green]yes[/]" if acked == version != "-" else acked,
            _policies(s),
            "-" if nack is None else f"{nack['type']} {','.join(nack['names'])}: {nack['message']}",
        )
    console.print(table)
    for s in data["sidecars"]:
        if s.get("admin_refused"):
            console.print(escape(f"{s['node']}: admin: refused ({s['admin_refused']})"))
    registry = data["registry"]
    line = (
        f"{registry['instances']} instances ({registry['ready']} ready) in {registry['services']} services; "
        f"{data['pushes_total']} pushes, {data['nacks_total']} NACKs{' (this replica)' if cluster else ''}; "
        f"store {data.get('store') or '-'}"
    )
    if registry["self_preservation"]:
        line += f"\n[bold red]self-preservation: lease expiry frozen[/] ({registry['self_preservation_reason']})"
    console.print(line)
    _store_conflicts(console, data)
    if cluster:
        _cluster(console, cluster)
    return 0


def _every_replica(data: JSON, api: ApiClient) -> JSON:
    """With replicas, each lists only its own sessions: ask every other replica too (at the API
    address on its card), and keep one row per sidecar (the connected one, when a sidecar has just
    moved)."""
    cluster = data.get("cluster")
    if not cluster:
        return data
    rows = {s["node"]: {**s, "replica": cluster["id"]} for s in data["sidecars"]}
    for replica in cluster["replicas"]:
        if replica["self"]:
            continue
        try:
            with api.sibling(replica["api"]) as other:
                theirs = other.status()["sidecars"]
        except ApiError as exc:
            replica["unreachable"] = str(exc)
            continue
        for s in theirs:
            if s["node"] not in rows or (s["connected"] and not rows[s["node"]]["connected"]):
                rows[s["node"]] = {**s, "replica": replica["id"]}
    return {**data, "sidecars": sorted(rows.values(), key=lambda s: s["node"])}


def _cluster(console: Console, cluster: JSON) -> None:
    """The replicas and etcd's members, and what is wrong with either."""
    replicas = Table("REPLICA", "PUSH", "API", "SESSIONS", "LEADER", "VERSION", "UP SINCE", box=None)
    stale = "" if cluster["etcd"]["watching"] else " [yellow](as etcd last said)[/]"
    for r in cluster["replicas"]:
        since = datetime.datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M:%S")
        name = f"{r['id']} (this one)" if r["self"] else r["id"]
        sessions = str(r["sessions"]) if "unreachable" not in r else f"{r['sessions']} [red](API unreachable)[/]"
        replicas.add_row(name, r["push"], r["api"], sessions, _yes(r["leader"]) + stale, r["version"], since)
    console.print(replicas)
    if not cluster["leader"]:
        console.print("[bold red]no leader[/]: CA rotation and compaction wait for one (etcd unreachable?)")
    members = Table("ETCD MEMBER", "ENDPOINT", "LEADER", "REVISION", "DB SIZE", "VERSION", "STATUS", box=None)
    for m in cluster["members"]:
        members.add_row(
            m["member_id"] or "-",
            m["endpoint"],
            _yes(m["leader"]) if not m["error"] else "-",
            str(m["revision"]) if not m["error"] else "-",
            f"{m['db_size'] / 1024:.0f} KiB" if not m["error"] else "-",
            m["version"] or "-",
            "[green]ok[/]" if not m["error"] else f"[red]{escape(m['error'])}[/]",
        )
    console.print(members)
    etcd = cluster["etcd"]
    problems = [
        f"watch: {etcd['watch_error'] or 'not connected'}" if not etcd["watching"] else "",
        f"lease: {etcd['lease_error']}" if etcd["lease_error"] else "",
        f"{etcd['writes_waiting']} registry writes wait: {etcd['write_error']}" if etcd["write_error"] else "",
    ]
    for problem in filter(None, problems):
        console.print(f"[bold red]etcd[/]: {escape(problem)}")
    if any(problems):
        console.print("  sidecars keep what they were pushed, and applies fail, until etcd answers again")
    if cluster["held"]:
        console.print(f"[bold red]lease-expiry hold[/]: {escape(cluster['held_reason'] or '')}")


def _store_conflicts(console: Console, data: JSON) -> None:
    """A sidecar in ``store-conflict`` keeps policies this control plane's store lacks: which, and what to do."""
    conflicted = [s for s in data["sidecars"] if s.get("store_conflict")]
    if not conflicted:
        return
    console.print(
        f"[bold red]store-conflict[/]: {len(conflicted)} sidecar(s) keep policies store {data.get('store')} lacks"
    )
    for s in conflicted:
        kept = ", ".join(s["store_conflict"]["kept"])
        console.print(f"  {s['node']}: keeps {kept} (from store {s['policies_store'] or 'unknown'})")
    console.print(f"  hint: {conflicted[0]['store_conflict']['hint']}", highlight=False)


def _policies(sidecar: JSON) -> str:
    """The policies type version a sidecar holds, and whether it ACKed it (or keeps some against this store)."""
    if sidecar.get("store_conflict"):
        return "[red]store-conflict[/]"
    held = sidecar["versions"].get("policies", "")
    if not held:
        return "-"
    return held if sidecar["acked"].get("policies") == held else f"{held} [yellow](not ACKed)[/]"


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


# --- policy ----------------------------------------------------------------------------------


def _api_option(parser: argparse.ArgumentParser) -> None:
    """--api, and what a call to it carries: the CA that verifies an https API, a token."""
    parser.add_argument(
        "--api",
        default=DEFAULT_API,
        metavar="H:P|URL",
        help=f"control plane API: HOST:PORT, or https://HOST:PORT when it serves TLS (default {DEFAULT_API})",
    )
    parser.add_argument(
        "--api-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA certificate(s) trusted, besides the system's, to verify an https API (default: env "
        "MESHLET_API_CA)",
    )
    parser.add_argument(
        "--token",
        help="sent as 'Authorization: Bearer' with every call: the control plane's write token (needed to apply; "
        "shows the policy unredacted) or its --api-read-token (default: env MESHLET_TOKEN, else --token-file)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"a file holding the token (apply and rollback read {DEFAULT_TOKEN_FILE}, the control plane's "
        "default --data-dir, when no token is given)",
    )


DEFAULT_TOKEN_FILE = Path(".meshlet-cp") / "api-token"
WRITES = ("apply", "rollback", "token")


def _token(args: argparse.Namespace) -> str | None:
    """--token, else MESHLET_TOKEN, else --token-file; for a write, else the control plane's
    default token file. None if none is readable (the control plane's 401 says what to do).
    A read sends the write token only when told to: it may go to another host."""
    token: str | None = args.token or os.environ.get("MESHLET_TOKEN")
    writes = args.command in WRITES or getattr(args, "ca_command", None) == "rotate"
    path = args.token_file or (DEFAULT_TOKEN_FILE if writes else None)
    if not token and path is not None:
        try:
            token = path.read_text().strip()
        except OSError:
            return None
    return token or None


def _get_policies(args: argparse.Namespace, api: ApiClient, console: Console) -> int:
    if args.history:
        history = api.history()
        if args.output == "json":
            print(json.dumps({"history": history}, indent=2, sort_keys=True))
            return 0
        table = Table("#", "VERSION", "APPLIED (UTC)", "SOURCE", "FILES", box=None)
        for v in history:
            applied = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["applied_at"]))
            table.add_row(str(v["seq"]), v["version"] or "(empty)", applied, v["source"], ", ".join(v["files"]))
        console.print(table)
        return 0
    data = api.policies()
    if args.output == "yaml":
        print(policy_stream(data["applied"]), end="")
        return 0
    documents = [d for d in data["documents"] if not args.name or d["name"] == args.name]
    if args.output == "json":
        print(json.dumps({**data, "documents": documents}, indent=2, sort_keys=True))
        return 0
    table = Table("KIND", "NAME", "VERSION", box=None)
    for d in documents:
        table.add_row(d["kind"], d["name"], d["version"])
    console.print(table)
    console.print(f"policy version {data['version'] or '(none applied)'}")
    return 0


def policy_stream(applied: JSON | None) -> str:
    """The files of the running policy as one YAML stream (JSON files are YAML too), each under
    a comment naming it: what `meshlet apply -f` takes to make the same policy elsewhere."""
    texts: dict[str, str] = {} if applied is None else applied["texts"]
    parts = [f"# file: {name}\n{text}" + ("" if text.endswith("\n") else "\n") for name, text in texts.items()]
    return "---\n".join(parts)


def _apply(args: argparse.Namespace, api: ApiClient) -> int:
    from meshlet.policy import PolicyError, load_documents, read_policy_files

    try:
        files = read_policy_files(args.filename)
        load_documents(files)  # the same checks the control plane makes, before sending anything
    except PolicyError as exc:
        print(f"meshlet: nothing was applied:\n{exc}", file=sys.stderr)
        return 1
    source = f"meshlet apply -f {args.filename}"
    return _applied(args, api, lambda: api.apply(files, source=source, dry_run=args.dry_run), args.dry_run)


def _rollback(args: argparse.Namespace, api: ApiClient) -> int:
    return _applied(args, api, lambda: api.rollback(args.version), False)


_APPLY_EXIT_CODES = """exit codes:
  0  applied (or nothing to change), and every connected sidecar ACKed it
  1  nothing was applied: invalid, refused, or the control plane failed or could not be reached
  3  applied, but not confirmed by every sidecar: a NACK, no answer within --wait, or the
     control plane stopped answering while waiting (see `meshlet status`)"""

# `meshlet apply` and `rollback` exit with:
EXIT_APPLIED = 0  # applied (or nothing to change) and every connected sidecar ACKed it
EXIT_NOT_APPLIED = 1  # nothing changed: invalid, refused, or the control plane failed or was unreachable
EXIT_UNCONFIRMED = 3  # applied, but not confirmed by every sidecar: a NACK, no answer in time, or the
# control plane stopped answering while we waited (`meshlet status` tells which)


def _applied(args: argparse.Namespace, api: ApiClient, send: Callable[[], JSON], dry_run: bool) -> int:
    """Send an apply or a rollback; say what changed, then wait for the sidecars."""
    console = _console()
    earlier = {} if dry_run or args.wait <= 0 else _policy_nacks(api)
    try:
        result = send()
    except ApiError as exc:
        if exc.status is None:
            raise  # not reached: run() says so
        print("meshlet: nothing was applied:\n" + "\n".join(exc.problems), file=sys.stderr)
        return EXIT_NOT_APPLIED
    for change in result["changes"]:
        colour = {"added": "green", "changed": "yellow", "removed": "red"}[change["change"]]
        console.print(f"  [{colour}]{change['change']:8}[/] {change['kind']}/{change['name']}")
    if dry_run:
        what = "would change nothing" if not result["changes"] else f"would be version {result['version']}"
        console.print(f"dry run: {what} (running: {result['previous'] or 'none'}); nothing applied")
        return 0
    if not result["applied"]:
        console.print(f"unchanged: version {result['version'] or '(empty)'} is already running")
        return 0
    console.print(f"applied: version {result['version'] or '(empty)'} (was {result['previous'] or 'none'})")
    if args.wait <= 0:
        return EXIT_APPLIED
    try:
        return _wait_for_sidecars(args, api, console, earlier)
    except ApiError as exc:
        console.print(
            "[yellow]applied, but not confirmed by every sidecar[/]: the control plane stopped answering "
            f"while we waited ({exc}); once it is back, `meshlet status` shows what each sidecar holds"
        )
        return EXIT_UNCONFIRMED


def _policy_nacks(api: ApiClient) -> dict[str, str]:
    """Node → the nonce of its last policies NACK, before an apply: a NACK still there after it
    answered an earlier push (a sidecar in store-conflict has one until the apply resolves it)."""
    try:
        sidecars = api.status()["sidecars"]
    except ApiError:
        return {}  # the apply itself says what is wrong
    nacks = {s["node"]: s["last_nack"] for s in sidecars if (s["last_nack"] or {}).get("type") == "policies"}
    return {node: nack["nonce"] for node, nack in nacks.items() if nack.get("nonce")}


def _wait_for_sidecars(
    args: argparse.Namespace, api: ApiClient, console: Console, earlier: dict[str, str] | None = None
) -> int:
    """Until every connected sidecar has ACKed the new policies, or NACKed them (a NACK in
    ``earlier``, from before the apply, does not count)."""
    earlier = earlier or {}
    from rich.progress import Progress

    deadline = time.monotonic() + args.wait
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sidecars acknowledging", total=None)
        while True:
            wanted = api.policies()["push_version"]
            sidecars = [s for s in api.status()["sidecars"] if s["connected"]]
            acked = [s for s in sidecars if s["acked"].get("policies") == wanted]
            nacked = [
                s
                for s in sidecars
                if (nack := s["last_nack"] or {}).get("type") == "policies"
                and s not in acked
                and (not nack.get("nonce") or earlier.get(s["node"]) != nack["nonce"])
            ]
            progress.update(task, total=len(sidecars), completed=len(acked) + len(nacked))
            if len(acked) + len(nacked) == len(sidecars) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    late = len(sidecars) - len(acked) - len(nacked)
    console.print(f"{len(acked)} of {len(sidecars)} sidecars ACKed" + (f", {len(nacked)} NACKed" if nacked else ""))
    for s in nacked:
        console.print(f"  [red]NACK[/] {s['node']}: {s['last_nack']['message']}")
    if late:
        console.print(f"[yellow]{late} sidecar(s) did not answer within {args.wait:g} s[/] (see `meshlet status`)")
    if nacked or late:
        console.print("[yellow]applied, but not confirmed by every sidecar[/]")
        return EXIT_UNCONFIRMED
    return EXIT_APPLIED


def _explain(args: argparse.Namespace, api: ApiClient) -> int:
    if args.request_id or args.admin:
        return _explain_request(args)
    if not args.url:
        print(
            "meshlet explain: give a URL (what would happen), or --admin H:P [--request-id ID] (what did)",
            file=sys.stderr,
        )
        return 2
    try:
        data = api.explain(args.url, method=args.method, headers=args.header, source=args.source)
    except ApiError as exc:
        if exc.status != 400:
            raise
        print("meshlet: " + "; ".join(exc.problems), file=sys.stderr)  # what is wrong with the question
        return 2
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    console = _console()
    say = console.print
    say(
        f"[bold]{data['method']} {data['target']}[/] for [bold]{data['host']}[/]"
        + (f" from {data['source']}" if data["source"] else "")
    )
    route, decision = data["route"], data["decision"]
    if route is None:
        say(f"  route: none for host {data['host']}: straight to the service {data['host']}")
    else:
        mode = " (shadow: not enforced)" if route["mode"] == "shadow" else ""
        say(f"  route: {route['name']}{mode}; rules tried in order: {', '.join(route['rules'])}")
        rule = data.get("rule")
        if rule is None:
            say(f"  [red]no rule matches[/]: 404 no-route ({decision['why']})")
        else:
            say(
                f"  rule: [bold]{rule['name']}[/] (priority {rule['priority']}) matches {json.dumps(rule['match']) if rule['match'] else 'every request'}"
            )
    if "redirect" in decision:
        say(f"  answer: redirect {decision['redirect']['status']} to {decision['redirect']['location']}")
    if "direct_response" in decision:
        say(f"  answer: direct response {decision['direct_response']['status']}")
    for key in ("rewritten_target", "headers", "fault", "mirror", "timeout"):
        if key in decision:
            say(f"  {key.replace('_', ' ')}: {json.dumps(decision[key])}")
    if "destinations" in decision:
        table = Table("SERVICE", "SUBSET", "SHARE", "ENDPOINTS", "FROM", "DESTINATION POLICY", box=None)
        shares = {(d["service"], json.dumps(d["subset"], sort_keys=True)): d["share"] for d in decision["destinations"]}
        for d in data["destinations"]:
            subset = ",".join(f"{k}={v}" for k, v in sorted(d["subset"].items())) or "-"
            share = shares.get((d["service"], json.dumps(d["subset"], sort_keys=True)), 0)
            policy = d["destination_policy"]
            table.add_row(
                d["service"],
                subset,
                f"{share:g} %",
                ", ".join(d["endpoints"]) or "[red]none[/]",
                d["endpoints_from"],
                "defaults" if policy is None else f"{policy['name']} ({policy['mode']})",
            )
        console.print(table)
    for access in data.get("access", []):
        enforced = access.get("enforced", True)
        denied = "[red]denied (403 forbidden)[/]" if enforced else "[yellow]would be denied[/]"
        verdict = "[green]allowed[/]" if access["allowed"] else denied
        note = "" if enforced else " [dim](shadow mode: counted in meshlet_shadow_access_decisions_total)[/]"
        say(f"  access to {access['service']}: {verdict}: {access['why']}{note}")
    return 0


def _explain_request(args: argparse.Namespace) -> int:
    """What a sidecar recorded about a request it made (sidecar/layers/explain.py)."""
    if not args.admin:
        print(
            "meshlet explain: --request-id needs --admin HOST:PORT, the calling sidecar's admin listener",
            file=sys.stderr,
        )
        return 2
    try:
        with AdminClient(args.admin) as admin:
            data = admin.explained(args.request_id) if args.request_id else admin.recent()
    except ApiError as exc:
        if exc.status is None:
            print(f"meshlet: cannot reach the sidecar's admin listener at {args.admin}: {exc}", file=sys.stderr)
            return 1
        if exc.status != 404:
            raise
        print(f"meshlet: {'; '.join(exc.problems)} (the sidecar keeps the last 512)", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    console = _console()
    if isinstance(data, list):  # no --request-id: the recent ones
        table = Table("REQUEST ID", "AT", "SERVICE", "RESULT", box=None)
        for e in data:
            at = datetime.datetime.fromtimestamp(e["at"]).strftime("%H:%M:%S")
            table.add_row(e["request_id"], at, e["service"], e["result"])
        console.print(table if data else "no request explained yet (retried, failed, refused or asked for)")
        return 0
    say = console.print
    say(f"[bold]{data['method']} {data['target']}[/] to [bold]{data['service']}[/] (request {data['request_id']})")
    say(f"  route: {data['route'] or 'none'}; policy: {data['policy']}; balancer: {data['load_balancer']}")
    attempts = Table("#", "ENDPOINT", "OUTCOME", "MS", box=None, title="attempts")
    for i, t in enumerate(data["attempts"], 1):
        attempts.add_row(str(i), t["endpoint"], t["outcome"], f"{t['ms']:g}")
    if data["attempts"]:
        console.print(attempts)
    if data["stopped"]:
        say(f"  no further attempt: {data['stopped']}")
    circuit, budget, timeout = data["circuit"], data["budget"], data["timeout"]
    say(
        f"  circuit: {circuit['state']} ({circuit['failures']} of {circuit['calls']} calls failed in the window; "
        f"opens at {circuit['min_requests']}+ calls)"
    )
    say(f"  retry budget: {budget['remaining']:g} retries left ({budget['requests']} requests in the window)")
    fired = f"; fired: {timeout['fired']}" if timeout["fired"] else ""
    per_try = f", per try {timeout['per_try']:g}s" if timeout["per_try"] else ""
    say(f"  timeout: {timeout['overall']:g}s{per_try}{fired}")
    scores = ", ".join(f"{c['endpoint']} {c['score']:g}" for c in data["candidates"])
    say(f"  candidates (score, lower is better): {scores or 'none'}")
    for e in data["outliers"]:
        say(f"  [yellow]{e['address']}[/] {e['state']} ({e['ejected_for_s']:g}s left, ejected {e['times_ejected']}×)")
    return 0


def _trace(args: argparse.Namespace, api: ApiClient) -> int:
    if args.trace_id:
        trace = api.trace(args.trace_id)
        if trace is None:
            print(f"meshlet: no trace {args.trace_id} in the control plane's store (kept for an hour)", file=sys.stderr)
            return 1
        traces = [trace]
    elif args.last:
        traces = api.traces(limit=args.last, service=args.service)
    else:
        print("meshlet trace: give a TRACE_ID, or --last N [--service NAME]", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(traces, indent=2))
        return 0
    console = _console()
    if not traces:
        console.print("no trace yet" + (f" through {args.service}" if args.service else ""))
    for spans in traces:
        if spans:
            console.print(waterfall_table(spans))
    return 0


def waterfall_table(spans: list[JSON], width: int = 40) -> Table:
    """A trace (Zipkin v2 spans) as a table with duration bars (control_plane/waterfall.py)."""
    from .waterfall import rows

    total = max(s.get("timestamp", 0) + s.get("duration", 0) for s in spans) - min(s.get("timestamp", 0) for s in spans)
    title = f"trace {spans[0]['traceId']} · {len(spans)} spans · {total / 1000:.1f} ms"
    table = Table("SERVICE", "OPERATION", "KIND", "START", "DURATION", "", "STATUS", box=None, title=title)
    for row in rows(spans, width):
        style = "red" if row.error else "green"
        table.add_row(
            "  " * row.depth + row.service,
            row.name,
            row.kind.lower(),
            f"+{row.offset_ms:.1f} ms",
            f"{row.duration_ms:.1f} ms",
            f"[{style}]{row.bar}[/]",
            f"[{style}]{row.status}[/]",
        )
    return table


def _token_create(args: argparse.Namespace, api: ApiClient) -> int:
    minted = api.create_join_token(service=args.service, ttl=args.ttl)
    print(minted["token"])  # alone on stdout, for $(...)
    scope = f"service {minted['service']}" if minted.get("service") else "any service"
    expires = datetime.datetime.fromtimestamp(minted["expires"], tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    print(f"join token {minted['id']} for {scope}, valid until {expires}", file=sys.stderr)
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, ApiClient], int]] = {
    "get": _get,
    "status": _status,
    "apply": _apply,
    "rollback": _rollback,
    "explain": _explain,
    "trace": _trace,
    "stat": stat_cli.run,
    "top": stat_cli.run,
    "token": _token_create,
    "ca": ca_cli.run,
}
