"""The control plane with real sidecars: registration, endpoint pushes, leases,
fail-static, and bad peers on the push channel. Real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from meshlet import wire

from ..helpers import SidecarProcess, fake_control_plane_tls, join_token, run_control_plane, run_sidecar, sample
from ..mesh import Mesh
from ..origin import Origin

POLL = 0.1


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    """Poll ``check`` until it is true; bounded, so a test can fail instead of hanging."""
    with trio.move_on_after(timeout):
        while not await check():  # noqa: ASYNC110 - polling another process's state
            await trio.sleep(POLL)
        return
    raise AssertionError(f"timed out waiting for: {what}")


async def endpoints_of(sidecar: SidecarProcess, service: str) -> list[str]:
    async with httpx.AsyncClient() as client:
        dump = (await client.get(f"http://{sidecar.admin}/config_dump")).json()
    return [e["address"] for e in dump["config"]["services"].get(service, {}).get("endpoints", [])]


async def calls(sidecar: SidecarProcess, service: str) -> httpx.Response:
    """The app behind ``sidecar`` calls ``service`` once: from then on its sidecar watches it."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"http://{sidecar.outbound}/hello", headers={"host": service})


async def learns(caller: SidecarProcess, service: str, addresses: list[str], timeout: float = 15.0) -> None:
    """``caller``'s app calls ``service`` once; then its sidecar comes to hold ``addresses``."""
    await calls(caller, service)

    async def holds() -> bool:
        return await endpoints_of(caller, service) == addresses

    await eventually(holds, f"the caller's sidecar holds {service} at {addresses}", timeout)


async def meshlet(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_register_discover_and_route(mesh: Mesh, origin: Origin) -> None:
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin, extra=["--label", "version=v1", "--zone", "a"])
    user = await mesh.sidecar("user")

    async def registered() -> bool:
        code, out, _ = await meshlet("get", "endpoints", "item", "-o", "json", "--api", mesh.api)
        return code == 0 and bool(json.loads(out)["endpoints"].get("item"))

    await eventually(registered, "item registered")
    assert await endpoints_of(user, "item") == []  # user's app has not called item yet
    # The first call: user's sidecar looks item up, then routes it. No 404, no retry.
    response = await calls(user, "item")
    assert (response.status_code, response.text) == (200, "hello")
    assert await endpoints_of(user, "item") == [item.inbound]
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"http://{user.admin}/ready")
    assert ready.status_code == 200

    code, out, err = await meshlet("get", "endpoints", "item", "-o", "json", "--api", mesh.api)
    assert code == 0, err
    (entry,) = json.loads(out)["endpoints"]["item"]
    assert entry["address"] == item.inbound
    assert entry["labels"] == {"version": "v1", "zone": "a"}
    assert entry["app_port"] == origin.port  # registered by the sidecar, for transparent callers
    assert entry["ready"] and entry["connected"]

    code, out, err = await meshlet("status", "-o", "json", "--api", mesh.api)
    assert code == 0, err
    status = json.loads(out)
    by_service = {s["service"]: s for s in status["sidecars"]}
    assert set(by_service) == {"item", "user"}
    assert all(s["connected"] and s["last_nack"] is None for s in by_service.values())
    assert by_service["user"]["acked"]["endpoints"] == by_service["user"]["versions"]["endpoints"] != ""

    code, out, _ = await meshlet("get", "services", "--api", mesh.api)
    assert code == 0 and "item" in out and "user" in out

    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://{mesh.api}/metrics")).text
    assert "meshlet_cp_connected_sidecars 2.0" in metrics
    assert "meshlet_cp_nacks_total 0.0" in metrics
    assert "meshlet_cp_convergence_seconds_count" in metrics


