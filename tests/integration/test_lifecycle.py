"""Stopping gracefully (docs/architecture.md): on SIGTERM a sidecar stops being ready, refuses new
inbound connections, lets the requests in flight finish (each response closes its
connection), keeps serving its app's calls out, and exits 0; past --drain-timeout the
stragglers are cut."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
import trio

from meshlet import processes

from ..helpers import run_sidecar, write_static
from ..origin import Origin


async def test_requests_in_flight_finish_and_new_connections_are_refused(tmp_path: Path, origin: Origin) -> None:
    """Callers are refused new connections; the app's own calls out are still served (a
    request in flight here may need them to finish), until the sidecar exits."""
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [f"127.0.0.1:{origin.port}"], "timeout": "10s"}})
    async with run_sidecar(tmp_path, service="item", app=f"127.0.0.1:{origin.port}", static=static) as sidecar:
        results: list[httpx.Response] = []
        ready_while_draining: list[int] = []
        outbound_while_draining: list[int] = []
        refused = False
        async with httpx.AsyncClient(timeout=15) as client:

            async def slow() -> None:
                results.append(await client.get(f"http://{sidecar.inbound}/delay/1.5"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow)
                with trio.fail_after(5):  # the slow request reached the origin
                    while origin.stats.requests < 1:  # noqa: ASYNC110 - another task's progress
                        await trio.sleep(0.02)
                sidecar.process.send_signal(signal.SIGTERM)
                with trio.fail_after(5):
                    while not refused:
                        async with httpx.AsyncClient(timeout=2) as fresh:
                            try:
                                await fresh.get(f"http://{sidecar.inbound}/hello")
                            except httpx.ConnectError:
                                refused = True
                            out = await fresh.get(f"http://{sidecar.outbound}/hello", headers={"host": "item"})
                            outbound_while_draining.append(out.status_code)
                        ready_while_draining.append((await client.get(f"http://{sidecar.admin}/ready")).status_code)
                        await trio.sleep(0.05)
            with trio.fail_after(10):
                await sidecar.process.wait()
    (response,) = results
    assert response.status_code == 200 and response.text == "late"  # in flight during SIGTERM: finished
    assert response.headers["connection"] == "close"
    assert refused  # new connections are refused while the old ones drain
    assert outbound_while_draining and set(outbound_while_draining) == {200}  # the app can still call out
    assert 503 in ready_while_draining  # not ready any more
    assert sidecar.process.returncode == 0


async def test_past_the_drain_timeout_stragglers_are_cut(tmp_path: Path, origin: Origin) -> None:
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [f"127.0.0.1:{origin.port}"], "timeout": "30s"}})
    extra = ["--drain-timeout", "0.5"]
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static, extra=extra) as sidecar:
        failures: list[Exception] = []
        async with httpx.AsyncClient(timeout=15) as client:

            async def stuck() -> None:
                try:
                    await client.get(f"http://{sidecar.outbound}/delay/20", headers={"host": "item"})
                except httpx.HTTPError as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stuck)
                with trio.fail_after(5):
                    while origin.stats.requests < 1:  # noqa: ASYNC110 - another task's progress
                        await trio.sleep(0.02)
                sidecar.process.send_signal(signal.SIGTERM)
                with trio.fail_after(8):  # 0.5 s of grace, not the 20 s the request wanted
                    await sidecar.process.wait()
    assert len(failures) == 1  # cut, as the drain timeout says
    assert sidecar.process.returncode == 0
    assert "still in flight after 0.5s: cut" in sidecar.log()


@pytest.mark.parametrize(
    "command",
    [
        ["sidecar", "--outbound", "{busy}", "--static", "{static}"],
        ["sidecar", "--inbound", "{busy}", "--static", "{static}"],
        ["sidecar", "--outbound", "{busy}", "--static", "{static}", "--workers", "2"],
        ["control-plane", "--listen", "{busy}", "--data-dir", "{tmp}/cp"],
        ["control-plane", "--api", "{busy}", "--data-dir", "{tmp}/cp"],
    ],
    ids=["sidecar outbound", "sidecar inbound", "sidecar --workers", "control-plane listen", "control-plane api"],
)
async def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path, command: list[str]) -> None:
    """A listener that cannot bind says so in one line (and exits 1), not a traceback
    from inside the nursery that started it."""
    static = write_static(tmp_path / "s.yaml", {})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        values = {"busy": taken, "static": str(static), "tmp": str(tmp_path)}
        args = [part.format(**values) for part in command]
        if args[0] == "sidecar":
            args += ["--service", "x", "--app", "127.0.0.1:9", "--admin", "127.0.0.1:0"]
            listeners = ("--inbound", "--outbound")
        else:
            listeners = ("--listen", "--api")
        for flag in listeners:
            if flag not in args:  # the others on port 0
                args += [flag, "127.0.0.1:0"]
        with trio.fail_after(30):
            done = await trio.run_process(
                processes.meshlet_command(*args), capture_stdout=True, capture_stderr=True, check=False
            )
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "Traceback" not in stderr and "meshlet: cannot listen: [Errno 98] Address already in use" in stderr, stderr


async def test_workers_run_the_supervisors_code_whatever_the_working_directory(tmp_path: Path, origin: Origin) -> None:
    """`meshlet sidecar --workers 2` started from a directory that holds some other
    `meshlet/` package: the workers run the supervisor's meshlet, not that one (a worker
    started as `python -m meshlet` looked in the working directory first)."""
    foreign = tmp_path / "meshlet"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise SystemExit('the foreign meshlet package was imported')\n")
    (foreign / "__main__.py").write_text("")
    static = write_static(tmp_path / "s.yaml", {"item": {"endpoints": [f"127.0.0.1:{origin.port}"]}})
    console_script = Path(sys.executable).parent / "meshlet"
    argv = [str(console_script), "sidecar", "--service", "user", "--app", "127.0.0.1:9", "--static", str(static)]
    argv += ["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", "2"]

    def run() -> tuple[list[int], list[object]]:  # blocking, in a thread: the origin serves on this loop
        with processes.started(
            "workers", argv, tmp_path / "workers.log", ready="meshlet sidecar ready", cwd=tmp_path
        ) as child:
            assert child.ready is not None
            outbound, admin = child.ready.ports["outbound"], child.ready.ports["admin"]
            statuses = [
                httpx.get(f"http://127.0.0.1:{outbound}/hello", headers={"host": "item"}, timeout=10).status_code
                for _ in range(4)  # fresh connections: both workers answer
            ]
            return statuses, httpx.get(f"http://127.0.0.1:{admin}/workers", timeout=10).json()

    with trio.fail_after(60):
        statuses, workers = await trio.to_thread.run_sync(run)
    assert statuses == [200] * 4 and len(workers) == 2
    assert "foreign" not in (tmp_path / "workers.log").read_text()
