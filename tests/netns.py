"""Hosts for the transparent-mode tests: network namespaces joined by a veth pair
(iproute2 and iptables, as root). Each namespace is a fresh network stack,
so the sidecars there listen on their default ports (15001, 15006, 15090) as they would
in a pod, with no collision with anything on the machine; the namespaces are deleted
when the test ends, with every rule installed in them."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshlet import processes

from .conftest import need

SUBNET = "10.77.0"  # on the veth link between the two namespaces only
NOBODY = 65534  # the app runs as nobody: not the sidecar's (exempt) uid
_names = itertools.count()


def need_netns() -> None:
    """Skip (a failure under MESHLET_REQUIRE_ALL=1) without root, iproute2 or iptables."""
    for binary in ("ip", "iptables", "iptables-restore", "iptables-save", "setpriv", "curl"):
        need(binary)
    if os.geteuid() != 0:
        message = "network namespaces and iptables need root"
        if os.environ.get("MESHLET_REQUIRE_ALL") == "1":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Reply:
    exit_code: int  # curl's: 0 ok, 7 refused, 28 timed out, 52/56 empty reply / reset
    status: int
    headers: dict[str, str]
    body: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Host:
    netns: str
    ip: str

    def exec(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    async def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = await trio.run_process(self.exec(*argv), capture_stdout=True, capture_stderr=True, check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} in {self.netns}: exit {result.returncode}\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
            )
        return result

    async def meshlet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return await self.run(sys.executable, "-m", "meshlet", *args, check=check)

    async def curl(self, url: str, *, uid: int = NOBODY, max_time: float = 10) -> Reply:
        """What an unmodified app does: curl with no proxy settings, as ``uid``."""
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
        argv += ["curl", "-sS", "-i", "--noproxy", "*", "--max-time", str(max_time), url]
        result = await trio.run_process(
            self.exec(*argv),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},  # no *_proxy variables
        )
        text = result.stdout.decode(errors="replace")
        head, _, body = text.partition("\r\n\r\n")
        status, headers = 0, {}
        if head.startswith("HTTP/"):
            status = int(head.split()[1])
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return Reply(result.returncode, status, headers, body, result.stderr.decode(errors="replace"))

    async def metrics(self, admin_port: int = 15090) -> str:
        reply = await self.curl(f"http://127.0.0.1:{admin_port}/metrics", uid=0)
        assert reply.status == 200, reply
        return reply.body


async def _ip(*argv: str) -> None:
    await trio.run_process(["ip", *argv], capture_stdout=True, capture_stderr=True)


@asynccontextmanager
async def two_hosts() -> AsyncIterator[tuple[Host, Host]]:
    """Namespaces a (10.77.0.1) and b (10.77.0.2), linked; deleted afterwards."""
    tag = f"meshlet-{os.getpid()}-{next(_names)}"
    a, b = Host(f"{tag}-a", f"{SUBNET}.1"), Host(f"{tag}-b", f"{SUBNET}.2")
    created = []
    try:
        for host in (a, b):
            await _ip("netns", "add", host.netns)
            created.append(host.netns)
        await _ip("-n", a.netns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", b.netns)
        for host in (a, b):
            await _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "veth0")
            await _ip("-n", host.netns, "link", "set", "veth0", "up")
            await _ip("-n", host.netns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for name in created:
            await trio.run_process(["ip", "netns", "del", name], check=False)


@asynccontextmanager
async def run_app(host: Host, name: str, *ports: int, log_dir: Path) -> AsyncIterator[trio.Process]:
    """tests/netns_app.py in ``host``'s namespace, in its own process group."""
    argv = host.exec(sys.executable, "-m", "tests.netns_app", name, *map(str, ports))
    log = log_dir / f"app-{name}-{host.netns}.log"
    async with processes.open_child(f"app {name}", argv, log, ready="ready", check_traceback=False) as child:
        yield child.process