async def test_a_service_called_before_it_exists_is_routed_once_it_registers(mesh: Mesh, origin: Origin) -> None:
    await mesh.control_plane()
    user = await mesh.sidecar("user")

    async def ready() -> bool:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://{user.admin}/ready")).status_code == 200

    await eventually(ready, "user's sidecar has its first push")
    response = await calls(user, "item")  # asked, and told: no such service
    assert (response.status_code, response.headers.get("x-meshlet-error")) == (404, "no-route")
    response = await calls(user, "Not_A.Service")  # not a service name: no lookup at all
    assert (response.status_code, response.headers.get("x-meshlet-error")) == (404, "no-route")
    code, out, err = await meshlet("status", "-o", "json", "--api", mesh.api)
    assert code == 0, err
    (status,) = json.loads(out)["sidecars"]
    assert status["watching"]["endpoints"] == ["item"]
    item = await mesh.sidecar("item", app=origin)

    async def pushed() -> bool:  # user watches item: it arrives with no new call
        return await endpoints_of(user, "item") == [item.inbound]

    await eventually(pushed, "item pushed to its watcher when it registers")
    response = await calls(user, "item")
    assert (response.status_code, response.text) == (200, "hello")
    # A sidecar watches only what its app calls: item's sidecar knows nothing of user.
    assert await endpoints_of(item, "user") == []


async def test_killed_sidecar_leaves_after_its_lease(mesh: Mesh, origin: Origin) -> None:
    await mesh.control_plane(extra=["--ttl", "2"])
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")

    async def gone() -> bool:
        return await endpoints_of(user, "item") == []

    await learns(user, "item", [item.inbound])
    os.killpg(item.process.pid, signal.SIGKILL)
    killed_at = trio.current_time()
    # Inside the lease window the dead endpoint is still listed: requests fail
    # fast with 503 connect-failed (retries come with the resilience layer), never hang.
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
    assert (response.status_code, response.headers.get("x-meshlet-error")) == (503, "connect-failed")

    async def item_status() -> list[dict[str, object]]:
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"http://{mesh.api}/v1/status")).json()
        return [s for s in status["sidecars"] if s["service"] == "item"]

    await eventually(gone, "item's endpoint removed after the lease", timeout=10)
    # TTL 2 s + lease check (1 s) + push; never the 10 s default.
    assert trio.current_time() - killed_at < 2 + 1 + 2
    assert await item_status() == []


async def test_a_sidecar_paused_past_its_lease_is_back_within_one_renew_interval(mesh: Mesh, origin: Origin) -> None:
    """SIGSTOP (a long GC, CPU throttling, a paused VM) for longer than the lease but shorter than
    the keepalive's 15 s of silence: the lease runs out while the channel stays up. On SIGCONT the
    sidecar's next message (its ping, every 5 s) puts the registration back at once."""
    ttl = 7  # above the sidecar's 5 s ping interval, so a running sidecar never lapses
    cp = await mesh.control_plane(extra=["--ttl", str(ttl)])
    api = f"http://{mesh.api}"
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    await learns(user, "item", [item.inbound])

    async def item_status() -> dict[str, object]:
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"{api}/v1/status")).json()
        (found,) = [s for s in status["sidecars"] if s["service"] == "item"]
        return dict(found, restored=status["registry"]["restored_total"])

    async def gone() -> bool:
        return await endpoints_of(user, "item") == []

    async def back() -> bool:
        return await endpoints_of(user, "item") == [item.inbound]

    os.killpg(item.process.pid, signal.SIGSTOP)
    try:
        await eventually(gone, "the paused item's lease ran out", timeout=ttl + 5)
        status = await item_status()
        # its channel is still up, but the registry no longer has it: never shown ready
        assert (status["connected"], status["registered"], status["ready"]) == (True, False, False)
    finally:
        os.killpg(item.process.pid, signal.SIGCONT)
    await eventually(back, "the item's endpoint restored on its next ping", timeout=5 + 2)
    status = await item_status()
    assert (status["connected"], status["registered"], status["ready"], status["restored"]) == (
        True,
        True,
        True,
        1,
    )
    response = await calls(user, "item")
    assert (response.status_code, response.text) == (200, "hello")
    assert "registration restored" in cp.log()


