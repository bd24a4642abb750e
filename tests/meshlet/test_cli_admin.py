"""meshlet admin export|import: real commands against a real control plane's data directory.
The state module itself: tests/control_plane/test_state_export.py."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import httpx
import pytest
import trio

from meshlet.cli import build_parser
from meshlet.cli.admin import LazyProgress

from ..etcd_cluster import EtcdCluster
from ..helpers import CONTROL_PLANE_READY, run_meshlet

BILLING = "kind: Service\nname: billing\nendpoints: [10.0.0.7:8443]\n"


async def meshlet(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", *args], stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode()


def control_plane(tmp_path: Path, data_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    args = ["control-plane", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--data-dir", str(data_dir), *extra]
    return run_meshlet(tmp_path, f"cp-{data_dir.name}", args, CONTROL_PLANE_READY)


async def what_it_serves(api: str, token: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=f"http://{api}") as client:
        status = (await client.get("/v1/status")).json()
        policies = (await client.get("/v1/policies")).json()
        authority = (await client.get("/v1/ca")).json()
        minted = await client.post("/v1/tokens", json={"ttl": 60}, headers={"Authorization": f"Bearer {token}"})
    return {
        "store": status["store"],
        "policies": policies["version"],
        "documents": [d["name"] for d in policies["documents"]],
        "root": authority["current"]["fingerprint"],
        "token accepted": minted.status_code,
    }


async def test_file_to_file_the_new_control_plane_serves_the_same_state(tmp_path: Path) -> None:
    a, b, state = tmp_path / "a", tmp_path / "b", tmp_path / "state.json"
    (tmp_path / "policy.yaml").write_text(BILLING)
    async with control_plane(tmp_path, a, "--policy", str(tmp_path / "policy.yaml")) as cp:
        token = (a / "api-token").read_text().strip()
        before = await what_it_serves(f"127.0.0.1:{cp.ports['api']}", token)  # mints a join token: a record
        code, _, err = await meshlet("admin", "export", "--data-dir", str(a), "-o", str(state))
        assert code == 1
        assert "the data directory is in use by another store (locked): stop the control plane first" in err
        assert not state.exists()
    assert before["documents"] == ["billing"] and before["token accepted"] == 201

    code, out, err = await meshlet("admin", "export", "--data-dir", str(a), "-o", str(state))
    assert (code, out) == (0, ""), err
    assert "the state contains the CA key and tokens: keep it like a key" in err
    assert f"exported 7 keys (policies: 1, history: 1, tokens: 1, secrets: 2, ca: 2) from file:{a} to {state}" in err
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    assert json.loads(state.read_bytes())["store_id"] == before["store"]

    code, _, err = await meshlet("admin", "export", "--data-dir", str(a), "-o", str(state))
    assert code == 1 and f"{state} exists: give --force to write over it" in err
    code, _, err = await meshlet("admin", "export", "--data-dir", str(a), "-o", str(state), "--force")
    assert code == 0, err

    code, _, err = await meshlet("admin", "import", "--data-dir", str(b), str(state))
    assert code == 0, err
    assert f"imported 7 keys (policies: 1, history: 1, tokens: 1, secrets: 2, ca: 2) into file:{b}: store id " in err
    async with control_plane(tmp_path, b) as cp:
        after = await what_it_serves(f"127.0.0.1:{cp.ports['api']}", token)
    assert after == before  # same store id, policies version, CA root; A's API token is B's

    code, _, err = await meshlet("admin", "import", "--data-dir", str(b), str(state))
    assert code == 1
    assert "the target is not empty: 8 keys (policies: 1, history: 1, tokens: 2, secrets: 2, ca: 2)" in err
    assert "import --force replaces all of it; nothing was written" in err
    code, _, err = await meshlet("admin", "import", "--data-dir", str(b), str(state), "--force")
    assert code == 0, err
    code, out, _ = await meshlet("admin", "export", "--data-dir", str(b), "-o", "-")
    assert json.loads(out)["items"] == json.loads(state.read_bytes())["items"]  # B's token record is gone


async def test_through_a_pipe(tmp_path: Path) -> None:
    async with control_plane(tmp_path, tmp_path / "a"):
        pass  # a data directory as a first start leaves it
    code, out, err = await meshlet(
        "admin", "export", "--store", f"file:{tmp_path / 'a'}", "--data-dir", str(tmp_path / "a")
    )
    assert code == 0, err
    assert "to stdout" in err
    state = json.loads(out)
    assert sorted(state["items"]) == ["ca/ca.crt", "ca/ca.key", "secrets/api-token", "secrets/join-token"]
    code, _, err = await meshlet("admin", "import", "--data-dir", str(tmp_path / "b"), "-", stdin=out.encode())
    assert code == 0, err
    assert (tmp_path / "b" / "api-token").read_bytes() == (tmp_path / "a" / "api-token").read_bytes()


GOOD = json.dumps(
    {"format": "meshlet-state", "version": 1, "store_id": "0" * 32, "revision": 1, "exported_at": "", "items": {}}
)
BAD = [
    ("truncated", GOOD[:-10], "not JSON"),
    ("version 2", GOOD.replace('"version": 1', '"version": 2'), "version 2: this meshlet reads version 1"),
    ("a bad key", GOOD.replace('"items": {}', '"items": {"a//b": ""}'), "store key 'a//b' is not a '/'-separated path"),
    ("bad base64", GOOD.replace('"items": {}', '"items": {"k": "!"}'), "the value of 'k' is not base64"),
]


@pytest.mark.parametrize(("text", "message"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
async def test_a_bad_file_is_refused_and_nothing_written(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "state.json").write_text(text)
    (tmp_path / "state.json").chmod(0o600)
    code, _, err = await meshlet("admin", "import", "--data-dir", str(tmp_path / "b"), str(tmp_path / "state.json"))
    assert code == 1
    assert f"{tmp_path / 'state.json'}: {message}" in err and "nothing was written" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "--store", "memory"], "a memory store lives and dies with its control plane"),
        (["import", "--store", "nope", "x.json"], "--store: store 'nope' is not one of"),
        (["export", "--bogus"], "unrecognized arguments"),
    ],
)
async def test_bad_usage_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = await meshlet("admin", *args, "-o", "-") if args[0] == "export" else await meshlet("admin", *args)
    assert code == 2
    assert message in err


async def test_export_of_a_directory_with_no_store_writes_nothing(tmp_path: Path) -> None:
    code, _, err = await meshlet("admin", "export", "--data-dir", str(tmp_path / "none"), "-o", str(tmp_path / "s"))
    assert code == 1 and "no store in" in err
    assert not (tmp_path / "none").exists() and not (tmp_path / "s").exists()


def test_the_parser_defaults_to_the_control_planes_data_dir() -> None:
    args = build_parser().parse_args(["admin", "import", "state.json"])
    assert (args.admin_command, args.store, args.data_dir, args.file, args.force) == (
        "import",
        "file",
        Path(".meshlet-cp"),
        "state.json",
        False,
    )


def test_the_progress_bar_shows_only_after_a_second() -> None:
    now = [0.0]
    quick = LazyProgress("checking", clock=lambda: now[0])
    for done in range(1, 5001):
        quick(done, 5000)
    assert quick.bar is None  # no time passed

    slow = LazyProgress("checking", clock=lambda: now[0])
    slow(1024, 5000)
    assert slow.bar is None
    now[0] = 1.5
    slow(2048, 5000)
    assert slow.bar is not None
    slow(5000, 5000)
    assert slow.bar.finished


async def test_file_to_etcd_and_back(tmp_path: Path, etcd1: EtcdCluster) -> None:
    """The migration docs/deploy.md describes: export the file store, import it into etcd, run a
    replica there (same store id, policy, CA, API token), and export etcd's state back to a file
    store: the registry and cards of the running replica are never part of it."""
    a, replica_dir, back, state = tmp_path / "a", tmp_path / "r", tmp_path / "back", tmp_path / "state.json"
    etcd = f"etcd://{etcd1.endpoints[0].removeprefix('http://')}/{tmp_path.name[-30:]}"
    (tmp_path / "policy.yaml").write_text(BILLING)
    async with control_plane(tmp_path, a, "--policy", str(tmp_path / "policy.yaml")) as cp:
        token = (a / "api-token").read_text().strip()
        before = await what_it_serves(f"127.0.0.1:{cp.ports['api']}", token)
    code, _, err = await meshlet("admin", "export", "--data-dir", str(a), "-o", str(state))
    assert code == 0, err
    code, _, err = await meshlet("admin", "import", "--store", etcd, str(state))
    assert code == 0, err
    assert f"imported 7 keys (policies: 1, history: 1, tokens: 1, secrets: 2, ca: 2) into {etcd}" in err

    async with control_plane(tmp_path, replica_dir, "--store", etcd) as cp:
        assert (replica_dir / "api-token").read_text().strip() == token  # etcd's copy, taken at start
        after = await what_it_serves(f"127.0.0.1:{cp.ports['api']}", token)  # mints one more token record
        code, _, err = await meshlet("admin", "import", "--store", etcd, str(state))
        assert code == 1 and "the target is not empty" in err  # the registry and card do not count, the rest does
        exported = tmp_path / "from-etcd.json"
        code, _, err = await meshlet("admin", "export", "--store", etcd, "-o", str(exported))
        assert code == 0, err
    assert after == before
    keys = json.loads(exported.read_bytes())["items"]
    assert not [key for key in keys if key.startswith(("registry/", "replicas/")) or key == "leader"]
    code, _, err = await meshlet("admin", "import", "--data-dir", str(back), str(exported))
    assert code == 0, err
    assert (back / "api-token").read_text().strip() == token
