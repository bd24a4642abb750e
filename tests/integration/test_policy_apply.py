"""`meshlet apply`, `get policies`, `rollback` and `control-plane --policy` against a real
control plane and a real sidecar: versions, history, nothing changed on error, waiting for
the sidecar's ACK, and applied policy surviving a restart."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import msgpack
import pytest
import trio

from ..helpers import join_token, run_control_plane, run_sidecar

BILLING = "kind: Service\nname: billing\nendpoints: [10.0.0.7:8443]\n"
ROUTE = (
    "kind: Route\nname: item\nhost: item\nrules:\n  - {name: all, destinations: [{service: item}]}\n"
    "tests:\n  - request: {path: /x}\n    expect: {rule: all}\n"
)


async def meshlet(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_apply_history_rollback_and_errors(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "billing.yaml").write_text(BILLING)
    (policy / "routes.yaml").write_text(ROUTE)
    async with run_control_plane(tmp_path) as cp:
        api = f"127.0.0.1:{cp.ports['api']}"
        async with run_sidecar(
            tmp_path, service="user", app="127.0.0.1:1", control_plane=f"127.0.0.1:{cp.ports['push']}"
        ):
            code, out, err = await meshlet(
                "apply", "--token-file", str(tmp_path / "cp" / "api-token"), "-f", str(policy), "--api", api
            )
            assert code == 0, err
            assert "added    Route/item" in out and "added    Service/billing" in out
            assert "1 of 1 sidecars ACKed" in out  # it waited for the sidecar
            code, out, _ = await meshlet("get", "policies", "-o", "json", "--api", api)
            first = json.loads(out)
            code, out, err = await meshlet("explain", "http://item/x?y=1", "--from", "user", "-o", "json", "--api", api)
            assert code == 0, err
            explained = json.loads(out)
            assert explained["rule"]["name"] == "all" and explained["decision"]["destinations"][0]["service"] == "item"
            code, out, _ = await meshlet("explain", "http://item/x", "--api", api)
            assert code == 0 and "rule: all (priority 0) matches every request" in out
            code, _, err = await meshlet("explain", "http://item/x", "-H", "broken", "--api", api)
            assert code == 2 and "expected NAME:VALUE" in err
            assert [(d["kind"], d["name"]) for d in first["documents"]] == [("Route", "item"), ("Service", "billing")]

            code, out, _ = await meshlet(
                "apply", "--token-file", str(tmp_path / "cp" / "api-token"), "-f", str(policy), "--api", api
            )
            assert code == 0 and f"unchanged: version {first['version']}" in out

            (policy / "billing.yaml").write_text(BILLING.replace("10.0.0.7", "10.0.0.8"))
            code, out, _ = await meshlet(
                "apply",
                "--token-file",
                str(tmp_path / "cp" / "api-token"),
                "-f",
                str(policy),
                "--dry-run",
                "--api",
                api,
            )
            assert code == 0 and "changed  Service/billing" in out and "nothing applied" in out
            code, out, _ = await meshlet(
                "apply", "--token-file", str(tmp_path / "cp" / "api-token"), "-f", str(policy), "--api", api
            )
            assert code == 0 and f"(was {first['version']})" in out

            # An invalid file, a failing route test: exit 1, every problem, nothing changed.
            (policy / "bad.yaml").write_text("kind: Service\nname: Bad\n")
            (policy / "routes.yaml").write_text(ROUTE.replace("expect: {rule: all}", "expect: {rule: none}"))
            code, out, err = await meshlet(
                "apply", "--token-file", str(tmp_path / "cp" / "api-token"), "-f", str(policy), "--api", api
            )
            assert code == 1
            assert "bad.yaml:2: name: 'Bad' is not a service name" in err
            assert "routes.yaml:7: tests[0]: expected rule 'none', got rule 'all'" in err
            code, out, _ = await meshlet("get", "policies", "--history", "-o", "json", "--api", api)
            history = json.loads(out)["history"]
            assert [h["seq"] for h in history] == [2, 1]

            code, out, err = await meshlet(
                "rollback", "--token-file", str(tmp_path / "cp" / "api-token"), first["version"][:6], "--api", api
            )
            assert code == 0, err
            code, out, _ = await meshlet("get", "policies", "-o", "json", "--api", api)
            assert json.loads(out)["version"] == first["version"]
            code, _, err = await meshlet(
                "rollback", "--token-file", str(tmp_path / "cp" / "api-token"), "ffffff", "--api", api
            )
            assert code == 1 and "not in the history" in err

    # A restart keeps the applied policy (the file store in the data directory).
    async with run_control_plane(tmp_path) as cp:
        code, out, _ = await meshlet("get", "policies", "-o", "json", "--api", f"127.0.0.1:{cp.ports['api']}")
        assert json.loads(out)["version"] == first["version"]


async def test_control_plane_policy_flag_applies_at_start_and_refuses_bad_policy(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BILLING)
    async with run_control_plane(tmp_path, extra=["--policy", str(good)]) as cp:
        code, out, _ = await meshlet("get", "policies", "-o", "json", "--api", f"127.0.0.1:{cp.ports['api']}")
        assert [d["name"] for d in json.loads(out)["documents"]] == ["billing"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Nope\n")
    code, _, err = await meshlet(
        "control-plane",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "cp2"),
        "--policy",
        str(bad),
    )
    assert code == 1
    assert f"{bad}:1: kind: 'Nope' is not a kind" in err


async def test_writing_policy_needs_the_token(tmp_path: Path) -> None:
    (tmp_path / "billing.yaml").write_text(BILLING)
    async with run_control_plane(tmp_path) as cp:
        api = f"127.0.0.1:{cp.ports['api']}"
        token_file = tmp_path / "cp" / "api-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        code, _, err = await meshlet("apply", "-f", str(tmp_path / "billing.yaml"), "--api", api, "--token", "wrong")
        assert code == 1 and "writing needs the control plane's token" in err
        code, _, err = await meshlet(
            "apply", "-f", str(tmp_path / "billing.yaml"), "--api", api, "--token-file", str(tmp_path / "nowhere")
        )
        assert code == 1 and "api-token" in err
        code, out, _ = await meshlet("get", "policies", "-o", "json", "--api", api)  # reading needs none
        assert json.loads(out)["version"] == ""
        code, out, err = await meshlet(
            "apply", "-f", str(tmp_path / "billing.yaml"), "--api", api, f"--token={token_file.read_text().strip()}"
        )
        assert code == 0, err


async def test_a_nack_is_reported_by_apply_and_shown_by_status(tmp_path: Path) -> None:
    """A sidecar of another version that cannot read a policy NACKs it (a raw wire
    client plays it): `apply` says so and exits 3, `status` shows the NACK."""
    from meshlet import wire

    (tmp_path / "billing.yaml").write_text(BILLING)
    async with run_control_plane(tmp_path) as cp:
        api, token = f"127.0.0.1:{cp.ports['api']}", str(tmp_path / "cp" / "api-token")
        stream = await trio.open_tcp_stream("127.0.0.1", cp.ports["push"])
        hello = wire.Hello(
            (1, 2),
            "old-1",
            "old",
            {"instance_id": "old-1", "address": "127.0.0.1:9", "admin": "127.0.0.1:9", "ready": True},
            {},
            {"endpoints": ()},
            token=join_token(tmp_path),
        )
        conn = wire.ClientConnection(hello)
        await stream.send_all(conn.hello())

        async def answer() -> None:
            while data := await stream.receive_some(65536):
                for message in conn.receive_data(data):
                    if isinstance(message, wire.Push):
                        if message.type == "policies" and message.resources:
                            names = tuple(r.name for r in message.resources)
                            await stream.send_all(conn.nack(message, "", "unknown kind Service", names))
                        else:
                            await stream.send_all(conn.ack(message))
                    elif isinstance(message, wire.Ping):
                        await stream.send_all(wire.encode(wire.Pong(message.id)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            code, out, err = await meshlet(
                "apply", "-f", str(tmp_path / "billing.yaml"), "--api", api, "--token-file", token, "--wait", "10"
            )
            assert code == 3, out + err  # applied, but not confirmed by every sidecar
            assert "applied, but not confirmed by every sidecar" in out
            assert "0 of 1 sidecars ACKed, 1 NACKed" in out and "NACK old-1: unknown kind Service" in out
            code, out, _ = await meshlet("status", "-o", "json", "--api", api)
            (old,) = json.loads(out)["sidecars"]
            assert old["last_nack"] == {
                "type": "policies",
                "message": "unknown kind Service",
                "names": ["Service/billing"],
                "nonce": old["last_nack"]["nonce"],  # which push it answered (apply tells old NACKs from new)
            }
            code, out, _ = await meshlet("status", "--api", api)
            assert "policies Service/billing: unknown kind Service" in out
            nursery.cancel_scope.cancel()
        await stream.aclose()


async def _silent_sidecar(port: int, node: str, token: str) -> trio.SocketStream:
    """A raw push-channel client that says hello and then never answers anything."""
    from meshlet import wire

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    hello = wire.Hello(
        (1, 2),
        node,
        "old",
        {"instance_id": node, "address": "127.0.0.1:9", "admin": "127.0.0.1:9"},
        {},
        {},
        token=token,
    )
    await stream.send_all(wire.ClientConnection(hello).hello())
    return stream


async def test_apply_says_applied_but_unconfirmed_when_the_control_plane_dies_while_it_waits(tmp_path: Path) -> None:
    (tmp_path / "billing.yaml").write_text(BILLING)
    async with run_control_plane(tmp_path) as cp:
        api, token = f"127.0.0.1:{cp.ports['api']}", str(tmp_path / "cp" / "api-token")
        stream = await _silent_sidecar(cp.ports["push"], "mute-1", join_token(tmp_path))  # apply waits for its ACK
        result: list[tuple[int, str, str]] = []

        async def apply() -> None:
            result.append(
                await meshlet(
                    "apply", "-f", str(tmp_path / "billing.yaml"), "--api", api, "--token-file", token, "--wait", "30"
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(apply)
            with trio.fail_after(20):
                while True:  # until the control plane has applied it
                    code, out, _ = await meshlet("get", "policies", "-o", "json", "--api", api)
                    if code == 0 and json.loads(out)["version"]:
                        break
                    await trio.sleep(0.1)
            os.killpg(cp.process.pid, signal.SIGKILL)  # dies while apply waits for the ACK
        await stream.aclose()
    ((code, out, err),) = result
    assert "applied: version" in out
    assert "applied, but not confirmed by every sidecar" in out and "stopped answering" in out, out + err
    assert code == 3, out + err
    assert "is `meshlet control-plane` running?" not in err


def _corrupt_entry(data_dir: Path, key: str) -> Path:
    """Overwrite a region in the middle of the state file: the first bytes of one stored value
    (the file's own structure stays readable, as when a disk damages a block)."""
    path = data_dir / "state.msgpack"
    data = bytearray(path.read_bytes())
    value = msgpack.unpackb(bytes(data), raw=False)["items"][key]
    at = bytes(data).find(value)
    assert at > 0
    data[at : at + 16] = b"\xc1" * 16  # 0xc1: never used by msgpack
    path.write_bytes(bytes(data))
    return path


async def test_a_corrupted_store_entry_is_named_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "billing.yaml").write_text(BILLING)
    (tmp_path / "both.yaml").write_text(BILLING + "---\n" + ROUTE)
    async with run_control_plane(tmp_path) as cp:
        api, token = f"127.0.0.1:{cp.ports['api']}", str(tmp_path / "cp" / "api-token")
        for name in ("billing.yaml", "both.yaml"):
            code, out, err = await meshlet("apply", "-f", str(tmp_path / name), "--api", api, "--token-file", token)
            assert code == 0, out + err
        code, out, _ = await meshlet("get", "policies", "--history", "-o", "json", "--api", api)
        first = json.loads(out)["history"][-1]["version"]
    path = _corrupt_entry(tmp_path / "cp", "policies/history/00000001")  # not the running one
    async with run_control_plane(tmp_path) as cp:  # starts: what runs is intact
        api = f"127.0.0.1:{cp.ports['api']}"
        code, _, err = await meshlet("get", "policies", "--history", "--api", api)
        assert code == 1
        assert f"{path}: corrupt entry 'policies/history/00000001'" in err and "restore the file" in err, err
        code, _, err = await meshlet("rollback", first, "--api", api, "--token-file", token)
        assert code == 1 and "nothing was applied" in err
        assert f"{path}: corrupt entry 'policies/history/00000001'" in err, err
        assert "is `meshlet control-plane` running?" not in err
    # the running version damaged: the control plane refuses to start, and says why
    _corrupt_entry(tmp_path / "cp", "policies/history/00000002")
    code, _, err = await meshlet(
        "control-plane", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--data-dir", str(tmp_path / "cp")
    )
    assert code == 1
    assert f"{path}: corrupt entry 'policies/history/00000002'" in err and "restore the file" in err, err
    assert "Traceback" not in err


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs: needs root")
async def test_a_full_disk_is_reported_as_a_full_disk(tmp_path: Path) -> None:
    """A real full file system: the store on a 64 KiB tmpfs, filled up."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    await trio.run_process(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(tiny)])
    try:
        (tmp_path / "billing.yaml").write_text(BILLING)
        async with run_control_plane(tmp_path, extra=["--store", f"file:{tiny}"]) as cp:
            api, token = f"127.0.0.1:{cp.ports['api']}", str(tmp_path / "cp" / "api-token")
            with open(tiny / "filler", "wb", buffering=0) as filler:  # take every free block
                try:
                    while True:
                        filler.write(b"\0" * 4096)
                except OSError:
                    pass
            code, out, err = await meshlet(
                "apply", "-f", str(tmp_path / "billing.yaml"), "--api", api, "--token-file", token
            )
            assert code == 1, out + err
            assert f"no space left on device: {tiny / 'state.msgpack'}" in err, err
            assert "nothing was applied" in err and "is `meshlet control-plane` running?" not in err
            code, out, _ = await meshlet("get", "policies", "-o", "json", "--api", api)
            assert json.loads(out)["version"] == ""  # nothing changed
            # room again: the same apply goes through
            (tiny / "filler").unlink()
            code, out, err = await meshlet(
                "apply", "-f", str(tmp_path / "billing.yaml"), "--api", api, "--token-file", token
            )
            assert code == 0, out + err
        assert "no space left on device" in cp.log()
    finally:
        await trio.run_process(["umount", "-l", str(tiny)], check=False)
