"""The ``meshlet`` command. Exit codes: 0 ok, 1 the operation failed, 2 bad usage.

Each command lives in its own module and is imported only when it runs, so that
``meshlet sidecar`` never loads the control plane (nor pydantic) and ``meshlet status``
loads neither side."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import sidecar
from .options import MeshletParser, defaults_from_environment


def build_parser(*, sidecar_only: bool = False) -> argparse.ArgumentParser:
    """Every command's parser. ``sidecar_only``: the sidecar command's alone, which parses its
    arguments alike: `meshlet sidecar` then never imports the other commands' modules (rich,
    the API client, httpx: MiBs of a sidecar's memory for its whole life)."""
    parser = MeshletParser(
        prog="meshlet",
        description="meshlet: a service mesh you install with pip. Run a sidecar next to each service.",
    )
    parser.add_argument("--version", action="version", version=f"meshlet {__version__}")
    choices = parser.add_subparsers(dest="command", metavar="COMMAND")

    defaults_from_environment(sidecar.add_command(choices), os.environ)
    if sidecar_only:
        return parser
    from . import admin, check, commands, control_plane, wait_ready

    # The other role in a container: configured by environment too.
    defaults_from_environment(control_plane.add_command(choices), os.environ)
    commands.add_commands(choices)
    check.add_command(choices, commands._api_option)  # the options every API command takes
    from sidecar.init_iptables import add_command as add_init_iptables

    defaults_from_environment(add_init_iptables(choices), os.environ)
    defaults_from_environment(wait_ready.add_command(choices), os.environ)  # an app container's entrypoint
    admin.add_command(choices)

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
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(sidecar_only=words[:1] == ["sidecar"])
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "sidecar":
        return sidecar.run(args, parser)
    from . import admin, check, commands, control_plane, wait_ready

    if args.command == "control-plane":
        return control_plane.run(args)
    if args.command in ("get", "status", "apply", "rollback", "explain", "trace", "stat", "top", "token", "ca"):
        return commands.run(args)
    if args.command == "check":
        return check.run(args, commands._token(args))
    if args.command == "wait-ready":
        return wait_ready.run(args)
    if args.command == "admin":
        return admin.run(args)
    if args.command == "init-iptables":
        from sidecar.init_iptables import run as run_init_iptables

        return run_init_iptables(args)
    if args.command == "demo":
        from ..demo import run_demo

        return run_demo(args)
    parser.error(f"unknown command {args.command}")
    return 2
