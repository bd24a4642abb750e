"""``meshlet init-iptables``: install (or ``--remove``) the NAT rules of transparent mode in
the current network namespace. The rules themselves are sidecar/core/interception.py's;
this module runs ``iptables-restore`` / ``iptables`` and explains what went wrong."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

from .core.interception import (
    ALL_PORTS,
    CHAINS,
    PROXY_UID,
    Interception,
    InterceptionError,
    parse_ports,
    removal,
)

EPILOG = """\
Run it as root in the app's network namespace before the app starts: a Kubernetes init
container, the entrypoint of the app's container (the sidecar shares its namespace with
network_mode: service:APP), or `ip netns exec NS meshlet init-iptables`. Then run the
sidecar as the exempt user with --transparent:

  meshlet init-iptables --inbound-ports 8080            # as root
  setpriv --reuid 1337 --regid 1337 --clear-groups \\
      meshlet sidecar --service item --app 127.0.0.1:8080 --transparent \\
      --advertise POD_IP --control-plane cp:15010

What it installs (iptables -t nat -S shows it; chains MESHLET_*):
  outbound  every TCP connection the app opens goes to the outbound listener (15001), except
            the sidecar's own (--proxy-uid/--proxy-gid/--proxy-mark), loopback, and
            --exclude-outbound-ports / --exclude-outbound-cidrs;
  inbound   connections from outside to --inbound-ports (every port by default, but the
            sidecar's and --exclude-inbound-ports) go to the inbound listener (15006).
The sidecar then maps each original destination IP:PORT to a service through the registry;
an address no service has is passed through as TCP, or refused when MeshConfig says
outbound_traffic_policy: REGISTRY_ONLY.

Undo with --remove (only the MESHLET_* chains and the jumps to them are touched). IPv4
only: IPv6 traffic is not intercepted.
"""


def _uid(text: str) -> int | None:
    if text.strip().lower() in ("", "none"):
        return None
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a numeric id (or 'none')")
    return int(text)


def _mark(text: str) -> int | None:
    if text.strip().lower() in ("", "none"):
        return None
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number, e.g. 1337 or 0x539 (or 'none')") from None


def add_command(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "init-iptables",
        help="transparent mode: redirect the app's traffic through its sidecar (iptables NAT; run as root)",
        description="Install the iptables NAT rules that send the app's TCP traffic through its sidecar "
        "(like Istio's init container), so an unmodified app needs no proxy settings.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--proxy-uid",
        type=_uid,
        default=PROXY_UID,
        metavar="UID",
        help=f"the sidecar runs as this user; its connections are not redirected (default {PROXY_UID}, "
        "the image's user; 'none' to match by gid or mark only)",
    )
    parser.add_argument("--proxy-gid", type=_uid, default=None, metavar="GID", help="exempt this group's traffic too")
    parser.add_argument(
        "--proxy-mark",
        type=_mark,
        default=None,
        metavar="MARK",
        help="exempt traffic with this firewall mark (set by a rule of yours, e.g. per cgroup)",
    )
    parser.add_argument(
        "--outbound-port", type=int, default=15001, metavar="PORT", help="the sidecar's outbound listener port"
    )
    parser.add_argument(
        "--inbound-port", type=int, default=15006, metavar="PORT", help="the sidecar's inbound listener port"
    )
    parser.add_argument(
        "--inbound-ports",
        default=ALL_PORTS,
        metavar="PORTS",
        help="the app's HTTP ports to intercept, comma-separated; '*' (default): every port but the excluded and "
        "the sidecar's own (the inbound listener speaks HTTP/1.1: list the ports when the app serves more); "
        "'': leave inbound traffic alone",
    )
    parser.add_argument(
        "--exclude-inbound-ports", default="", metavar="PORTS", help="ports reached directly, e.g. 22 for ssh"
    )
    parser.add_argument(
        "--exclude-outbound-ports",
        default="",
        metavar="PORTS",
        help="destination ports the app reaches directly, e.g. 5432 for a database outside the mesh",
    )
    parser.add_argument(
        "--exclude-outbound-cidrs",
        default="",
        metavar="CIDRS",
        help="destination networks the app reaches directly, comma-separated (e.g. 169.254.169.254/32)",
    )
    parser.add_argument(
        "--sidecar-ports",
        default="15090",
        metavar="PORTS",
        help="the sidecar's own ports others must reach (admin, for Prometheus; default 15090)",
    )
    parser.add_argument("--remove", action="store_true", help="take the rules away (the app then talks directly)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the rules (iptables-restore input); change nothing"
    )
    return parser


def interception(args: argparse.Namespace) -> Interception:
    return Interception(
        outbound_port=args.outbound_port,
        inbound_port=args.inbound_port,
        inbound_ports=parse_ports(args.inbound_ports, "--inbound-ports", allow_all=True),
        exclude_inbound_ports=parse_ports(args.exclude_inbound_ports, "--exclude-inbound-ports"),  # type: ignore[arg-type]
        exclude_outbound_ports=parse_ports(args.exclude_outbound_ports, "--exclude-outbound-ports"),  # type: ignore[arg-type]
        exclude_outbound_cidrs=tuple(c.strip() for c in args.exclude_outbound_cidrs.split(",") if c.strip()),
        proxy_uid=args.proxy_uid,
        proxy_gid=args.proxy_gid,
        proxy_mark=args.proxy_mark,
        sidecar_ports=parse_ports(args.sidecar_ports, "--sidecar-ports"),  # type: ignore[arg-type]
    )


class IptablesFailed(Exception):
    pass


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise IptablesFailed(f"{argv[0]} not found: install iptables (Debian: apt-get install iptables)") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()
        hint = ""
        if "ermission denied" in why or "you must be root" in why.lower():
            hint = "\n  run it as root (or with CAP_NET_ADMIN) in the app's network namespace"
        raise IptablesFailed(f"{' '.join(argv)} failed (exit {done.returncode}): {why}{hint}")
    return done.stdout


def _installed() -> str:
    return _run(["iptables-save", "-t", "nat"])


def _remove() -> int:
    """Take our chains away; → how many iptables commands it took (0: nothing was installed)."""
    commands = removal(_installed())
    for command in commands:
        _run(["iptables", "-t", "nat", "-w", *command])
    return len(commands)


def run(args: argparse.Namespace) -> int:
    if args.remove:
        if args.dry_run:
            print("\n".join("iptables -t nat " + " ".join(c) for c in removal(_installed_or_empty())))
            return 0
        try:
            done = _remove()
        except IptablesFailed as exc:
            print(f"meshlet: {exc}", file=sys.stderr)
            return 1
        if done:
            print(f"meshlet: removed the transparent-mode rules ({', '.join(CHAINS)}); traffic goes direct again")
        else:
            print("meshlet: no transparent-mode rules were installed here: nothing to remove")
        return 0
    try:
        rules = interception(args)
    except InterceptionError as exc:
        print(f"meshlet init-iptables: {exc}", file=sys.stderr)
        return 2
    text = rules.restore_input()
    if args.dry_run:
        print(text, end="")
        return 0
    try:
        replaced = _remove()  # run twice, the rules are installed once
        _run(["iptables-restore", "--noflush", "-w"], stdin=text)
    except IptablesFailed as exc:
        print(f"meshlet: {exc}", file=sys.stderr)
        return 1
    print(_summary(rules, replaced > 0))
    return 0


def _installed_or_empty() -> str:
    try:
        return _installed()
    except IptablesFailed:
        return ""


def _summary(rules: Interception, replaced: bool) -> str:
    exempt = [
        f"{what} {value}"
        for what, value in (("uid", rules.proxy_uid), ("gid", rules.proxy_gid), ("mark", rules.proxy_mark))
        if value is not None
    ]
    if rules.inbound_ports == ALL_PORTS:
        inbound = "every port except " + ", ".join(
            str(p)
            for p in dict.fromkeys(
                (rules.inbound_port, rules.outbound_port, *rules.sidecar_ports, *rules.exclude_inbound_ports)
            )
        )
    elif rules.inbound_ports:
        inbound = "ports " + ", ".join(map(str, rules.inbound_ports))
    else:
        inbound = "nothing"
    direct = [str(p) for p in rules.exclude_outbound_ports] + list(rules.exclude_outbound_cidrs)
    lines = [
        f"meshlet: transparent-mode rules {'replaced' if replaced else 'installed'} (iptables -t nat -S MESHLET_OUTPUT)",
        f"  outbound  app's TCP → 127.0.0.1:{rules.outbound_port}, except {' / '.join(exempt)}, loopback"
        + (f", {', '.join(direct)}" if direct else ""),
        f"  inbound   {inbound} → :{rules.inbound_port}",
        "  undo      meshlet init-iptables --remove",
    ]
    return "\n".join(lines)
