"""Real etcd clusters for tests: ``etcd`` processes (Debian's etcd-server) on loopback ports.

    async with etcd_cluster(tmp_path, members=3) as cluster:
        etcd = Etcd(cluster.endpoints)
        await cluster.kill(await cluster.leader(), signal.SIGKILL)
        await cluster.start("m1")        # the same data directory and ports

Each member binds 127.0.0.1 only (ports picked free: bound to port 0, closed, passed on; a clash
with another process starts the cluster again on new ports), keeps its data in the directory
given, runs in its own process group and logs to ``<directory>/<name>.log``. Flags for tests: a
fast election (heartbeat 50 ms, election timeout 500 ms), progress notifications every second,
no automatic compaction. The cluster is up when every member reports healthy (bounded); it is
stopped by PID at the end (SIGTERM, SIGKILL after a bound). ``running_etcd_cluster`` is the same
as a plain context manager, for module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from meshlet.processes import Child, ChildFailed, log_text, stop

HEALTHY_TIMEOUT = 30.0  # a cold start of three members on a loaded 2-core machine: generous, bounded
STOP_GRACE = 5.0  # a member asked to stop, in a test
# At teardown: a leader told to stop tries to hand its leadership over first, and waits for the
# others (stopping too) for seconds; its data no longer matters.
TEARDOWN_GRACE = 1.0
START_ATTEMPTS = 3  # port clashes
FLAGS = [
    "--heartbeat-interval=50",
    "--election-timeout=500",
    "--experimental-watch-progress-notify-interval=1s",
    "--auto-compaction-retention=0",
    "--logger=zap",
    "--log-outputs=stderr",
]


@dataclass
class Member:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log: Path
    child: Child | None = None

    @property
    def pid(self) -> int:
        assert self.child is not None, f"{self.name} is not running"
        return self.child.pid

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.popen.poll() is None


@dataclass
class EtcdCluster:
    directory: Path
    size: int
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no etcd member {name!r} (members: {[m.name for m in self.members]})")

    # async: what tests call ---------------------------------------------------------------

    async def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Signal one member and wait (bounded) until it is gone."""
        await trio.to_thread.run_sync(self.kill_sync, name, signum)

    async def start(self, name: str) -> None:
        """Start a stopped member again, on its data directory and ports; returns once it is up."""
        await trio.to_thread.run_sync(self.start_sync, name)

    async def leader(self) -> str:
        """The name of the member that leads now (bounded wait for an election)."""
        return await trio.to_thread.run_sync(self.leader_sync)

    # blocking -----------------------------------------------------------------------------

    def open(self) -> None:
        etcd = _need_etcd()
        for attempt in range(START_ATTEMPTS):
            self._plan(attempt)
            for m in self.members:
                self._spawn(etcd, m)
            try:
                self.wait_healthy([m.name for m in self.members])
                return
            except ChildFailed as e:
                clash = any("address already in use" in log_text(m.log) for m in self.members)
                self.close()
                if not clash or attempt == START_ATTEMPTS - 1:
                    raise ChildFailed(e.name, f"did not start:\n{self.logs()}", e.log) from None

    def close(self) -> None:
        """SIGTERM to every member at once (one by one, the last ones wait on a lost quorum), then
        SIGKILL to any still there after a short grace period."""
        children = [m.child for m in self.members if m.child is not None]
        for child in children:
            if child.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + TEARDOWN_GRACE
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            if child.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.popen.wait(timeout=STOP_GRACE)

    def kill_sync(self, name: str, signum: int) -> None:
        m = self.member(name)
        assert m.child is not None and m.running, f"{name} is not running"
        m.child.popen.send_signal(signum)
        try:
            m.child.popen.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            stop(m.child, grace=STOP_GRACE)

    def start_sync(self, name: str) -> None:
        m = self.member(name)
        assert not m.running, f"{name} is running"
        self._spawn(_need_etcd(), m)
        self.wait_healthy([name])

    def wait_healthy(self, names: list[str], timeout: float = HEALTHY_TIMEOUT) -> None:
        """Until each named member answers /health with true (it has a leader and quorum)."""
        deadline = time.monotonic() + timeout
        for name in names:
            m = self.member(name)
            while True:
                assert m.child is not None
                m.child.check_alive()
                if _healthy(m.client_url):
                    break
                if time.monotonic() > deadline:
                    raise ChildFailed(name, f"is not healthy after {timeout:g} s", m.log)
                time.sleep(0.05)

    def leader_sync(self, timeout: float = HEALTHY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = {}
            leaders = set()
            for m in self.members:
                if not m.running:
                    continue
                status = _post(m.client_url, "/v3/maintenance/status", {})
                if status is None or "header" not in status:
                    continue
                ids[status["header"]["member_id"]] = m.name
                leaders.add(status.get("leader"))
            if len(leaders) == 1 and (leader := leaders.pop()) in ids:
                return ids[leader]
            time.sleep(0.05)
        raise AssertionError(f"no etcd leader after {timeout:g} s:\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        """The end of every member's log, for a failure's message."""
        parts = []
        for m in self.members:
            tail = "\n".join(log_text(m.log).splitlines()[-lines:]) if m.log.exists() else "(no log)"
            parts.append(f"--- {m.name} ({m.log}):\n{tail}")
        return "\n".join(parts)

    def _plan(self, attempt: int) -> None:
        ports = _free_ports(2 * self.size)
        self.members = [
            Member(
                name=f"m{i + 1}",
                client_url=f"http://127.0.0.1:{ports[2 * i]}",
                peer_url=f"http://127.0.0.1:{ports[2 * i + 1]}",
                data_dir=self.directory / f"a{attempt}-m{i + 1}.etcd",
                log=self.directory / f"m{i + 1}.log",
            )
            for i in range(self.size)
        ]

    def _spawn(self, etcd: str, m: Member) -> None:
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        argv = [
            etcd,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=meshlet-test-{self.directory.name}",
            *FLAGS,
        ]
        m.log.parent.mkdir(parents=True, exist_ok=True)
        with m.log.open("ab") as log:  # a restart appends: the log tells the whole story
            m.child = Child(m.name, _popen(argv, log), m.log)


def _popen(argv: list[str], log: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_etcd_cluster(directory: Path, members: int = 1) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(Path(directory), members)
    try:
        cluster.open()
        yield cluster
    except BaseException:
        print(cluster.logs())  # captured by pytest, shown with the failure
        raise
    finally:
        cluster.close()


@contextlib.asynccontextmanager
async def etcd_cluster(directory: Path, members: int = 1) -> AsyncIterator[EtcdCluster]:
    cluster = EtcdCluster(Path(directory), members)
    try:
        await trio.to_thread.run_sync(cluster.open)
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.close)


def _need_etcd() -> str:
    from .conftest import need  # here: conftest imports this module for its fixtures

    return need("etcd")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _healthy(url: str) -> bool:
    try:
        with _NO_PROXY.open(url + "/health", timeout=1.0) as response:
            return bool(json.loads(response.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def _post(url: str, path: str, body: object) -> dict[str, object] | None:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    try:
        with _NO_PROXY.open(request, timeout=1.0) as response:
            answer = json.loads(response.read())
            return answer if isinstance(answer, dict) else None
    except (OSError, ValueError):
        return None