async def test_draining_sidecar_deregisters_at_once(tmp_path: Path, origin: Origin) -> None:
    async with run_control_plane(tmp_path, extra=["--ttl", "30"]) as cp:
        push = f"127.0.0.1:{cp.ports['push']}"
        async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=push) as user:
            async with run_sidecar(
                tmp_path, service="item", app=f"127.0.0.1:{origin.port}", control_plane=push
            ) as item:
                await learns(user, "item", [item.inbound])
            # SIGTERM (the context's exit): a bye, so no 30 s lease wait.

            async def gone() -> bool:
                return await endpoints_of(user, "item") == []

            await eventually(gone, "item deregistered by its bye", timeout=5)


async def test_fail_static_when_the_control_plane_dies_and_comes_back(tmp_path: Path, origin: Origin) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    async with run_control_plane(tmp_path, listen=listen) as cp:
        async with (
            run_sidecar(tmp_path, service="item", app=f"127.0.0.1:{origin.port}", control_plane=listen) as item,
            run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=listen) as user,
        ):
            await learns(user, "item", [item.inbound])
            os.killpg(cp.process.pid, signal.SIGKILL)
            await trio.sleep(0.5)
            async with httpx.AsyncClient() as client:
                for _ in range(5):  # the control plane is gone: traffic goes on
                    response = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
                    assert response.status_code == 200
                assert (await client.get(f"http://{user.admin}/ready")).status_code == 200
            # ... but a service never called before cannot be looked up: 503, not a 404 that
            # would claim it does not exist.
            response = await calls(user, "billing")
            assert (response.status_code, response.headers.get("x-meshlet-error")) == (503, "no-healthy-endpoints")
            assert "unreachable" in response.text

            # A user sidecar restarted while the control plane is down serves from disk.
            async with run_sidecar(
                tmp_path,
                service="user",
                app="127.0.0.1:1",
                control_plane=listen,
                extra=["--instance-id", "user-restarted"],
            ) as restarted:
                pass
            del restarted

            async with run_control_plane(tmp_path, listen=listen) as cp2:
                api = f"127.0.0.1:{cp2.ports['api']}"

                async def rebuilt() -> bool:
                    code, out, _ = await meshlet("get", "endpoints", "-o", "json", "--api", api)
                    endpoints = json.loads(out)["endpoints"] if code == 0 else {}
                    return len(endpoints.get("item", [])) == 1 and len(endpoints.get("user", [])) == 1

                await eventually(rebuilt, "sidecars reconnect and the registry is rebuilt", timeout=20)
                async with httpx.AsyncClient() as client:
                    response = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
                assert response.status_code == 200


async def test_a_restarted_control_plane_removes_nothing_until_the_registry_is_rebuilt(
    tmp_path: Path, origin: Origin
) -> None:
    """After a restart the registry is empty until sidecars re-register: the first
    sidecar back must not be told that every service it calls is gone. Removals wait
    for the warm-up (one lease TTL); then what did not come back goes."""
    listen = f"127.0.0.1:{free_port()}"
    async with run_control_plane(tmp_path, listen=listen, extra=["--ttl", "8"]) as cp:
        async with (
            run_sidecar(tmp_path, service="item", app=f"127.0.0.1:{origin.port}", control_plane=listen) as item,
            run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=listen) as user,
        ):

            async def discovered() -> bool:
                return await endpoints_of(user, "item") == [item.inbound]

            await calls(user, "item")
            await eventually(discovered, "item discovered")
            os.killpg(cp.process.pid, signal.SIGKILL)
            os.killpg(item.process.pid, signal.SIGSTOP)  # item cannot re-register for now
            try:
                # The warm-up (one TTL, 8 s) outlasts the user's reconnection (jittered
                # backoff, a few seconds at most here).
                async with run_control_plane(tmp_path, listen=listen, extra=["--ttl", "8"]) as cp2:
                    api = f"127.0.0.1:{cp2.ports['api']}"

                    async def user_back() -> bool:
                        async with httpx.AsyncClient() as client:
                            status = (await client.get(f"http://{api}/v1/status")).json()
                        return any(s["service"] == "user" and s["acked"] for s in status["sidecars"])

                    await eventually(user_back, "user reconnects to the new control plane")
                    assert await endpoints_of(user, "item") == [item.inbound]  # kept: warming up

                    async def removed() -> bool:
                        return await endpoints_of(user, "item") == []

                    await eventually(removed, "item, never back, removed after the warm-up", timeout=15)
                    os.killpg(item.process.pid, signal.SIGCONT)
                    await eventually(discovered, "item back once it re-registers", timeout=20)
            finally:
                os.killpg(item.process.pid, signal.SIGCONT)


