"""Real processes for end-to-end tests: a sidecar started as `python -m meshlet`, in
its own process group, on port 0 everywhere; its bound ports read from its ready line."""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshlet import processes

if TYPE_CHECKING:
    from control_plane.joins import Joins
    from meshlet.demo import Demo

SIDECAR_READY = "meshlet sidecar ready"
CONTROL_PLANE_READY = "meshlet control-plane ready"


@dataclass
class SidecarProcess:
    """A meshlet process a test started (a sidecar or a control plane): its trio.Process
    (to signal or await), the ports of its ready line, its log."""

    process: trio.Process
    ports: dict[str, int]
    stderr_path: Path

    @property
    def outbound(self) -> str:
        return f"127.0.0.1:{self.ports['outbound']}"

    @property
    def inbound(self) -> str:
        return f"127.0.0.1:{self.ports['inbound']}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.ports['admin']}"

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def write_static(path: Path, services: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"services": services}))
    return path


@asynccontextmanager
async def run_meshlet(
    tmp_path: Path, name: str, args: list[str], ready_prefix: str, *, prefix: list[str] | None = None
) -> AsyncIterator[SidecarProcess]:
    """`python -m meshlet ARGS` in its own process group (meshlet/processes.py); ports from
    its ready line; stopped (SIGTERM, then SIGKILL) on exit; a traceback in its log fails
    the test. ``prefix``: run under it (``ip netns exec NS``)."""
    log = tmp_path / f"{name}-{os.getpid()}-{id(args)}.log"
    argv = [*(prefix or []), *processes.meshlet_command(*args)]
    async with processes.open_child(name, argv, log, ready=ready_prefix) as child:
        assert child.ready is not None
        yield SidecarProcess(child.process, child.ready.ports, log)


def run_sidecar(
    tmp_path: Path,
    *,
    service: str,
    app: str,
    static: Path | None = None,
    control_plane: str | None = None,
    extra: list[str] | None = None,
    join_token: str | None = None,
) -> AbstractAsyncContextManager[SidecarProcess]:
    """A sidecar; with ``control_plane`` it joins with ``join_token`` (default: the bootstrap
    token of run_control_plane(tmp_path), ``@<tmp_path>/cp/join-token``; "" for none)."""
    args = [
        "sidecar",
        "--service",
        service,
        "--app",
        app,
        "--inbound",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]
    if static is not None:
        args += ["--static", str(static)]
    if control_plane is not None:
        args += ["--control-plane", control_plane, "--data-dir", str(tmp_path / f"data-{service}")]
        token = f"@{join_token_file(tmp_path)}" if join_token is None else join_token
        if token:
            args += ["--join-token", token]
    return run_meshlet(tmp_path, f"sidecar-{service}", [*args, *(extra or [])], SIDECAR_READY)


def fake_control_plane_tls(tmp_path: Path) -> ssl.SSLContext:
    """A TLS server context for a test's own control plane (sidecars dial the push channel with
    TLS): a certificate from a test CA, no client certificate asked; a fresh sidecar trusts it
    on first use."""
    from .certs import TestCA, write_credentials

    cert, key, _ = write_credentials(tmp_path / "fake-cp-tls", TestCA().credentials("fake-control-plane"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    return context


def join_token_file(tmp_path: Path) -> Path:
    """The bootstrap join token of run_control_plane(tmp_path)."""
    return tmp_path / "cp" / "join-token"


def join_token(tmp_path: Path) -> str:
    return join_token_file(tmp_path).read_text().strip()


def run_control_plane(
    tmp_path: Path,
    *,
    listen: str = "127.0.0.1:0",
    extra: list[str] | None = None,
) -> AbstractAsyncContextManager[SidecarProcess]:
    args = [
        "control-plane",
        "--listen",
        listen,
        "--api",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "cp"),
        *(extra or []),
    ]
    return run_meshlet(tmp_path, "control-plane", args, CONTROL_PLANE_READY)


@contextlib.contextmanager
def sidecar_process(args: list[str], log: Path) -> Iterator[dict[str, int]]:
    """``python -m meshlet sidecar ARGS`` in its own process group, for synchronous tests
    (module-scoped fixtures, threads): yields its ports once it is ready, checks that its
    log has no traceback, then SIGTERM (SIGKILL after a grace period)."""
    argv = processes.meshlet_command("sidecar", *args)
    with processes.started("sidecar", argv, log, ready=SIDECAR_READY) as child:
        assert child.ready is not None
        yield child.ready.ports


async def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return what comes back until the peer
    closes (or the timeout passes)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    with trio.move_on_after(timeout):
        await stream.send_all(data)
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            received += chunk
            if not read_until_close:
                break
    await stream.aclose()
    return bytes(received)


def sample(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (Prometheus text) whose labels include ``labels``,
    parsed as Prometheus parses them."""
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                total += found.value
    return total


async def start_demo_mesh(demo: Demo) -> tuple[str, str]:
    """The demo's mesh (meshlet/demo.py): a control plane, item-1, item-2, user-1 and
    gateway-1, each app behind its sidecar; returns (the API address, the gateway's URL)
    once a request through all three hops succeeds."""
    cp = await demo.control_plane()
    push, api = cp.fields["push"], cp.fields["api"]
    for role, instance in (("item", "item-1"), ("item", "item-2"), ("user", "user-1"), ("gateway", "gateway-1")):
        await demo.service(role, instance, push)
    entry = f"http://{demo.sidecars['gateway-1'].fields['inbound']}"
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):  # until every sidecar knows the services its app calls
            while True:
                try:
                    if (await client.get(f"{entry}/api/users/1")).status_code == 200:
                        break
                except httpx.ConnectError:
                    pass  # the gateway's sidecar refuses until its first configuration
                await trio.sleep(0.2)
    return api, entry


async def apply_policy(tmp_path: Path, api: str, text: str) -> None:
    """``meshlet apply`` of ``text`` to the control plane of run_control_plane(tmp_path);
    returns once every affected sidecar has ACKed."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    token = str(tmp_path / "cp" / "api-token")
    command = [sys.executable, "-m", "meshlet", "apply", "--token-file", token, "-f", str(policy), "--api", api]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()


def in_process_joins() -> tuple[Joins, str]:
    """For a PushServer run inside a test: who may join (a fresh CA, one unscoped token) and
    that token, for the raw hellos the test sends (``token=``)."""
    import random
    import time

    from control_plane import ca, tokens
    from control_plane.joins import Joins

    text, record = tokens.mint(None, None, time.time())
    authority = ca.Authority(ca.create_root("meshlet.local", time.time(), random.Random(7)))
    return Joins(authority, lambda: {record.id: record}, token_path="join-token"), text
