"""`meshlet check`: is the mesh healthy and is its traffic authenticated? In the style of
`linkerd check`: one line per check, grouped (control plane, certificate authority, sidecars,
traffic), each ✓ (passed), ‼ (a warning) or ✗ (failed) with a one-line hint on what to do;
exit 1 when any check failed.

Three reads of the control plane's API feed it: /v1/status (its version, the policy's mTLS
modes, every sidecar with the certificate it was issued and its answers to the policy
pushes), /v1/ca (the root and the trust bundle) and /v1/stat ``by=caller`` (which callers
each service's inbound sidecar served lately: ``unauthenticated`` is a plaintext one).
:func:`evaluate` turns what they said into lines; it is pure (the time is passed in: the
control plane's clock, which issues the certificates), so every verdict is tested without a
mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet import __version__
from meshlet.identity import UNAUTHENTICATED

from .client import JSON, ApiClient, ApiError

OK, WARNING, ERROR = "ok", "warning", "error"
MARKS = {OK: "✓", WARNING: "‼", ERROR: "✗"}
CONTROL_PLANE, CA, SIDECARS, TRAFFIC = "control plane", "certificate authority", "sidecars", "traffic"
DAY = 24 * 3600.0
CA_WARN = 30 * DAY  # a root that expires sooner is a warning...
CA_FAIL = 7 * DAY  # ... and sooner than this a failure
TRAFFIC_WINDOW = 60.0  # seconds of traffic looked at for plaintext callers
WARM_UP_LIMIT = 15.0  # seconds to wait for the control plane's first two scrapes of the sidecars


@dataclass(frozen=True)
class Line:
    group: str
    check: str
    severity: str  # OK, WARNING or ERROR
    detail: str = ""
    hint: str = ""  # what to do: given for a warning or a failure

    @property
    def ok(self) -> bool:
        return self.severity == OK

    def to_json(self) -> JSON:
        return {
            "group": self.group,
            "check": self.check,
            "ok": self.ok,
            "severity": self.severity,
            "detail": self.detail,
            "hint": self.hint,
        }


# --- the verdicts (pure) ---------------------------------------------------------------------


def evaluate(
    status: JSON, ca: JSON | str, traffic: JSON | str, *, now: float, api: str = "", version: str = __version__
) -> list[Line]:
    """Every check's line from what the control plane at ``api`` said. ``ca`` and ``traffic``:
    the answers of /v1/ca and /v1/stat, or why they could not be read. ``now``: seconds since
    the epoch, on the control plane's clock."""
    trust_domain = ca.get("trust_domain") if isinstance(ca, dict) else None
    return [
        *control_plane_lines(status, api, version),
        *ca_lines(ca, now),
        *sidecar_lines(status, trust_domain, now),
        *traffic_lines(traffic, status.get("mtls") or {}),
    ]


def unreachable(api: str, error: ApiError) -> list[Line]:
    """The one line when /v1/status could not be read: nothing else can be checked."""
    if error.status is None:
        hint = "is `meshlet control-plane` running? (--api H:P, or https://H:P, to point elsewhere)"
        if "CERTIFICATE_VERIFY_FAILED" in str(error):
            hint = "the API's certificate is not trusted: --api-ca FILE (or MESHLET_API_CA) names the CA that signed it"
    elif error.status == 401:
        hint = "the API needs a token to read: --token (or MESHLET_TOKEN) with its --api-read-token or write token"
    else:
        hint = "see the control plane's log"
    return [Line(CONTROL_PLANE, f"the control plane API answers at {api}", ERROR, str(error), hint)]


def control_plane_lines(status: JSON, api: str, version: str) -> list[Line]:
    lines = [
        Line(CONTROL_PLANE, f"the control plane API answers at {api}" if api else "the control plane API answers", OK)
    ]
    theirs = status.get("version")
    if theirs == version:
        lines.append(Line(CONTROL_PLANE, f"the control plane runs this CLI's version ({version})", OK))
    else:
        said = f"the control plane runs {theirs}" if theirs else "the control plane does not say its version"
        lines.append(
            Line(
                CONTROL_PLANE,
                "the control plane and this CLI are the same version",
                WARNING,
                f"{said}, this CLI is {version}",
                "upgrade the older of the two: a CLI and a control plane of different versions may disagree on the API",
            )
        )
    return lines


