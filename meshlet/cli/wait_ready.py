"""`meshlet wait-ready`: return once the sidecar next to this app is ready, for container
entrypoints that must not start the app before its sidecar can carry its calls (Istio's
``pilot-agent wait``): ``meshlet wait-ready && exec my-app``.

It polls the sidecar's admin ``GET /ready`` (200 ready; 503 with the reason otherwise)
until it answers 200 or the time is up. Exit codes: 0 ready, 1 not ready in time (the
message says the last reason the sidecar gave, or that nothing answered), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from .options import address, duration

if TYPE_CHECKING:
    import httpx  # imported where it polls: `meshlet sidecar` builds the same parser, never polls

DEFAULT_ADMIN = ("127.0.0.1", 15090)
DEFAULT_TIMEOUT = 60.0
DEFAULT_INTERVAL = 0.25
REQUEST_TIMEOUT = 2.0  # one poll: the admin listener answers /ready at once when it answers at all

EPILOG = """\
what it does:
  polls GET http://ADMIN/ready (the sidecar's admin listener) every --interval until it
  answers 200, then exits. The sidecar is ready once it has a configuration (from the
  control plane or --static) and is not draining; until then /ready answers 503 and says why.

exit codes:
  0  the sidecar is ready
  1  not ready within --timeout: the message gives the sidecar's last reason (or that
     nothing answered at ADMIN) and what to check
  2  bad usage

examples:
  # a container entrypoint: start the app only once its sidecar is ready
  meshlet wait-ready && exec my-app

  # a sidecar whose admin listener is elsewhere, and a shorter wait
  meshlet wait-ready --admin 127.0.0.1:16090 --timeout 20s
  MESHLET_ADMIN=127.0.0.1:16090 MESHLET_TIMEOUT=20 meshlet wait-ready
"""


def add_command(commands: Any) -> argparse.ArgumentParser:
    """Add ``wait-ready`` to the ``meshlet`` subparsers; returns its parser (for
    ``defaults_from_environment``)."""
    parser = commands.add_parser(
        "wait-ready",
        help="wait until the local sidecar is ready (for container entrypoints: meshlet wait-ready && exec my-app)",
        description="Wait until the sidecar is ready: poll its admin GET /ready until it answers 200. "
        "Exits 0 once ready, 1 if it is not ready within --timeout (saying why), 2 on bad usage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--admin",
        type=address,
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help="the sidecar's admin listener (default 127.0.0.1:15090; 0.0.0.0 means this host)",
    )
    parser.add_argument(
        "--timeout",
        type=duration,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up after this long (default 60; 90s, 2m and 500ms work too)",
    )
    parser.add_argument(
        "--interval",
        type=duration,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help="time between polls (default 0.25)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    host, port = args.admin
    if host in ("0.0.0.0", "::", ""):  # the sidecar's own bind address (MESHLET_ADMIN shared with it)
        host = "127.0.0.1" if host != "::" else "::1"
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"http://{where}/ready"
    started = time.monotonic()
    deadline = started + args.timeout
    last = ""  # the last reason it is not ready, as said to the user
    answered = False  # whether the admin listener answered the last poll
    # trust_env=False: the app's environment often has HTTP_PROXY pointing at the sidecar's
    # outbound listener; the admin listener is asked directly.
    import httpx

    try:
        with httpx.Client(trust_env=False) as client:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    response = client.get(url, timeout=max(0.05, min(REQUEST_TIMEOUT, remaining)))
                except httpx.HTTPError as exc:
                    answered = False
                    reason = f"its admin listener could not be reached ({_describe(exc)})"
                else:
                    answered = True
                    if response.status_code == 200:
                        elapsed = time.monotonic() - started
                        print(f"meshlet: sidecar at {where} is ready (after {elapsed:.1f} s)", flush=True)
                        return 0
                    text = " ".join(response.text.split())[:200] or response.reason_phrase
                    # 503 "not ready: <why>" from a sidecar; anything else is no sidecar's answer
                    reason = (
                        text if response.status_code == 503 else f"GET /ready answered {response.status_code}: {text}"
                    )
                if reason != last:  # progress, once per change: a container's log shows what it waits for
                    print(f"meshlet: waiting for the sidecar at {where}: {reason}", file=sys.stderr, flush=True)
                    last = reason
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(args.interval, remaining))
    except KeyboardInterrupt:
        print(f"meshlet: interrupted while waiting for the sidecar at {where}", file=sys.stderr)
        return 1
    print(
        f"meshlet: the sidecar at {where} is not ready after {args.timeout:g} s: {last}\n"
        f"  {_hint(last, answered, where)}",
        file=sys.stderr,
    )
    return 1


def _describe(exc: httpx.HTTPError) -> str:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _hint(last: str, answered: bool, where: str) -> str:
    if not answered:
        return (
            f"check: is the sidecar running, in this network namespace, and is its --admin (MESHLET_ADMIN) {where}? "
            "Its log ('meshlet sidecar ready ... admin=...') names the address it listens on."
        )
    if "no configuration applied yet" in last:
        return (
            "check: the sidecar has no configuration yet. With --control-plane, can it reach the control plane "
            "(its log says 'connected to control plane' once it does; `meshlet status` lists it)? "
            "With --static, did the file load?"
        )
    if "draining" in last:
        return "check: the sidecar is stopping (it got SIGTERM); start the app next to a running one."
    return f"check: the sidecar's log, and that {where} is a meshlet sidecar's admin listener."
