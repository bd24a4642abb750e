"""`meshlet wait-ready` (a container entrypoint's `meshlet wait-ready && exec my-app`)
against a real sidecar: 0 once its admin /ready says 200; 1 after --timeout with the
sidecar's last reason, or saying that nothing answered; it may start before the sidecar."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import trio

from ..helpers import run_sidecar, write_static
from ..origin import Origin


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    return {**environ, **extra}


async def wait_ready(*args: str, **environ: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "meshlet", "wait-ready", *args]
    return await trio.run_process(
        command, capture_stdout=True, capture_stderr=True, check=False, env=_environment(**environ)
    )


async def test_a_ready_sidecar_returns_at_once(tmp_path: Path, origin: Origin) -> None:
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [f"127.0.0.1:{origin.port}"]}})
    async with run_sidecar(tmp_path, service="user", app=f"127.0.0.1:{origin.port}", static=static) as sidecar:
        # Options from the environment, as in a container; HTTP_PROXY (an app's, pointing at its
        # sidecar's outbound listener; here at nothing) must not be used for the admin listener.
        with trio.fail_after(10):
            result = await wait_ready(MESHLET_ADMIN=sidecar.admin, MESHLET_TIMEOUT="5", HTTP_PROXY="http://127.0.0.1:1")
    assert result.returncode == 0, result.stderr.decode()
    assert f"sidecar at {sidecar.admin} is ready" in result.stdout.decode()


async def test_a_sidecar_without_configuration_times_out_with_its_reason(tmp_path: Path) -> None:
    # Its control plane never answers: readiness stays false (fail-closed at boot).
    closed = f"127.0.0.1:{_free_port()}"
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=closed) as sidecar:
        with trio.fail_after(10):
            result = await wait_ready("--admin", sidecar.admin, "--timeout", "1", "--interval", "0.1")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert result.stdout == b""
    assert f"the sidecar at {sidecar.admin} is not ready after 1 s: not ready: no configuration applied yet" in stderr
    assert "control plane" in stderr  # what to check


async def test_nothing_listening_says_so(tmp_path: Path) -> None:
    admin = f"127.0.0.1:{_free_port()}"
    with trio.fail_after(10):
        result = await wait_ready("--admin", admin, "--timeout", "0.5")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert f"the sidecar at {admin} is not ready after 0.5 s: its admin listener could not be reached" in stderr
    assert "is the sidecar running" in stderr


async def test_started_before_the_sidecar_it_waits_for_it(tmp_path: Path, origin: Origin) -> None:
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [f"127.0.0.1:{origin.port}"]}})
    admin = f"127.0.0.1:{_free_port()}"
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def waiter() -> None:
        results.append(await wait_ready("--admin", admin, "--timeout", "20", "--interval", "0.1"))

    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.5)  # it polls a listener that is not there yet
            assert not results
            extra = ["--admin", admin]  # the last --admin wins over run_sidecar's port 0
            async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static, extra=extra):
                with trio.fail_after(15):
                    while not results:  # noqa: ASYNC110 - the subprocess's end
                        await trio.sleep(0.05)
    (result,) = results
    assert result.returncode == 0, result.stderr.decode()
    assert "could not be reached" in result.stderr.decode()  # it did wait for the listener
    assert f"sidecar at {admin} is ready" in result.stdout.decode()


async def test_bad_usage_exits_2() -> None:
    for args, environ in ((["--timeout", "0"], {}), (["--admin", "nowhere"], {}), ([], {"MESHLET_INTERVAL": "x"})):
        result = await wait_ready(*args, **environ)
        assert result.returncode == 2, (args, environ, result.stderr.decode())