def ca_lines(ca: JSON | str, now: float) -> list[Line]:
    if isinstance(ca, str):
        return [
            Line(
                CA,
                "the certificate authority can be read (/v1/ca)",
                ERROR,
                ca,
                "a control plane of an older version has no /v1/ca: upgrade it",
            )
        ]
    root = ca["root"]
    not_before, not_after = float(root["not_before"]), float(root["not_after"])
    expires = f"{_date(not_after)}, fingerprint {str(root.get('fingerprint_sha256', ''))[:16]}..."
    renew = (
        "rotate to a new root before this one expires (meshlet ca rotate): sidecars stop trusting each "
        "other when it does (docs/security.md, Rotating the root)"
    )
    if now < not_before:
        valid = Line(
            CA,
            "the root certificate is valid now",
            ERROR,
            f"valid only from {_date(not_before)}",
            "the control plane's clock is behind: fix it (NTP)",
        )
    elif now > not_after:
        valid = Line(CA, "the root certificate is valid now", ERROR, f"expired {_date(not_after)}", renew)
    else:
        valid = Line(CA, "the root certificate is valid now", OK, f"until {expires}")
    left = not_after - now
    check = f"the root certificate expires in more than {CA_WARN / DAY:.0f} days"
    if left < CA_FAIL:
        expiry = Line(CA, check, ERROR, "expired" if left <= 0 else f"it expires in {_duration(left)}", renew)
    elif left < CA_WARN:
        expiry = Line(CA, check, WARNING, f"it expires in {_duration(left)}", renew)
    else:
        expiry = Line(CA, check, OK, f"in {_duration(left)}")
    bundle = ca.get("bundle") or []
    roots = f"{len(bundle)} root{'s' if len(bundle) != 1 else ''} trusted" + (
        " (a rotation's overlap)" if len(bundle) > 1 else ""
    )
    domain = Line(CA, f"trust domain {ca['trust_domain']}", OK, roots)
    return [valid, expiry, domain]


def sidecar_lines(status: JSON, trust_domain: str | None, now: float) -> list[Line]:
    sidecars = status.get("sidecars") or []
    if not sidecars:
        return [
            Line(
                SIDECARS,
                "sidecars are connected",
                WARNING,
                "no sidecar is connected to this control plane",
                "start them with --control-plane and --join-token (docs/deploy.md)",
            )
        ]
    modes = status.get("mtls") or {}
    lines: list[Line] = []
    for sidecar in sidecars:
        name = f"{sidecar['node']} ({sidecar['service']})"
        if not sidecar.get("connected"):
            lines.append(
                Line(
                    SIDECARS,
                    f"{name} is connected",
                    WARNING,
                    "its channel closed; its registration holds until its lease runs out",
                    "is the sidecar running? It reconnects on its own; see its log",
                )
            )
            continue
        lines += _identity_lines(name, sidecar, trust_domain, now)
        lines.append(_mode_line(name, mode_of(modes, sidecar["service"])))
        lines.append(_policy_line(name, sidecar))
    return lines


def _identity_lines(name: str, sidecar: JSON, trust_domain: str | None, now: float) -> list[Line]:
    service = sidecar["service"]
    identity = sidecar.get("identity")
    if not identity:
        return [
            Line(
                SIDECARS,
                f"{name} holds a certificate",
                ERROR,
                "the control plane issued it none on this connection",
                "a sidecar of an older version asks for none: upgrade and restart it",
            )
        ]
    expected = f"spiffe://{trust_domain}/service/{service}" if trust_domain else None
    spiffe_id = identity.get("spiffe_id", "")
    if expected is not None and spiffe_id != expected:
        return [
            Line(
                SIDECARS,
                f"{name} holds a certificate for its own service",
                ERROR,
                f"its certificate names {spiffe_id}, not {expected}",
                "restart the sidecar: it asks for a certificate for its service when it joins",
            )
        ]
    held = Line(SIDECARS, f"{name} holds a certificate for {service}", OK, spiffe_id)
    not_before, not_after = float(identity["not_before"]), float(identity["not_after"])
    left, lifetime = not_after - now, not_after - not_before
    check = f"{name}'s certificate is not near its expiry"
    if left <= 0:
        expiry = Line(
            SIDECARS,
            check,
            ERROR,
            f"it expired {_duration(-left)} ago: peers refuse its calls",
            "its renewals fail: see the sidecar's log; a restart joins again for a new one (with a valid join token)",
        )
    elif left < lifetime / 3:
        expiry = Line(
            SIDECARS,
            check,
            WARNING,
            f"it expires in {_duration(left)}; it should have renewed at 2/3 of its {_duration(lifetime)}",
            "its renewals fail: see the sidecar's log and its meshlet_certificate_expiry_seconds",
        )
    else:
        expiry = Line(SIDECARS, check, OK, f"it expires in {_duration(left)}")
    return [held, expiry]


