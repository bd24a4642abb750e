"""`meshlet check`'s verdicts (meshlet/cli/check.py), from what the control plane's API says:
table-driven, one mesh state per case, no processes. A whole mesh checked is in
tests/integration/test_check.py."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from meshlet import __version__
from meshlet.cli.check import ERROR, OK, WARNING, Line, evaluate, gather, render, unreachable
from meshlet.cli.client import ApiClient, ApiError

NOW = 4_000_000_000.0  # 2096: a check that read this machine's clock instead would see a CA not valid yet
DAY = 24 * 3600.0
HOUR = 3600.0


def sidecar(service: str, *, issued: float = NOW - HOUR, lifetime: float = DAY, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "node": f"{service}-1",
        "service": service,
        "connected": True,
        "versions": {"endpoints": "e1", "policies": "p1"},
        "acked": {"endpoints": "e1", "policies": "p1"},
        "last_nack": None,
        "last_answer": {"endpoints": "ack", "policies": "ack"},
        "store_conflict": None,
        "identity": {
            "spiffe_id": f"spiffe://meshlet.local/service/{service}",
            "not_before": issued - 60,
            "not_after": issued + lifetime,
        },
    }
    entry.update(changes)
    return entry


def healthy() -> dict[str, Any]:
    """/v1/status, /v1/ca and /v1/stat?by=caller of a healthy mesh of two services."""
    status = {
        "version": __version__,
        "mtls": {"mode": "permissive", "services": {}},
        "sidecars": [sidecar("item"), sidecar("user")],
    }
    root = {"fingerprint_sha256": "ab" * 32, "subject": "CN=meshlet root", "not_before": NOW - DAY}
    ca = {"trust_domain": "meshlet.local", "root": {**root, "not_after": NOW + 3650 * DAY}, "now": NOW}
    ca["bundle"] = [ca["root"]]
    traffic = {
        "by": "caller",
        "window_seconds": 60,
        "covered_seconds": 60,
        "sidecars": 2,
        "warming_up": False,
        "rows": [{"name": "user → item", "requests": 40.0}],
    }
    return {"status": status, "ca": ca, "traffic": traffic}


def plaintext(state: dict[str, Any]) -> None:
    state["traffic"]["rows"].append({"name": "unauthenticated → item", "requests": 3.0})


def mode(state: dict[str, Any], service: str, value: str) -> None:
    state["status"]["mtls"]["services"][service] = value


def item(state: dict[str, Any], **changes: Any) -> None:
    state["status"]["sidecars"][0].update(changes)


def ca_expires_in(seconds: float) -> Any:
    def change(state: dict[str, Any]) -> None:
        state["ca"]["root"]["not_after"] = NOW + seconds

    return change


NACK = {"type": "policies", "message": "Route/item: bad regex", "names": ["Route/item"], "nonce": "7"}
CONFLICT = {"kept": ["AccessPolicy/item"], "hint": "re-apply them here (docs/security.md)"}

# (case, change to the healthy mesh, the lines that are not ✓: (severity, words in check or detail))
CASES: list[tuple[str, Any, list[tuple[str, str]]]] = [
    ("healthy", lambda s: None, []),
    ("CA expires in 20 days", ca_expires_in(20 * DAY), [(WARNING, "expires in 20 days")]),
    ("CA expires in 3 days", ca_expires_in(3 * DAY), [(ERROR, "it expires in 3 days")]),
    (
        "CA expired",
        ca_expires_in(-DAY),
        [(ERROR, "the root certificate is valid now"), (ERROR, "expired")],
    ),
    (
        "sidecar with an expired certificate",
        lambda s: s["status"]["sidecars"].__setitem__(0, sidecar("item", issued=NOW - 2 * DAY)),
        [(ERROR, "expired")],
    ),
    (
        "sidecar that failed to renew",
        lambda s: s["status"]["sidecars"].__setitem__(0, sidecar("item", issued=NOW - 20 * HOUR)),
        [(WARNING, "should have renewed")],
    ),
    ("sidecar without a certificate", lambda s: item(s, identity=None), [(ERROR, "issued it none")]),
    (
        "sidecar with another service's certificate",
        lambda s: item(s, identity={**sidecar("user")["identity"]}),
        [(ERROR, "service/user")],
    ),
    (
        "NACK",
        lambda s: item(s, last_nack=NACK, last_answer={"policies": "nack"}),
        [(ERROR, "Route/item: bad regex")],
    ),
    ("NACK of an earlier push, ACKed since", lambda s: item(s, last_nack=NACK), []),
    ("policy not ACKed yet", lambda s: item(s, acked={"policies": "p0"}), [(WARNING, "not confirmed")]),
    (
        "store conflict",
        lambda s: item(s, store_conflict=CONFLICT, last_answer={"policies": "nack"}),
        [(ERROR, "store-conflict: it keeps AccessPolicy/item")],
    ),
    ("plaintext edge, permissive", plaintext, [(WARNING, "item served 3 plaintext requests")]),
    ("plaintext edge, strict", lambda s: (plaintext(s), mode(s, "item", "strict")), [(ERROR, "mode strict")]),
    ("mode off", lambda s: mode(s, "user", "off"), [(WARNING, "mtls.mode is off")]),
    (
        "mesh-wide off, and so its plaintext",
        lambda s: (s["status"]["mtls"].update(mode="off"), plaintext(s)),
        [(WARNING, "item-1 (item) speaks mTLS"), (WARNING, "user-1 (user) speaks mTLS"), (WARNING, "mode off")],
    ),
    ("version skew", lambda s: s["status"].update(version="0.0.9"), [(WARNING, "runs 0.0.9")]),
    ("no sidecar", lambda s: s["status"].update(sidecars=[]), [(WARNING, "no sidecar is connected")]),
    ("disconnected sidecar", lambda s: item(s, connected=False), [(WARNING, "its channel closed")]),
    ("no /v1/ca", lambda s: s.update(ca="answered 404: not found"), [(ERROR, "404")]),
    ("metrics not read", lambda s: s.update(traffic="no sidecar answered"), [(WARNING, "no sidecar answered")]),
]


@pytest.mark.parametrize(("change", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verdicts(change: Any, expected: list[tuple[str, str]]) -> None:
    state = copy.deepcopy(healthy())
    change(state)
    lines = evaluate(state["status"], state["ca"], state["traffic"], now=NOW)
    flagged = [line for line in lines if not line.ok]
    assert [line.severity for line in flagged] == [severity for severity, _ in expected], render(lines)
    for line, (_, words) in zip(flagged, expected, strict=True):
        assert words in f"{line.check}: {line.detail}"
        assert line.hint  # every warning and failure says what to do
    groups = [line.group for line in lines]
    assert groups == sorted(groups, key=["control plane", "certificate authority", "sidecars", "traffic"].index)


def test_a_healthy_mesh_is_every_line_passed() -> None:
    state = healthy()
    lines = evaluate(state["status"], state["ca"], state["traffic"], now=NOW)
    text = render(lines)
    assert all(line.severity == OK for line in lines)
    assert "✗" not in text and "‼" not in text and text.endswith("Status check results are ✓")
    assert "control plane\n-------------\n✓ the control plane API answers" in text
    assert "✓ item-1 (item) holds a certificate for item: spiffe://meshlet.local/service/item" in text


def test_the_json_shape() -> None:
    line = Line("traffic", "no plaintext callers reach item", WARNING, "item served 3", "send it through a sidecar")
    assert line.to_json() == {
        "group": "traffic",
        "check": "no plaintext callers reach item",
        "ok": False,
        "severity": "warning",
        "detail": "item served 3",
        "hint": "send it through a sidecar",
    }


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (ApiError(None, ["connection refused"]), "is `meshlet control-plane` running?"),
        (ApiError(None, ["[SSL: CERTIFICATE_VERIFY_FAILED]"]), "--api-ca FILE"),
        (ApiError(401, ["reading needs a token"]), "--token"),
    ],
)
def test_an_unreachable_control_plane_is_one_failed_line(error: ApiError, hint: str) -> None:
    (line,) = unreachable("127.0.0.1:15000", error)
    assert (line.severity, line.group) == (ERROR, "control plane") and hint in line.hint
    assert "✗ the control plane API answers at 127.0.0.1:15000" in render([line])


def test_warnings_alone_pass_and_the_summary_counts_them() -> None:
    state = healthy()
    plaintext(state)
    text = render(evaluate(state["status"], state["ca"], state["traffic"], now=NOW))
    assert text.endswith("Status check results are ✓ with 1 warning (‼)")
    assert "    hint: a client outside the mesh" in text


def test_what_sidecars_said_cannot_drive_the_terminal() -> None:
    state = healthy()
    item(state, last_nack={**NACK, "message": "bad \x1b]0;owned\x07 regex\n"}, last_answer={"policies": "nack"})
    text = render(evaluate(state["status"], state["ca"], state["traffic"], now=NOW))
    assert "\x1b" not in text and "\x07" not in text
    assert "bad \ufffd]0;owned\ufffd regex\ufffd" in text


def test_a_first_check_says_how_much_traffic_it_covered() -> None:
    state = healthy()
    state["traffic"]["covered_seconds"] = 2.0
    (line,) = [
        line for line in evaluate(state["status"], state["ca"], state["traffic"], now=NOW) if line.group == "traffic"
    ]
    assert line.ok and "in the last 2 s" in line.detail and "run again to cover more" in line.detail


def answering(answers: dict[str, Any]) -> ApiClient:
    """A client whose control plane answers each path with ``answers[path]`` (404 when absent)."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path not in answers:
            return httpx.Response(404, json={"problems": ["not found"]})
        return httpx.Response(200, json=answers[request.url.path])

    return ApiClient("127.0.0.1:15000", transport=httpx.MockTransport(handle))


def test_gather_reads_the_three_answers_and_judges_by_the_control_planes_clock() -> None:
    state = healthy()
    answers = {"/v1/status": state["status"], "/v1/ca": state["ca"], "/v1/stat": state["traffic"]}
    with answering(answers) as api:
        lines = gather(api)
    assert all(line.ok for line in lines), render(lines)  # NOW, the control plane's clock, not this machine's
    assert lines[0].check == "the control plane API answers at 127.0.0.1:15000"
    with answering({"/v1/status": state["status"], "/v1/stat": state["traffic"]}) as api:
        flagged = [line for line in gather(api) if not line.ok]
    assert [(line.severity, line.check) for line in flagged] == [
        (ERROR, "the certificate authority can be read (/v1/ca)")
    ]


def test_an_answer_of_another_shape_is_one_failed_line_not_a_traceback() -> None:
    state = healthy()
    del state["status"]["sidecars"][0]["service"]
    answers = {"/v1/status": state["status"], "/v1/ca": state["ca"], "/v1/stat": state["traffic"]}
    with answering(answers) as api:
        (line,) = gather(api)
    assert line.severity == ERROR and "'service'" in line.detail and "version" in line.hint
