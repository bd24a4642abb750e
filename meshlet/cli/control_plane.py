"""``meshlet control-plane``: run the registry, the push channel and the HTTP API."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from .options import duration as _duration
from .options import listen_address as listen
from .options import positive_int as _positive_int


def add_command(commands: Any) -> argparse.ArgumentParser:
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
        metavar="memory|file|file:PATH|etcd://H:P[,H:P...][/PREFIX]",
        help="where applied configuration is kept (default: a file in --data-dir; etcd: its members, keys under PREFIX, default /meshlet)",
    )
    cp.add_argument("--data-dir", type=Path, default=Path(".meshlet-cp"), help="default ./.meshlet-cp")
    cp.add_argument(
        "--policy",
        type=Path,
        metavar="FILE|DIR",
        help="apply this policy at start (GitOps: the files are the whole policy; docs/policy.md)",
    )
    cp.add_argument(
        "--ttl",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="registration lease after a sidecar goes silent (default 10s)",
    )
    cp.add_argument(
        "--max-connections",
        type=_positive_int,
        default=10_000,  # control_plane.server.MAX_CONNECTIONS (not imported here: keeps the CLI's start fast)
        metavar="N",
        help="at most N push-channel connections at once; more are refused (an 'overloaded' error, then "
        "closed) and counted in meshlet_cp_connections_refused_total (default 10000)",
    )
    cp.add_argument(
        "--max-session-age",
        type=_session_age,
        default=1800.0,  # control_plane.session_age.MAX_SESSION_AGE (not imported: keeps the CLI's start fast)
        metavar="DURATION",
        help="end each sidecar's session after this age, ± 10 %% (the sidecar reconnects to its next control-plane "
        "address: load spreads again over replicas); 0 never (default 30m)",
    )
    cp.add_argument(
        "--api-tls-cert",
        type=Path,
        metavar="FILE",
        help="serve the HTTP API over https with this PEM certificate (chain); needs --api-tls-key",
    )
    cp.add_argument(
        "--api-tls-key",
        type=Path,
        metavar="FILE",
        help="the PEM private key of --api-tls-cert; refused unless closed to group and others (chmod 600)",
    )
    cp.add_argument(
        "--api-read-token",
        metavar="VALUE|@FILE",
        help="reads of the API (/v1/..., Zipkin's GET /api/v2/...) need this token or the write token as "
        "'Authorization: Bearer'; @FILE reads it from a file closed to group and others (default: reads are open)",
    )
    cp.add_argument(
        "--allowed-collector",
        type=_collector,
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a span collector a MeshConfig's tracing.collector may name; repeatable; when given, a policy naming "
        "another is refused (default: any http(s) collector)",
    )
    _identity_options(cp)
    cp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return cp


def _session_age(text: str) -> float:
    """A duration, or 0: never."""
    if re.fullmatch(r"0+(\.0*)?(ms|s|m|h)?", text.strip()):
        return 0.0
    return _duration(text)


def _collector(text: str) -> str:
    from control_plane.collectors import parse_allowed

    try:
        parse_allowed(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _identity_options(cp: argparse.ArgumentParser) -> None:
    cp.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default="meshlet.local",
        metavar="DOMAIN",
        help="the trust domain of the sidecars' identities, spiffe://DOMAIN/service/NAME (default meshlet.local)",
    )
    cp.add_argument(
        "--ca-cert",
        type=Path,
        metavar="FILE",
        help="the CA root certificate (PEM) to sign sidecars' certificates with, with --ca-key "
        "(default: a root of its own, made at first start in DATA_DIR/ca)",
    )
    cp.add_argument("--ca-key", type=Path, metavar="FILE", help="the key of --ca-cert (PEM, unencrypted, mode 0600)")
    # Hidden: short-lived certificates for tests of renewal and expiry.
    cp.add_argument("--cert-lifetime", type=_duration, default=None, help=argparse.SUPPRESS)


def _trust_domain(text: str) -> str:
    from meshlet.identity import IdentityError, check_trust_domain

    try:
        return check_trust_domain(text)
    except IdentityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import trio

    from control_plane.app import ControlPlaneOptions
    from control_plane.app import run as serve
    from control_plane.ca import LEAF_LIFETIME, CAError
    from control_plane.store import StoreError
    from control_plane.tokens import TokenFileError
    from meshlet.policy import PolicyError

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request (to etcd: every store call)
    options = ControlPlaneOptions(
        listen=args.listen,
        api=args.api,
        store=args.store,
        data_dir=args.data_dir,
        ttl=args.ttl,
        policy=args.policy,
        max_connections=args.max_connections,
        max_session_age=args.max_session_age,
        api_tls_cert=args.api_tls_cert,
        api_tls_key=args.api_tls_key,
        api_read_token=args.api_read_token,
        allowed_collectors=tuple(args.allowed_collector),
        trust_domain=args.trust_domain,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        cert_lifetime=args.cert_lifetime or LEAF_LIFETIME,
    )
    from meshlet.io import startup_os_error

    try:
        trio.run(serve, options)
    except PolicyError as exc:
        print(f"meshlet: the policy is not valid; nothing was applied:\n{exc}", file=sys.stderr)
        return 1
    except CAError as exc:
        print(f"meshlet: the certificate authority cannot start: {exc}", file=sys.stderr)
        return 1
    except TokenFileError as exc:
        print(f"meshlet: the join token: {exc}", file=sys.stderr)
        return 1
    except (ValueError, StoreError) as exc:
        print(f"meshlet: {exc}", file=sys.stderr)
        return 1
    except (OSError, BaseExceptionGroup) as exc:  # a group: from a nursery
        listen_error = startup_os_error(exc)  # a port in use, an address not ours
        if listen_error is None:
            raise
        print(f"meshlet: cannot listen: {listen_error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