def mode_of(modes: JSON, service: str) -> str:
    """A service's mTLS mode: its Service document's, else MeshConfig's (permissive by default)."""
    return str((modes.get("services") or {}).get(service) or modes.get("mode") or "permissive")


def _mode_line(name: str, mode: str) -> Line:
    if mode == "off":
        return Line(
            SIDECARS,
            f"{name} speaks mTLS",
            WARNING,
            "mtls.mode is off: its traffic is plaintext and every caller unauthenticated",
            "set mtls.mode permissive or strict in MeshConfig (or in its Service document) once the migration "
            "or benchmark is over",
        )
    return Line(SIDECARS, f"{name} speaks mTLS", OK, f"mode {mode}")


def _policy_line(name: str, sidecar: JSON) -> Line:
    check = f"{name} runs the current policy"
    conflict = sidecar.get("store_conflict")
    if conflict:
        kept = ", ".join(conflict.get("kept", []))
        return Line(SIDECARS, check, ERROR, f"store-conflict: it keeps {kept} from another store", conflict["hint"])
    nack = sidecar.get("last_nack") or {}
    if (sidecar.get("last_answer") or {}).get("policies") == "nack":
        return Line(
            SIDECARS,
            check,
            ERROR,
            f"it rejected (NACK) {', '.join(nack.get('names', []))}: {nack.get('message', '')}",
            "fix what it names and apply the policy again (meshlet apply); it runs its previous policy meanwhile",
        )
    held = (sidecar.get("versions") or {}).get("policies", "")
    if held and (sidecar.get("acked") or {}).get("policies") != held:
        return Line(
            SIDECARS,
            check,
            WARNING,
            "it has not confirmed (ACK) the policy pushed to it yet",
            "run the check again in a few seconds; if it stays, see the sidecar's log",
        )
    return Line(SIDECARS, check, OK, f"ACKed {held}" if held else "no policy applied")


def traffic_lines(traffic: JSON | str, modes: JSON) -> list[Line]:
    check = "no plaintext callers reach a service"
    if isinstance(traffic, str):
        return [Line(TRAFFIC, check, WARNING, traffic, "see `meshlet status` and each sidecar's admin /metrics")]
    window = float(traffic.get("covered_seconds") or traffic.get("window_seconds") or 0)
    short = ""
    if window < float(traffic.get("window_seconds") or 0) - 2.5:  # scraping began less than a window ago
        short = f" (the control plane began reading the sidecars' metrics {window:.0f} s ago: run again to cover more)"
    prefix = f"{UNAUTHENTICATED} → "
    lines = []
    for row in traffic.get("rows") or []:
        if not row["name"].startswith(prefix) or not row.get("requests"):
            continue
        service = row["name"][len(prefix) :]
        mode = mode_of(modes, service)
        count = f"{row['requests']:.0f} plaintext request{'' if row['requests'] == 1 else 's'}"
        seen = f"{service} served {count} in the last {window:.0f} s (mode {mode})"
        if mode == "strict":
            lines.append(
                Line(
                    TRAFFIC,
                    f"no plaintext callers reach {service}",
                    ERROR,
                    seen,
                    "a strict service refuses plaintext: is its sidecar of an older version, or did it not apply "
                    "the policy? see `meshlet status`",
                )
            )
        else:
            lines.append(
                Line(
                    TRAFFIC,
                    f"no plaintext callers reach {service}",
                    WARNING,
                    seen,
                    "a client outside the mesh (or a sidecar without a certificate yet) calls its inbound port: "
                    "send it through a sidecar, then set its mtls.mode strict",
                )
            )
    if not lines:
        sidecars = traffic.get("sidecars", 0)
        lines.append(Line(TRAFFIC, check, OK, f"in the last {window:.0f} s, over {sidecars} sidecars{short}"))
    return lines


