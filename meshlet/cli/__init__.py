"""The ``meshlet`` command. Exit codes: 0 ok, 1 the operation failed, 2 bad usage.

Each command lives in its own module and is imported only when it runs, so that
``meshlet sidecar`` never loads the control plane (nor pydantic) and ``meshlet status``
loads neither side."""

from __future__ import annotations

import argparse
import os

from .. import __version__
from . import check, commands, control_plane, sidecar, wait_ready
from .options import MeshletParser, defaults_from_environment


def build_parser() -> argparse.ArgumentParser:
    parser = MeshletParser(
        prog="meshlet",
        description="meshlet: a service mesh you install with pip. Run a sidecar next to each service.",
    )
    parser.add_argument("--version", action="version", version=f"meshlet {__version__}")
    choices = parser.add_subparsers(dest="command", metavar="COMMAND")

    defaults_from_environment(sidecar.add_command(choices), os.environ)
    # The other role in a container: configured by environment too.
    defaults_from_environment(control_plane.add_command(choices), os.environ)
    commands.add_commands(choices)
    check.add_command(choices, commands._api_option)  # the options every API command takes
    from sidecar.init_iptables import add_command as add_init_iptables

    defaults_from_environment(add_init_iptables(choices), os.environ)
    defaults_from_environment(wait_ready.add_command(choices), os.environ)  # an app container's entrypoint

    demo = choices.add_parser("demo", help="run a local demo mesh on loopback (make demo)")
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    demo.add_argument("--requests", type=int, default=200, help="requests to drive through the gateway")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "sidecar":
        return sidecar.run(args, parser)
    if args.command == "control-plane":
        return control_plane.run(args)
    if args.command in ("get", "status", "apply", "rollback", "explain", "trace", "stat", "top", "token", "ca"):
        return commands.run(args)
    if args.command == "check":
        return check.run(args, commands._token(args))
    if args.command == "wait-ready":
        return wait_ready.run(args)
    if args.command == "init-iptables":
        from sidecar.init_iptables import run as run_init_iptables

        return run_init_iptables(args)
    if args.command == "demo":
        from ..demo import run_demo

        return run_demo(args)
    parser.error(f"unknown command {args.command}")
    return 2