async def test_sidecar_restarted_while_control_plane_down_serves_persisted_config(
    tmp_path: Path, origin: Origin
) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    async with run_control_plane(tmp_path, listen=listen) as cp:
        async with run_sidecar(tmp_path, service="item", app=f"127.0.0.1:{origin.port}", control_plane=listen) as item:
            async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=listen) as user:
                await learns(user, "item", [item.inbound])
            os.killpg(cp.process.pid, signal.SIGKILL)
            # Same data dir, control plane down: the new user sidecar must serve at once.
            async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=listen) as again:
                async with httpx.AsyncClient() as client:
                    assert (await client.get(f"http://{again.admin}/ready")).status_code == 200
                    response = await client.get(f"http://{again.outbound}/hello", headers={"host": "item"})
                assert (response.status_code, response.text) == (200, "hello")


async def test_fail_closed_at_boot_without_control_plane_or_persisted_config(tmp_path: Path, origin: Origin) -> None:
    app = f"127.0.0.1:{origin.port}"
    async with run_sidecar(tmp_path, service="user", app=app, control_plane=f"127.0.0.1:{free_port()}") as s:
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://{s.admin}/ready")
            # No caller reaches the app before a configuration (its access policies) is in place:
            # the inbound port is held but refuses, so a caller's sidecar tries another instance.
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://{s.inbound}/hello")
    assert ready.status_code == 503
    assert "no configuration" in ready.text
    assert "/hello" not in origin.stats.paths  # (its health probe is the sidecar's own)


