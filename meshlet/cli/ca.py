"""`meshlet ca status` and `meshlet ca rotate`: the control plane's certificate authority, from
its /v1/ca API. Fingerprints are SHA-256 of the certificate (``openssl x509 -fingerprint
-sha256``, without the colons); no key is ever shown."""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from typing import Any

from .client import JSON, ApiClient


def add_command(commands: Any, api_option: Callable[[argparse.ArgumentParser], None]) -> None:
    from .options import duration

    authority = commands.add_parser("ca", help="the certificate authority: its roots, and rotating them")
    actions = authority.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    status = actions.add_parser(
        "status", help="the root that signs, a rotation under way, the retired roots and until when they are trusted"
    )
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    api_option(status)
    rotate = actions.add_parser(
        "rotate",
        help="start a root rotation (needs the control plane's token)",
        description="Make a new root: it joins every sidecar's trust bundle at once and signs once the bundle has "
        "reached them (--propagation); sidecars then renew their certificates within minutes, and the old root "
        "stays trusted for --overlap. No request fails on the way. Refused with an operator's root (--ca-cert).",
    )
    rotate.add_argument(
        "--overlap",
        type=duration,
        default=None,
        metavar="DURATION",
        help="how long the old root stays trusted once the new one signs (default: twice the certificate lifetime, "
        "48h; at least the certificate lifetime)",
    )
    rotate.add_argument(
        "--propagation",
        type=duration,
        default=30.0,
        metavar="DURATION",
        help="how long the new root is only trusted before it signs: the bundle's way to every sidecar (default 30s)",
    )
    rotate.add_argument("-o", "--output", choices=["text", "json"], default="text")
    api_option(rotate)


def run(args: argparse.Namespace, api: ApiClient) -> int:
    if args.ca_command == "rotate":
        status = api.rotate_ca(overlap=args.overlap, propagation=args.propagation)
    else:
        status = api.ca()
    if args.output == "json":
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(describe(status))
    return 0


def describe(status: JSON) -> str:
    current = status["current"]
    lines = [
        f"trust domain   {status['trust_domain']}",
        f"signing root   {current['fingerprint']}  valid until {_iso(current['not_after'])}"
        + ("  (the operator's, --ca-cert)" if status.get("operator_root") else ""),
    ]
    staged = status.get("next")
    if staged:
        lines.append(
            f"next root      {staged['fingerprint']}  trusted now, signs from {_iso(staged['signs_from'])}; "
            f"the signing root trusted until {_iso(staged['old_root_trusted_until'])}"
        )
    for retired in status.get("retired", []):
        lines.append(f"retired root   {retired['fingerprint']}  trusted until {_iso(retired['trusted_until'])}")
    lines.append(f"bundle         {status['bundle_roots']} root(s)")
    return "\n".join(lines)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


__all__ = ["add_command", "run"]