def _printable(text: str) -> str:
    """``text`` with every control character shown as U+FFFD: names and NACK messages come from
    sidecars, and an escape sequence must not reach the terminal."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def _duration(seconds: float) -> str:
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.0f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _date(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


# --- reading the control plane, printing -----------------------------------------------------


def add_command(commands: Any, api_option: Callable[[argparse.ArgumentParser], None]) -> None:
    check = commands.add_parser(
        "check",
        help="check the mesh: control plane, CA, every sidecar's identity and mode, plaintext traffic",
        description="Checks in the style of `linkerd check`: the control plane answers (and runs this version), "
        "its CA is valid and not about to expire, every sidecar holds a certificate for its service that it "
        "renews, speaks mTLS and runs the current policy, and no plaintext caller reaches a service. Each line "
        "is ✓, ‼ (a warning) or ✗ (failed) with a hint. Exit 1 when a check failed.",
    )
    check.add_argument("-o", "--output", choices=["table", "json"], default="table")
    api_option(check)


def run(args: argparse.Namespace, token: str | None) -> int:
    ca = args.api_ca or (Path(os.environ["MESHLET_API_CA"]) if os.environ.get("MESHLET_API_CA") else None)
    try:
        client = ApiClient(args.api, token, ca=ca)
    except OSError as exc:
        print(f"meshlet: --api-ca {ca}: cannot be read as PEM CA certificates: {exc}", file=sys.stderr)
        return 1
    with client as api:
        lines = gather(api)
    if args.output == "json":
        print(json.dumps([line.to_json() for line in lines], indent=2))
    else:
        print(render(lines))
    return 1 if any(line.severity == ERROR for line in lines) else 0


def gather(api: ApiClient) -> list[Line]:
    try:
        status = api.status()
    except ApiError as exc:
        return unreachable(api.api, exc)
    ca: JSON | str
    try:
        ca = api.ca()
    except ApiError as exc:
        ca = str(exc)
    try:
        now = float(ca["now"]) if isinstance(ca, dict) and "now" in ca else time.time()
        return evaluate(status, ca, _traffic(api), now=now, api=api.api)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # an answer of another shape
        return [
            Line(
                CONTROL_PLANE,
                f"the control plane's answers can be read by this CLI ({api.api})",
                ERROR,
                f"an answer lacks or mistypes {exc}",
                "the control plane and this CLI are far apart in version: upgrade the older of the two",
            )
        ]


def _traffic(api: ApiClient) -> JSON | str:
    """/v1/stat by caller; the first question makes the control plane scrape the sidecars, and
    it answers "warming up" until it has two scrapes of each."""
    deadline = time.monotonic() + WARM_UP_LIMIT
    try:
        data = api.stat("caller", TRAFFIC_WINDOW)
        while data["warming_up"] and time.monotonic() < deadline:
            time.sleep(0.5)
            data = api.stat("caller", TRAFFIC_WINDOW)
    except ApiError as exc:
        return f"the sidecars' metrics cannot be read: {exc}"
    if data["warming_up"]:
        return f"no sidecar answered the control plane's scrapes of its metrics within {WARM_UP_LIMIT:g} s"
    return data


def render(lines: list[Line]) -> str:
    out: list[str] = []
    group = None
    for line in lines:
        if line.group != group:
            group = line.group
            out += [*([""] if out else []), group, "-" * len(group)]
        text = f"{MARKS[line.severity]} {line.check}"
        if line.detail:
            text += f": {line.detail}"
        out.append(_printable(text))
        if line.hint and not line.ok:
            out.append(_printable(f"    hint: {line.hint}"))
    failed = sum(1 for line in lines if line.severity == ERROR)
    warned = sum(1 for line in lines if line.severity == WARNING)
    if failed:
        summary = f"Status check results are {MARKS[ERROR]} ({failed} failed, {warned} warnings)"
    elif warned:
        summary = (
            f"Status check results are {MARKS[OK]} with {warned} warning{'s' if warned != 1 else ''} ({MARKS[WARNING]})"
        )
    else:
        summary = f"Status check results are {MARKS[OK]}"
    return "\n".join([*out, "", summary])


__all__ = ["Line", "add_command", "evaluate", "mode_of", "render", "run", "unreachable"]
