"""`meshlet status` against replicas on etcd: each replica lists its own sessions, so the CLI asks
every replica on the cards and shows one table with a REPLICA column, then the replicas (which
leads, how many sessions each holds) and etcd's members, and what is wrong with either."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from meshlet.cli import commands
from meshlet.cli.client import ApiError


def _sidecar(node: str, connected: bool = True) -> dict[str, Any]:
    return {
        "node": node,
        "service": node.split("-")[0],
        "instance": node,
        "connected": connected,
        "registered": True,
        "last_seen_s": 0.5,
        "ready": True,
        "versions": {"endpoints": "e1", "policies": "p1"},
        "acked": {"endpoints": "e1", "policies": "p1"},
        "watching": {"endpoints": [], "policies": None},
        "last_nack": None,
        "policies_store": "s",
        "store_conflict": None,
    }


def _card(replica: str, api: str, sessions: int, *, leader: bool, this: bool) -> dict[str, Any]:
    push = api.replace(":15000", ":15010")
    return {
        "id": replica,
        "push": push,
        "api": api,
        "version": "0.1.0",
        "started": 1796692834.0,
        "sessions": sessions,
        "lease": "1a2b",
        "leader": leader,
        "self": this,
    }


def _status(sidecars: list[dict[str, Any]], cluster: dict[str, Any] | None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "sidecars": sidecars,
        "registry": {"instances": 3, "ready": 3, "services": 3, "self_preservation": False},
        "pushes_total": 4,
        "nacks_total": 0,
        "store": "s",
        "store_conflicts": 0,
    }
    if cluster is not None:
        status["cluster"] = cluster
    return status


def _cluster(*, watching: bool = True, member_error: str = "") -> dict[str, Any]:
    return {
        "id": "cp-a",
        "leader": "cp-b",
        "revision": 42,
        "replicas": [
            _card("cp-a", "10.0.0.1:15000", 2, leader=False, this=True),
            _card("cp-b", "10.0.0.2:15000", 1, leader=True, this=False),
        ],
        "etcd": {
            "endpoints": ["http://10.0.0.9:2379"],
            "watching": watching,
            "watch_error": "" if watching else "no etcd member answered /v3/watch",
            "lease_error": "",
            "writes_waiting": 0,
            "write_error": "",
            "relists": 0,
        },
        "held": 0,
        "held_reason": None,
        "bad_records": 0,
        "members": [
            {
                "endpoint": "http://10.0.0.9:2379",
                "member_id": "8e9e05c52164694d",
                "leader": True,
                "raft_term": 2,
                "revision": 42,
                "db_size": 20480,
                "version": "3.4.23",
                "error": member_error,
            }
        ],
    }


class _Api:
    """A replica's API; ``siblings``: the other replicas' answers (or errors) by API address."""

    def __init__(self, status: dict[str, Any], siblings: dict[str, dict[str, Any] | ApiError]) -> None:
        self._status = status
        self.siblings = siblings
        self.asked: list[str] = []

    def status(self) -> dict[str, Any]:
        return self._status

    def sibling(self, api: str) -> _Api:
        self.asked.append(api)
        answer = self.siblings[api]
        if isinstance(answer, ApiError):
            return _Failing(answer)  # type: ignore[return-value]
        return _Api(answer, {})

    def __enter__(self) -> _Api:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Failing(_Api):
    def __init__(self, error: ApiError) -> None:
        super().__init__({}, {})
        self.error = error

    def status(self) -> dict[str, Any]:
        raise self.error


def run(api: _Api, output: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert commands._status(argparse.Namespace(output=output), api) == 0  # type: ignore[arg-type]
    return capsys.readouterr().out


def test_every_replicas_sidecars_in_one_table(capsys: pytest.CaptureFixture[str]) -> None:
    theirs = _status([_sidecar("user-1"), _sidecar("item-1", connected=False)], None)
    api = _Api(_status([_sidecar("item-1"), _sidecar("cart-1")], _cluster()), {"10.0.0.2:15000": theirs})
    out = run(api, "table", capsys)
    assert api.asked == ["10.0.0.2:15000"]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and "-1" in line.split()[0]}
    # item-1 just moved: connected on cp-a, a departed session on cp-b. One row, the live one.
    assert {node: row[2] for node, row in rows.items()} == {"cart-1": "cp-a", "item-1": "cp-a", "user-1": "cp-b"}
    assert "cp-a (this one)" in out and "10.0.0.2:15000" in out
    assert "8e9e05c52164694d" in out and "3.4.23" in out and "20 KiB" in out
    assert "no leader" not in out and "etcd:" not in out


def test_the_json_has_every_replicas_sidecars(capsys: pytest.CaptureFixture[str]) -> None:
    theirs = _status([_sidecar("user-1")], None)
    api = _Api(_status([_sidecar("item-1")], _cluster()), {"10.0.0.2:15000": theirs})
    data = json.loads(run(api, "json", capsys))
    assert [(s["node"], s["replica"]) for s in data["sidecars"]] == [("item-1", "cp-a"), ("user-1", "cp-b")]
    assert data["cluster"]["leader"] == "cp-b"


def test_what_is_wrong_is_said(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = _cluster(watching=False, member_error="cannot connect (connection refused)")
    cluster["leader"] = ""
    unreachable = ApiError(None, ["cannot connect to 10.0.0.2:15000"])
    api = _Api(_status([_sidecar("item-1")], cluster), {"10.0.0.2:15000": unreachable})
    out = run(api, "table", capsys)
    assert "API unreachable" in out
    assert "no leader" in out
    assert "watch: no etcd member answered /v3/watch" in out
    assert "(as etcd last said)" in out  # who leads is not known while the watch is cut
    assert "connection refused" in out


def test_a_single_control_plane_shows_no_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(_Api(_status([_sidecar("item-1")], None), {}), "table", capsys)
    assert "REPLICA" not in out and "ETCD MEMBER" not in out