async def _raw_session(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    with trio.move_on_after(5):
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return received


async def _after_welcome(port: int, hello: wire.Hello, then: wire.Message) -> list[wire.Message]:
    """Say hello, wait for welcome, send ``then``; every message received until the close."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    decoder = wire.FrameDecoder()
    received: list[wire.Message] = []
    with trio.move_on_after(5):
        await stream.send_all(wire.encode(hello))
        while not received:
            received += decoder.feed(await stream.receive_some(65536))
        await stream.send_all(wire.encode(then))
        while chunk := await stream.receive_some(65536):
            received += decoder.feed(chunk)
    await stream.aclose()
    return received


async def test_bad_peers_are_refused_without_harming_others(mesh: Mesh, origin: Origin) -> None:
    cp = await mesh.control_plane()
    port = cp.ports["push"]
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user")
    await learns(user, "item", [item.inbound])
    garbage = await _raw_session(port, struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    assert wire.FrameDecoder().feed(garbage)[0] == wire.Error(
        "bad-frame",
        wire.FrameDecoder().feed(garbage)[0].message,  # type: ignore[union-attr]
    )
    oversized = await _raw_session(port, struct.pack(">I", wire.MAX_FRAME + 1))
    (error,) = wire.FrameDecoder().feed(oversized)
    assert isinstance(error, wire.Error) and error.reason == "frame-too-large"
    hello = wire.Hello((99,), "n", "x", {"instance_id": "x-1", "address": "127.0.0.1:9", "admin": "127.0.0.1:9"})
    refused = await _raw_session(port, wire.encode(hello))
    (error,) = wire.FrameDecoder().feed(refused)
    assert isinstance(error, wire.Error) and error.reason == "unsupported-version"
    not_hello = await _raw_session(port, wire.encode(wire.Ping(1)))
    (error,) = wire.FrameDecoder().feed(not_hello)
    assert isinstance(error, wire.Error) and error.reason == "expected-hello"
    # Errors after the handshake: a watch of an unknown type (v2), a watch on v1.
    for versions, reason in (((2,), "bad-message"), ((1,), "unknown-message")):
        hello = wire.Hello(
            versions,
            f"bad-{versions[0]}",
            "x",
            {"instance_id": f"x-{versions[0]}", "address": "127.0.0.1:9", "admin": "127.0.0.1:9"},
            token=join_token(mesh.tmp_path),
        )
        messages = await _after_welcome(port, hello, wire.Watch("nonsense", ("a",)))
        # welcome also says where the control plane's HTTP API (its trace store) is, its store and
        # this session's span token
        welcome = messages[0]
        assert isinstance(welcome, wire.Welcome) and welcome.span_token.startswith("mst_") and len(welcome.store) == 32
        assert welcome == wire.Welcome(
            versions[0], "meshlet-cp", cp.ports["api"], welcome.store, span_token=welcome.span_token
        )
        assert isinstance(messages[-1], wire.Error) and messages[-1].reason == reason, messages[-1]
    # Those peers registered, then went without a bye: while their leases hold (10 s),
    # status lists them as not connected, with when they were last heard from.
    async with httpx.AsyncClient() as client:
        status = (await client.get(f"http://127.0.0.1:{cp.ports['api']}/v1/status")).json()
    gone = {s["node"]: s for s in status["sidecars"] if s["node"].startswith("bad-")}
    assert set(gone) == {"bad-1", "bad-2"}
    assert all(not s["connected"] and 0 <= s["last_seen_s"] < 10 for s in gone.values())
    # The real sidecars never noticed.
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
    assert response.status_code == 200
    assert await endpoints_of(user, "item") == [item.inbound]


async def test_sidecar_nacks_what_it_cannot_apply_and_keeps_the_rest(
    tmp_path: Path, origin: Origin, nursery: trio.Nursery
) -> None:
    """A fake control plane (the wire module, on a real socket) pushes one valid and
    one invalid resource to a real sidecar."""
    answers: list[wire.Message] = []
    done = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    good = [wire.endpoint("item-1", f"127.0.0.1:{origin.port}")]
    other = [wire.endpoint("other-1", f"127.0.0.1:{origin.port}")]

    async def fake_control_plane(stream: trio.abc.Stream) -> None:  # over TLS, as sidecars dial it
        conn = wire.ServerConnection("fake-cp")
        while conn.hello is None:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        await stream.send_all(conn.accept())
        _, data = conn.push("endpoints", "t1", (wire.Resource("item", wire.content_version(good), good),), full=True)
        await stream.send_all(data)
        bad = wire.Resource("broken", "badbadbadbad", [{"id": "x", "address": "nowhere"}])
        fine = wire.Resource("other", wire.content_version(other), other)
        pushed = False
        while not done.is_set():
            data = await stream.receive_some(65536)
            if not data:
                return
            for message in conn.receive_data(bytes(data)):
                if isinstance(message, wire.Ack | wire.Nack):
                    answers.append(message)
                    if not pushed:
                        pushed = True
                        _, frame = conn.push("endpoints", "t2", (bad, fine))
                        await stream.send_all(frame)
                    else:
                        done.set()

    tls = [trio.SSLListener(listener, fake_control_plane_tls(tmp_path)) for listener in listeners]
    nursery.start_soon(trio.serve_listeners, fake_control_plane, tls)
    fake = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=fake) as user:
        with trio.fail_after(10):
            await done.wait()
        first, second = answers
        assert isinstance(first, wire.Ack)
        assert isinstance(second, wire.Nack)
        assert second.names == ("broken",)
        assert "broken" in second.message and "nowhere" in second.message
        assert second.version == first.version  # still the previous type version
        async with httpx.AsyncClient() as client:
            for host in ("item", "other"):  # the valid resources are applied
                response = await client.get(f"http://{user.outbound}/hello", headers={"host": host})
                assert response.status_code == 200, host
            broken = await client.get(f"http://{user.outbound}/hello", headers={"host": "broken"})
        assert broken.headers["x-meshlet-error"] == "no-route"


async def test_a_peer_that_stops_reading_harms_no_one(tmp_path: Path, origin: Origin) -> None:
    async with run_control_plane(tmp_path) as cp:
        push = f"127.0.0.1:{cp.ports['push']}"
        stuck = await trio.open_tcp_stream("127.0.0.1", cp.ports["push"])
        hello = wire.Hello(
            (1,),
            "stuck",
            "stuck",
            {"instance_id": "stuck-1", "address": "127.0.0.1:9", "admin": "127.0.0.1:9", "ready": True},
            token=join_token(tmp_path),
        )
        await stuck.send_all(wire.encode(hello))  # then never reads, never answers
        try:
            async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=push) as user:
                async with run_sidecar(
                    tmp_path, service="item", app=f"127.0.0.1:{origin.port}", control_plane=push
                ) as item:
                    await learns(user, "item", [item.inbound], timeout=10)
        finally:
            await stuck.aclose()


async def test_sighup_reload_of_static_keeps_pushed_endpoints(tmp_path: Path, mesh: Mesh, origin: Origin) -> None:
    static = tmp_path / "static.yaml"
    static.write_text(f"services:\n  billing: [127.0.0.1:{origin.port}]\n")
    await mesh.control_plane()
    item = await mesh.sidecar("item", app=origin)
    user = await mesh.sidecar("user", static=static)

    async def both() -> bool:
        return await endpoints_of(user, "item") == [item.inbound] and bool(await endpoints_of(user, "billing"))

    await calls(user, "item")
    await eventually(both, "pushed and static endpoints together")
    static.write_text(f"services:\n  ledger: [127.0.0.1:{origin.port}]\n")
    user.process.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return (
            await endpoints_of(user, "ledger") != []
            and await endpoints_of(user, "billing") == []
            and await endpoints_of(user, "item") == [item.inbound]
        )

    await eventually(reloaded, "the reload swaps the static part and keeps what was pushed", timeout=5)


async def _post_until_answered(port: int, head: bytes, chunk: bytes, total: int) -> tuple[bytes, int]:
    """Send ``head``, then ``chunk`` (already framed) until ``total`` bytes of it went or the
    server answered and closed; returns (the answer, the body bytes sent by then)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    sent = 0
    answer = b""
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            nonlocal sent
            try:
                await stream.send_all(head)
                while sent < total:
                    await stream.send_all(chunk)
                    sent += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server answered and closed: what we meant to see
            await trio.sleep_forever()  # the answer decides when this ends

        nursery.start_soon(send)
        with trio.move_on_after(60):
            try:
                while data := await stream.receive_some(65536):  # the answer says connection: close
                    answer += data
            except trio.BrokenResourceError:
                pass  # reset after the answer: the server did not read the rest
        nursery.cancel_scope.cancel()
    return answer, sent


@pytest.mark.parametrize("path", ["/api/v2/spans", "/v1/policies"])
async def test_a_body_over_the_limit_is_refused_while_it_is_still_sent(tmp_path: Path, path: str) -> None:
    """The API counts a body as it reads it: 413 comes before the client is done sending, so a
    300 MB POST never sits in the control plane's memory. A declared length over the limit is
    refused before a byte of the body is read."""
    async with run_control_plane(tmp_path) as cp:
        port = cp.ports["api"]
        token = (tmp_path / "cp" / "api-token").read_text().strip()
        method = "POST" if path.endswith("spans") else "PUT"
        auth = f"authorization: Bearer {token}\r\n".encode()
        total = 64 * 1024 * 1024  # far over either limit (5 MiB spans, 4 MiB policies)
        piece = b"[" + b" " * (256 * 1024 - 2) + b"\n"
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        head = f"{method} {path} HTTP/1.1\r\nhost: cp\r\ntransfer-encoding: chunked\r\n".encode() + auth + b"\r\n"
        answer, sent = await _post_until_answered(port, head, chunk, total)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < total  # answered while the client was still sending

        declared = f"{method} {path} HTTP/1.1\r\nhost: cp\r\ncontent-length: 300000000\r\n".encode() + auth + b"\r\n"
        answer, sent = await _post_until_answered(port, declared, b"x" * 65536, 300_000_000)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"over 4194304 bytes" in answer or b"over 5242880 bytes" in answer
        assert sent < 300_000_000


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _frames_until_close(stream: trio.SocketStream, timeout: float) -> tuple[list[wire.Message], bool]:
    """What the control plane says on ``stream`` until it closes it (True) or ``timeout``."""
    decoder = wire.FrameDecoder()
    received: list[wire.Message] = []
    with trio.move_on_after(timeout):
        while chunk := await stream.receive_some(65536):
            received += decoder.feed(chunk)
        return received, True
    return received, False


async def test_before_hello_a_peer_can_make_the_control_plane_buffer_only_a_few_kib(tmp_path: Path) -> None:
    """Twenty connections announce 16 MiB frames and start sending them, with no hello: each is
    refused on the length alone, and the control plane's memory does not grow."""
    async with run_control_plane(tmp_path) as cp:
        port = cp.ports["push"]
        before = _rss_kib(cp.process.pid)
        streams: list[trio.SocketStream] = []
        junk = b"\x00" * (1024 * 1024)
        answers = []
        for _ in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(struct.pack(">I", wire.MAX_FRAME - 1))
            messages, closed = await _frames_until_close(stream, 1)
            if not closed:  # waiting for the frame: send 4 MiB of it, to be buffered
                with trio.move_on_after(2):
                    for _ in range(4):
                        await stream.send_all(junk)
            answers.append((messages, closed))
            streams.append(stream)
        grown = _rss_kib(cp.process.pid) - before
        for stream in streams:
            await stream.aclose()
        for messages, closed in answers:
            assert closed and [type(m) for m in messages] == [wire.Error], messages
            assert messages[0].reason == "frame-too-large"  # type: ignore[union-attr]
            assert f"max {wire.HELLO_MAX_FRAME}" in messages[0].message  # type: ignore[union-attr]
        assert grown < 16 * 1024, f"the control plane grew by {grown} KiB"  # 20 x 4 MiB if buffered


async def test_push_connections_are_capped_and_silent_ones_closed(tmp_path: Path) -> None:
    async with run_control_plane(tmp_path, extra=["--max-connections", "5"]) as cp:
        port = cp.ports["push"]
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
        await trio.sleep(0.5)  # let the control plane accept them (what it counts)
        refused = []
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            refused.append(await _frames_until_close(stream, 5))
            await stream.aclose()
        for messages, closed in refused:
            assert closed and len(messages) == 1, messages
            error = messages[0]
            assert isinstance(error, wire.Error) and error.reason == "overloaded"
            assert "5 push-channel connections are open" in error.message
        # those that never say hello are closed after the hello timeout (5 s)
        for stream in silent:
            messages, closed = await _frames_until_close(stream, 10)
            assert closed and messages == []
            await stream.aclose()
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{cp.ports['api']}/metrics")).text
        assert sample(metrics, "meshlet_cp_connections_refused_total", cap="max-connections") == 3
        assert sample(metrics, "meshlet_cp_push_connections") == 0
        # a slot is free again: a sidecar's hello is welcome
        hello = wire.Hello(
            (2,),
            "n-1",
            "item",
            {"instance_id": "i-1", "address": "127.0.0.1:9", "admin": "127.0.0.1:9"},
            token=join_token(tmp_path),
        )
        messages = await _after_welcome(port, hello, wire.Ping(1))
        assert isinstance(messages[0], wire.Welcome)
    assert cp.log().count("refusing push-channel connections") == 1


@pytest.mark.parametrize(
    "instance, reason, says",
    [
        ({"labels": [1, 2]}, "bad-message", "hello.instance.labels must be a map of strings to strings"),
        ({"labels": None}, "bad-message", "hello.instance.labels must be a map"),
        ({"labels": {"zone": 1}}, "bad-message", "hello.instance.labels must be a map"),
        ({"app_port": "80"}, "bad-message", "hello.instance.app_port must be an integer, not str"),
        ({"ready": "yes"}, "bad-message", "hello.instance.ready must be a boolean, not str"),
        ({"address": 9}, "bad-message", "hello.instance.address must be a string, not int"),
        ({"address": "nowhere"}, "bad-instance", "address 'nowhere' is not HOST:PORT"),
        ({"app_port": 70000}, "bad-instance", "app_port 70000"),
        ({"protocol": 2}, "bad-message", "hello.instance.protocol must be a string, not int"),
        ({"protocol": "quic"}, "bad-instance", "protocol 'quic' is not a protocol (one of http1, http2, grpc, tcp)"),
    ],
)
async def test_a_malformed_hello_is_one_log_line_and_a_wire_error(
    tmp_path: Path, instance: dict[str, object], reason: str, says: str
) -> None:
    async with run_control_plane(tmp_path) as cp:
        fields = {"instance_id": "x-1", "address": "127.0.0.1:9", "admin": "127.0.0.1:9", **instance}
        hello = wire.Hello((1, 2), "bad-1", "x", fields, token=join_token(tmp_path))
        answer = await _raw_session(cp.ports["push"], wire.encode(hello))
        (error,) = wire.FrameDecoder().feed(answer)  # no welcome: nothing was registered
        assert isinstance(error, wire.Error) and error.reason == reason and says in error.message, error
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"http://127.0.0.1:{cp.ports['api']}/v1/status")).json()
        assert status["sidecars"] == [] and status["registry"]["instances"] == 0
        log = cp.log()
        assert "Traceback" not in log
        (line,) = [line for line in log.splitlines() if "sidecar at 127.0.0.1" in line]
        assert says in line


