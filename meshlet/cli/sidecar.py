"""``meshlet sidecar``: run the sidecar proxy next to one service instance."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

from meshlet.addresses import parse_address
from meshlet.endpoints import check_protocol
from sidecar.core.config import ConfigError

from .options import address as _address
from .options import duration as _duration
from .options import instance_id as _instance_id
from .options import listen_address as _listen
from .options import positive_int as _positive_int
from .options import service_name as _service_name
from .options import upstream as _upstream

EPILOG_SIDECAR = """\
examples:
  # a sidecar for 'user' whose app listens on 127.0.0.1:8080, endpoints from a file
  meshlet sidecar --service user --app 127.0.0.1:8080 --static mesh.yaml

  # the app then calls other services through the outbound listener, any of:
  HTTP_PROXY=http://127.0.0.1:15001 curl http://item/items/1
  curl -H 'Host: item' http://127.0.0.1:15001/items/1
  meshlet sidecar ... --upstream item=127.0.0.1:9001   # then: curl http://127.0.0.1:9001/items/1

the static file (docs/static-config.md):
  services:
    item:
      endpoints: [127.0.0.1:15106, 127.0.0.1:15206]   # the item instances' inbound listeners
      timeout: 2s
"""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Is ``host`` (an IP address or a name) this machine's loopback only?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unusable_ca(path: Path) -> str:
    """Why the PEM file at ``path`` cannot be trusted as a CA ("" if it can)."""
    import ssl

    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except FileNotFoundError:
        return "no such file"
    except (ssl.SSLError, OSError) as exc:
        return f"not a PEM CA certificate ({exc})"
    return ""


def _app_protocol(text: str) -> str:
    try:
        return check_protocol(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_command(commands: Any) -> argparse.ArgumentParser:
    sidecar = commands.add_parser(
        "sidecar",
        help="run the sidecar proxy next to one service instance",
        description="Run the sidecar: an outbound listener for the app's calls, an inbound listener "
        "that forwards to the app, and an admin listener (/metrics /ready /live /config_dump /clusters).",
        epilog=EPILOG_SIDECAR,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sidecar.add_argument(
        "--service", type=_service_name, required=True, help="the name of the local service (a DNS label)"
    )
    sidecar.add_argument("--app", type=_address, required=True, metavar="HOST:PORT", help="where the local app listens")
    sidecar.add_argument(
        "--app-protocol",
        type=_app_protocol,
        metavar="PROTOCOL",
        help="what the app speaks: http1 (HTTP/1.1), http2 (HTTP/2, h2c to the app), grpc (gRPC over HTTP/2) or "
        "tcp (opaque bytes: spliced both ways, never parsed). Registered with the control plane, so callers learn "
        "it; a Service document's protocol wins. Default: its Service document's, else undeclared: HTTP/2 and "
        "HTTP/1.1 are detected per connection. Declare any other protocol tcp, and server-first ones (MySQL, SMTP: "
        "the server speaks first) above all: HTTP detection would wait for a byte the client never sends "
        "(docs/policy.md, Opaque TCP)",
    )
    sidecar.add_argument(
        "--inbound",
        type=_listen,
        default=("0.0.0.0", 15006),
        metavar="ADDR",
        help="inbound listener, for other sidecars (default 0.0.0.0:15006: every address, as callers are on other "
        "hosts; narrow it to a pod IP or private interface, docs/security.md)",
    )
    sidecar.add_argument(
        "--outbound",
        type=_listen,
        default=("127.0.0.1", 15001),
        metavar="ADDR",
        help="outbound listener, for the local app (default 127.0.0.1:15001)",
    )
    sidecar.add_argument(
        "--admin",
        type=_listen,
        default=("127.0.0.1", 15090),
        metavar="ADDR",
        help="admin listener (default 127.0.0.1:15090: loopback, as its /config_dump, /explain and /metrics are for "
        "this host; bind another address only where the network is yours, e.g. a pod IP for Prometheus)",
    )
    sidecar.add_argument(
        "--static",
        type=Path,
        metavar="FILE",
        help="YAML file listing services and endpoints (no control plane); SIGHUP reloads it",
    )
    sidecar.add_argument(
        "--control-plane", metavar="H:P[,H:P]", help="register with the control plane(s) and receive endpoints"
    )
    sidecar.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="k=v",
        help="instance label sent at registration (version, zone, ...); repeatable",
    )
    sidecar.add_argument("--zone", help="shorthand for --label zone=Z")
    sidecar.add_argument(
        "--advertise",
        metavar="HOST",
        help="host other sidecars use to reach the inbound listener "
        "(default: its bind host, or 127.0.0.1 when that is 0.0.0.0)",
    )
    sidecar.add_argument("--instance-id", type=_instance_id, help="this instance's id (default: SERVICE-HOST-PORT)")
    sidecar.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".meshlet"),
        help="where the last good config, this sidecar's key and its certificate are kept for restarts "
        "(default ./.meshlet)",
    )
    sidecar.add_argument(
        "--join-token",
        metavar="VALUE|@FILE",
        help="the credential this sidecar joins the control plane with: a join token, or @FILE to read it from a "
        "file (the control plane writes one to DATA_DIR/join-token; `meshlet token create` mints others). "
        "Prefer @FILE or the variable: a value on the command line is visible to other users in ps",
    )
    sidecar.add_argument(
        "--control-plane-ca",
        type=Path,
        metavar="FILE",
        help="the control plane's CA certificate (PEM; its DATA_DIR/ca/ca.crt), to verify the control plane on the "
        "first connection too (default: trusted on first use, its fingerprint logged; verified afterwards)",
    )
    sidecar.add_argument("--health-path", default="/health", help="the app's health check path (default /health)")
    sidecar.add_argument(
        "--trace-collector",
        metavar="URL",
        help="where to send spans (a Zipkin v2 endpoint, e.g. http://127.0.0.1:9411/api/v2/spans); "
        "default: the control plane's trace store; a MeshConfig's tracing.collector wins",
    )
    sidecar.add_argument(
        "--trace-sampling",
        type=float,
        metavar="RATE",
        help="share of the traces this sidecar starts that are recorded, 0..1 (default 1.0; 0.01 is a good "
        "start in production); a decision that comes in is kept; a MeshConfig's tracing.sampling wins",
    )
    sidecar.add_argument(
        "--api-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA certificate(s) trusted, besides the system's, for an https control-plane API (its trace "
        "store, when it serves --api-tls-cert) or an https trace collector",
    )
    sidecar.add_argument(
        "--upstream",
        type=_upstream,
        action="append",
        default=[],
        metavar="NAME=ADDR",
        help="an extra outbound listener at ADDR that sends everything to service NAME",
    )
    sidecar.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes sharing the listeners (SO_REUSEPORT), with --static or a control plane (the "
        "supervisor holds the one session and feeds every worker); default 1",
    )
    sidecar.add_argument(
        "--header-timeout",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="a started request head must complete within this, else 408 (slowloris guard); a new connection's "
        "first head within this of the accept, else it is closed (default 10s)",
    )
    for listener, what in (
        ("inbound", "callers' connections to the inbound listener"),
        ("outbound", "the app's connections to the outbound and --upstream listeners, together"),
        ("admin", "connections to the admin listener"),
    ):
        sidecar.add_argument(
            f"--max-{listener}-connections",
            type=_positive_int,
            default=None,
            metavar="N",
            help=f"at most N {what} at once; past it a new one is closed at once (default: derived from the "
            "open files limit, which is raised to its hard limit at start; docs/limits.md)",
        )
    sidecar.add_argument(
        "--drain-timeout",
        type=_duration,
        default=30.0,
        metavar="DURATION",
        help="on SIGTERM: deregister, stop accepting, and give requests in flight this long (default 30s)",
    )
    sidecar.add_argument(
        "--transparent",
        action="store_true",
        help="the app's traffic is redirected here by 'meshlet init-iptables': route each connection by the "
        "address the app dialled (SO_ORIGINAL_DST), and learn every service's addresses from the control plane",
    )
    for flag, what in (
        (
            "--tls-cert",
            "this sidecar's certificate (PEM, the leaf first); its one URI SAN must be "
            "spiffe://<trust-domain>/service/<--service>",
        ),
        ("--tls-key", "the certificate's private key (PEM; the file must be 0600)"),
        ("--trust-bundle", "the roots peers' certificates must chain to (PEM)"),
    ):
        sidecar.add_argument(
            flag,
            type=Path,
            metavar="FILE",
            help=f"{what}. Static mTLS credentials, all three together, for a mesh without a control plane "
            "(a control plane's certificate replaces them)",
        )
    sidecar.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --workers
    # A worker fed by its supervisor over this inherited descriptor (sidecar/net/worker_channel.py).
    sidecar.add_argument("--worker-channel", type=int, default=None, help=argparse.SUPPRESS)
    sidecar.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return sidecar


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per span batch POSTed is noise
    if args.static is None and not args.control_plane and args.worker_channel is None:
        parser.error(
            "give --control-plane H:P (registry and endpoints from the control plane) "
            "or --static FILE (endpoints from a file; docs/static-config.md), or both"
        )
    control_planes = []
    for item in (args.control_plane or "").split(","):
        if item.strip():
            try:
                control_planes.append(parse_address(item.strip()))
            except ValueError as exc:
                parser.error(f"--control-plane: {exc}")
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--label {item!r}: expected k=v, e.g. --label version=v2")
        labels[key] = value
    if args.zone:
        labels["zone"] = args.zone
    if args.transparent and control_planes and not _is_ip(args.advertise or ""):
        # Not an error: the mesh still reaches this instance by name; only callers that dial
        # its IP (transparent mode) will not find it by address.
        logging.getLogger("meshlet.sidecar").warning(
            "--transparent: --advertise %s is not an IP address; apps elsewhere dial this instance by IP "
            "and will not be recognised as calling it. Advertise the IP (Kubernetes: status.podIP)",
            args.advertise or "(not given)",
        )
    # @FILE is read at each connection (a file mounted or replaced later is picked up); a value is kept.
    join_token, join_token_file = None, None
    if args.join_token and args.join_token.startswith("@"):
        join_token_file = Path(args.join_token[1:]).expanduser()
    elif args.join_token:
        join_token = args.join_token.strip()
    control_plane_ca = None
    if args.control_plane_ca is not None:
        try:
            control_plane_ca = args.control_plane_ca.read_bytes()
        except OSError as exc:
            parser.error(f"--control-plane-ca {args.control_plane_ca}: {exc.strerror}")
        if b"-----BEGIN CERTIFICATE-----" not in control_plane_ca:
            parser.error(f"--control-plane-ca {args.control_plane_ca}: not a PEM certificate")
    if args.trace_sampling is not None and not 0.0 <= args.trace_sampling <= 1.0:
        parser.error(f"--trace-sampling {args.trace_sampling:g}: a share between 0 and 1, e.g. 0.01 for 1 %")
    if not is_loopback(args.admin[0]):
        logging.getLogger("meshlet.sidecar").warning(
            "--admin %s:%d is not a loopback address: whoever reaches it reads this sidecar's configuration, "
            "metrics and recent requests (/config_dump, /explain, /metrics) without a credential; bind it to "
            "127.0.0.1 unless only your own network (a pod's, a scraper's) can reach it",
            *args.admin,
        )
    if args.api_ca is not None and (problem := _unusable_ca(args.api_ca)):
        print(f"meshlet: --api-ca {args.api_ca}: {problem}", file=sys.stderr)
        return 1
    if args.static is not None and not args.static.is_file():
        print(f"meshlet: --static {args.static}: no such file", file=sys.stderr)
        return 1
    from sidecar.app import Sidecar, SidecarOptions
    from sidecar.core.config import load_static

    tls_files = (args.tls_cert, args.tls_key, args.trust_bundle)
    if any(tls_files) and not all(tls_files):
        parser.error("--tls-cert, --tls-key and --trust-bundle go together: give all three")
    if any(tls_files) and args.control_plane:
        # Two authorities for one identity: the sidecar would verify the control plane with the
        # static bundle while that control plane issues from its own CA.
        parser.error(
            "--tls-cert/--tls-key/--trust-bundle are for a sidecar without a control plane: with "
            "--control-plane, the control plane's CA issues this sidecar's certificate (to use your own "
            "root, give it to the control plane: meshlet control-plane --ca-cert FILE --ca-key FILE)"
        )
    if all(tls_files):
        from sidecar.net.credential_files import CredentialFileError, load_credentials

        try:
            load_credentials(args.tls_cert, args.tls_key, args.trust_bundle, args.service)  # fail fast
        except CredentialFileError as exc:
            print(f"meshlet: {exc}", file=sys.stderr)
            return 1

    try:
        if args.static is not None:
            load_static(args.static.read_text(), str(args.static))  # fail fast, before binding
    except ConfigError as exc:
        print(f"meshlet: {args.static} is not a valid static config:\n{exc}", file=sys.stderr)
        return 1
    options = SidecarOptions(
        service=args.service,
        app=args.app,
        inbound=args.inbound,
        outbound=args.outbound,
        admin=args.admin,
        static=args.static,
        upstreams=dict(args.upstream),
        header_timeout=args.header_timeout,
        max_inbound_connections=args.max_inbound_connections,
        max_outbound_connections=args.max_outbound_connections,
        max_admin_connections=args.max_admin_connections,
        reuse_port=args.worker,
        control_plane=control_planes,
        labels=labels,
        advertise=args.advertise,
        instance_id=args.instance_id,
        data_dir=args.data_dir,
        health_path=args.health_path,
        trace_collector=args.trace_collector,
        trace_sampling=args.trace_sampling,
        api_ca=args.api_ca,
        drain_timeout=args.drain_timeout,
        transparent=args.transparent,
        join_token=join_token,
        join_token_file=join_token_file,
        control_plane_ca=control_plane_ca,
        tls_files=tls_files if all(tls_files) else None,
        app_protocol=args.app_protocol or "",
        worker_channel=args.worker_channel if args.worker else None,
    )
    if args.workers > 1:
        from sidecar.workers import run_workers

        return run_workers(options, args.workers)
    import trio

    refused: tuple[type[Exception], ...] = ()
    if options.control_plane:  # its key; a static sidecar imports no identity (nor cryptography)
        from sidecar.net.identity import IdentityError

        refused = (IdentityError,)
    try:
        sidecar = Sidecar(options)
    except refused as exc:
        print(f"meshlet: this sidecar's key cannot be used: {exc}", file=sys.stderr)
        return 1
    from meshlet.io import startup_os_error, tune_malloc

    tune_malloc()
    try:
        trio.run(_serve_and_announce, sidecar)
    except OSError as exc:
        print(f"meshlet: cannot listen: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # from the nursery
        listen_error = startup_os_error(group)  # a port in use, an address not ours
        if listen_error is not None:
            print(f"meshlet: cannot listen: {listen_error}", file=sys.stderr)
            return 1
        from sidecar.net.worker_channel import ChannelError  # not at start: it loads the push channel's code

        failed = group.subgroup(ChannelError)  # a --workers worker its supervisor could not start
        if failed is None:
            raise
        print(f"meshlet: worker: {_first(failed)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


async def _serve_and_announce(sidecar: object) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(sidecar.serve)  # type: ignore[attr-defined]
        # Everything made so far (modules, configuration, the listeners) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks the tens of
        # thousands of objects of the imported libraries (a pause every request in flight would wait for).
        gc.freeze()
        listening = " ".join(f"{name}={host}:{port}" for name, (host, port) in addresses.items())
        # One parseable line: tests and scripts read the ports bound (port 0 → real port).
        print(f"meshlet sidecar ready {listening}", flush=True)
