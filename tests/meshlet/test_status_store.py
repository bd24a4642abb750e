"""`meshlet status` on a control plane whose store lacks policies sidecars hold: the sidecar's
POLICIES column says store-conflict, and the lines under the table say which policies and what
to do (the JSON is /v1/status as it is)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from meshlet.cli import commands

STORE, OLD = "b" * 32, "a" * 32
HINT = "re-apply them here (from git, or `meshlet get policies -o yaml` against a copy of the old data dir)"


def _sidecar(node: str, conflict: dict[str, Any] | None, store: str) -> dict[str, Any]:
    return {
        "node": node,
        "service": "item",
        "instance": node,
        "connected": True,
        "registered": True,
        "last_seen_s": 0.5,
        "ready": True,
        "versions": {"endpoints": "e1", "policies": "p1"},
        "acked": {"endpoints": "e1", "policies": "p1"},
        "watching": {"endpoints": [], "policies": None},
        "last_nack": None,
        "policies_store": store,
        "store_conflict": conflict,
    }


STATUS = {
    "sidecars": [
        _sidecar("item-1", {"kept": ["AccessPolicy/item-callers"], "hint": HINT}, OLD),
        _sidecar("user-1", None, STORE),
    ],
    "registry": {"instances": 2, "ready": 2, "services": 2, "self_preservation": False},
    "pushes_total": 4,
    "nacks_total": 1,
    "store": STORE,
    "store_conflicts": 1,
}


class _Api:
    def status(self) -> dict[str, Any]:
        return STATUS


@pytest.mark.parametrize("output", ["table", "json"])
def test_status_shows_the_conflict(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert commands._status(argparse.Namespace(output=output), _Api()) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    if output == "json":
        assert json.loads(out) == STATUS
        return
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["item-1"], ["user-1"])}
    assert "store-conflict" in rows["item-1"] and "store-conflict" not in rows["user-1"]
    assert f"store {STORE}" in out
    assert f"store-conflict: 1 sidecar(s) keep policies store {STORE} lacks" in out
    assert f"item-1: keeps AccessPolicy/item-callers (from store {OLD})" in out
    assert f"hint: {HINT}" in out


def test_no_conflict_no_lines(capsys: pytest.CaptureFixture[str]) -> None:
    calm = {**STATUS, "sidecars": [STATUS["sidecars"][1]], "store_conflicts": 0}

    class Calm:
        def status(self) -> dict[str, Any]:
            return calm

    commands._status(argparse.Namespace(output="table"), Calm())  # type: ignore[arg-type]
    assert "store-conflict" not in capsys.readouterr().out


class _Applying:
    """A control plane where item-1 still shows the store-conflict NACK it sent before the apply,
    then ACKs the applied version."""

    def __init__(self) -> None:
        old_nack = {"type": "policies", "message": "store-conflict: kept ...", "names": ["X"], "nonce": "2"}
        waiting = {**_sidecar("item-1", None, OLD), "acked": {"policies": "p1"}, "last_nack": old_nack}
        self.answers = [[waiting], [waiting], [{**waiting, "acked": {"policies": "W"}}]]

    def policies(self) -> dict[str, Any]:
        return {"push_version": "W"}

    def status(self) -> dict[str, Any]:
        return {"sidecars": self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]}


def test_a_nack_from_before_the_apply_is_not_its_answer(capsys: pytest.CaptureFixture[str]) -> None:
    api = _Applying()
    earlier = commands._policy_nacks(api)  # type: ignore[arg-type]
    assert earlier == {"item-1": "2"}
    args = argparse.Namespace(wait=10.0)
    console = commands._console()
    assert commands._wait_for_sidecars(args, api, console, earlier) == commands.EXIT_APPLIED  # type: ignore[arg-type]
    assert "1 of 1 sidecars ACKed" in capsys.readouterr().out
    # Without knowing what was there before, the old NACK passes for an answer.
    assert commands._wait_for_sidecars(args, _Applying(), console) == commands.EXIT_UNCONFIRMED  # type: ignore[arg-type]


def test_the_running_policy_as_one_stream_apply_takes() -> None:
    from meshlet.policy import load_documents

    texts = {
        "a.yaml": "kind: AccessPolicy\nname: x\nservice: item\nrules:\n  - sources: [user]",
        "b.json": '{"kind": "AccessPolicy", "name": "y", "service": "pay", "rules": [{"sources": ["user"]}]}\n',
        "c.yaml": "---\nkind: Route\nname: item\nhost: item\nrules:\n  - {name: all, destinations: [{service: item}]}\n",
    }
    stream = commands.policy_stream({"texts": texts})
    assert stream.startswith("# file: a.yaml\n") and "---\n# file: b.json\n" in stream
    names = [d.name for d in load_documents([("policies.yaml", stream)])]
    assert names == ["x", "y", "item"]
    assert commands.policy_stream(None) == ""


@pytest.mark.parametrize(
    "what, history, name", [("services", False, None), ("policies", True, None), ("policies", False, "x")]
)
def test_yaml_is_the_whole_running_policy_only(
    what: str, history: bool, name: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(what=what, output="yaml", history=history, name=name)
    assert commands._get(args, _Api()) == 2  # type: ignore[arg-type]
    assert "-o yaml is for `get policies` only" in capsys.readouterr().err