async def test_connections_without_hello_share_a_bounded_buffer(tmp_path: Path) -> None:
    """Each sends most of a hello-sized frame and no hello: together they may hold 32 MiB; past
    that, a connection is refused at once."""
    async with run_control_plane(tmp_path) as cp:
        port = cp.ports["push"]
        part = struct.pack(">I", wire.HELLO_MAX_FRAME - 4) + b"\x00" * (192 * 1024)
        streams = []
        reset = 0  # refused while we were still sending: the close resets the connection
        for _ in range(180):  # 180 x 196 KiB = 35 MiB
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await stream.send_all(part)
                streams.append(stream)
            except trio.BrokenResourceError:
                reset += 1
                await stream.aclose()
        answers = []
        for stream in streams:
            try:
                answers.append(await _frames_until_close(stream, 10))  # the rest: closed at the hello timeout
            except trio.BrokenResourceError:
                reset += 1
            await stream.aclose()
        refused = [m for m, _ in answers if m]
        assert all(isinstance(m[0], wire.Error) and m[0].reason == "overloaded" for m in refused), refused
        assert all("connections without a hello hold 33554432 bytes" in m[0].message for m in refused)  # type: ignore[union-attr]
        assert all(closed for _, closed in answers)
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{cp.ports['api']}/metrics")).text
        count = sample(metrics, "meshlet_cp_connections_refused_total", cap="pre-hello-budget")
        assert count == len(refused) + reset >= 10
