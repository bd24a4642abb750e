"""Control-plane scale benchmark: N simulated sidecars on real push channels.

For each N (default 1,000 then 5,000) a fresh control plane (``python -m meshlet
control-plane``) and a few load processes that open N push-channel TCP connections to
it. Each simulated sidecar speaks ``meshlet/wire.py`` as a real one does:
``hello`` (ready, no ``have``), every push applied (deltas with
``wire.apply_endpoint_delta``) and ACKed, pings answered and sent every 5 s. Sidecar
``i`` belongs to service ``svc-(i % 50)`` and its app calls three services, which it
watches from its ``hello`` on (protocol v2): ``svc-7`` (every sidecar calls it, so a
change of ``svc-7`` reaches all N: the worst case) and ``svc-(i+1)``, ``svc-(i+2)``.
Measured per N:

1. Getting them connected. Cold start: all N connect to an empty control plane; the time
   until it counts N connected sidecars and every sidecar has ACKed its first (full)
   pushes, then until every sidecar holds every endpoint of the services it watches
   ("synced"). A cold start not
   done within ``--cold-limit`` is recorded as far as it got, and a warm start on a fresh
   control plane gets the mesh up instead: every instance registers once and drops its
   channel (the lease keeps it), then all N reconnect naming their cached configuration
   in ``hello.have``, as after a network blip.
2. Convergence, on the mesh that got synced: ~20 changes of ``svc-7``'s endpoints
   (sidecar 7 turns not-ready / ready, a new ``svc-7`` instance registers / says bye),
   one at a time. The load stamps the change, and each of the N sidecars stamps the
   moment it sent the ACK of the push after which its copy of ``svc-7`` shows the change.
   Reported: p50/p99 over changes of "all N ACKed", p50/p99 over every (change, sidecar),
   and the control plane's own ``meshlet_cp_convergence_seconds`` histogram.
3. The control plane's VmRSS at N connected (after the changes) and VmHWM (its peak).

Replicas (``--replicas K``, K > 1, on etcd; ``--store etcd`` with K = 1 is one replica on
etcd): for each start a fresh ``etcd`` (one member, loopback, temporary data directory)
and K control planes ``--store etcd://...``; sidecar ``i`` connects to replica ``i % K``.
The changes are made on both sides (sidecar 7 is on replica ``7 % K``, the extra ``svc-7``
instances on replica 0), so with K = 2 every change reaches half the sidecars through
etcd's watch. Also measured: per-replica sessions, CPU and memory, etcd's CPU and memory,
and etcd's put→watch latency through its HTTP gateway (idle, and with N connected).

Pinning (2+ cores): the control plane (the replicas and etcd) on core 1, the load
processes and this script on core 0 (``--no-pin`` to let the kernel place them). Every
process runs in its own session, gets SIGTERM if this script dies (PR_SET_PDEATHSIG), and
is stopped by process group when its N is done, on errors and on Ctrl-C / SIGTERM; every
phase has a time limit. Results: rich tables, and the "## Control plane scale" section of
benchmarks/RESULTS.md ("## Control plane scale: replicas on etcd" with K > 1; the rest of
that file is left as it is).

Usage: python benchmarks/cp_scale.py [--sidecars 1000,5000] [--quick] [--replicas K] [--out PATH]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgpack
import trio
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from control_plane.channel import Channel
from meshlet import processes, wire
from meshlet.io import Closed, connect
from meshlet.processes import Child

SELF = Path(__file__).resolve()
REPO = SELF.parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"
LOGS = REPO / "benchmarks" / "out" / "cp-scale-logs"  # the last run's logs; git-ignored
SECTION = "## Control plane scale"
REPLICAS_SECTION = "## Control plane scale: replicas on etcd"  # --replicas K > 1: a section of its own

SERVICES = 50
CHANGED_SERVICE = 7  # svc-7 is the service whose endpoints change
FLIPPER = 7  # sidecar 7 (of svc-7) turns not-ready and ready again
CHANGE_KINDS = ("unready", "ready", "join", "bye")
CP_CORE, LOAD_CORE = 1, 0  # etcd, when there is one, shares the control plane's core
PING_INTERVAL = 5.0
SIDECARS_PER_WORKER = 2500  # measured: see README, "How many load processes"

MAX_CONNECTIONS_SPARE = 100  # push connections above N: the change phase's extra instances
CP_TTL = 600  # s; leases of pre-registered instances (warm start) must outlive the reconnections
PREREGISTER_CONCURRENCY = 20  # per load process: few sessions open while instances register

# Timeouts, seconds: every phase is bounded.
START_TIMEOUT = 20.0
COLD_LIMIT = 60.0  # a cold start, until all N are synced (--cold-limit)
WARM_LIMIT = 90.0  # a warm start, the same
CHANGE_TIMEOUT = 10.0  # one change, until every sidecar acked it
CHANGES_BUDGET = 60.0  # no new change starts after this long in the change phase
STOP_TIMEOUT = 5.0  # SIGTERM → SIGKILL
PROBE_TIMEOUT = 30.0  # etcd's put→watch probe, all of its puts

# etcd for the replicas: one member, production-like timing, compaction as a deployment would run it.
ETCD_FLAGS = [
    "--heartbeat-interval=100",
    "--election-timeout=1000",
    f"--quota-backend-bytes={8 * 2**30}",
    "--auto-compaction-mode=periodic",
    "--auto-compaction-retention=1h",
    "--logger=zap",
    "--log-outputs=stderr",
]
PROBE_PUTS = 300  # sequential puts of etcd's put→watch probe
PROBE_PREFIX = b"/cp-scale-probe/"  # outside the control plane's keys

# Targets (the acceptance numbers).
# (from K replicas on, up to N sidecars, all acked within s, p99): the tightest row that applies.
CONVERGENCE_TARGETS = ((1, 1000, 1.0), (1, 5000, 3.0), (2, 10000, 1.5))
RSS_TARGET_MB = 300.0  # per replica
RSS_TARGET_AT = 5000  # one control plane; replicas are held to it at every N
COLD_TARGET_S = 30.0  # replicas: a cold start of N (up to 10,000) all synced, no session lost

Held = dict[str, tuple[str, list[dict[str, Any]]]]  # what a sidecar holds: service → (version, endpoints)

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine (trio's clock is
    per process, offset at random, so stamps from two processes would not compare)."""
    return time.monotonic()


def service_of(index: int) -> str:
    return f"svc-{index % SERVICES}"


def watched_by(index: int) -> tuple[str, ...]:
    """The services sidecar ``index``'s app calls (extras, index -1: only svc-7)."""
    if index < 0:
        return (service_of(CHANGED_SERVICE),)
    return tuple(sorted({service_of(CHANGED_SERVICE), service_of(index + 1), service_of(index + 2)}))


def instances_of(service: str, total: int) -> int:
    """How many of ``total`` sidecars belong to ``service``."""
    k = int(service.rpartition("-")[2])
    return len(range(k, total, SERVICES))


def raise_fd_limit(wanted: int) -> int:
    """Soft RLIMIT_NOFILE up to ``wanted`` (at most the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ======================================================================================
# The load side: simulated sidecars (runs in the load processes: `cp_scale.py _worker`)
# ======================================================================================


class SharedLists:
    """Endpoint lists shared by the simulated sidecars of one process, by content.

    Every sidecar applies every push to its own map (service → (version, list)), but
    equal content is stored once: 5,000 sidecars each holding 5,000 endpoint dicts would
    need ~10 GB. A delta is applied with ``wire.apply_endpoint_delta`` (which checks the
    result's hash) the first time a (base version, exact delta) is seen; a sidecar that
    gets the same delta against the same base gets the same, already checked, list. The
    hash is computed as the control plane computes it, from each endpoint's canonical
    bytes, kept (``wire.list_version``): during a cold start sidecars hold many different
    versions, so many deltas differ, and encoding every endpoint of every result again
    was half of a load process's CPU at 10,000 sidecars."""

    LIMIT = 20_000
    ENCODED_LIMIT = 200_000

    def __init__(self) -> None:
        self._bodies: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._deltas: dict[bytes, list[dict[str, Any]]] = {}
        self._encoded: dict[int, tuple[dict[str, Any], bytes]] = {}  # id(endpoint) → (it, its canonical bytes)

    def body(self, resource: wire.Resource) -> list[dict[str, Any]]:
        if not isinstance(resource.body, list):
            raise wire.WireError("bad-body", f"{resource.name}: an endpoints body must be a list")
        key = (resource.name, resource.version)
        found = self._bodies.get(key)
        if found is None:
            found = self._remember(self._bodies, key, resource.body)
        return found

    def delta(self, current: list[dict[str, Any]], resource: wire.Resource) -> list[dict[str, Any]]:
        key = msgpack.packb([resource.name, resource.base, resource.version, list(resource.add), list(resource.remove)])
        found = self._deltas.get(key)
        if found is None:
            found = self._remember(self._deltas, key, self._applied(current, resource))
        return found

    def _applied(self, current: list[dict[str, Any]], resource: wire.Resource) -> list[dict[str, Any]]:
        """``wire.apply_endpoint_delta``; when the result does not hash to the version (or
        the delta is malformed), that function's own error says why."""
        result = merged(current, resource)
        if result is not None and self._version(result) == resource.version:
            return result
        return wire.apply_endpoint_delta(current, resource)

    def _version(self, endpoints: list[dict[str, Any]]) -> str:
        items = []
        for endpoint in endpoints:
            kept = self._encoded.get(id(endpoint))
            if kept is None or kept[0] is not endpoint:
                if len(self._encoded) >= self.ENCODED_LIMIT:
                    self._encoded.clear()
                kept = self._encoded[id(endpoint)] = (endpoint, wire.canonical_bytes(endpoint))
            items.append(kept[1])
        return wire.list_version(items)

    def _remember(self, table: dict[Any, Any], key: Any, value: Any) -> Any:
        if len(table) >= self.LIMIT:
            table.clear()
        table[key] = value
        return value


def merged(current: list[dict[str, Any]], resource: wire.Resource) -> list[dict[str, Any]] | None:
    """What ``wire.apply_endpoint_delta`` makes of ``current``, without its hash check;
    None if the delta is malformed (that function then says how)."""
    try:
        removed = set(resource.remove)
        by_id = {e["id"]: e for e in current if e["id"] not in removed}
        by_id.update((item["id"], item) for item in resource.add)
        return [by_id[k] for k in sorted(by_id)]
    except (KeyError, TypeError):
        return None


class SharedFrames:
    """Big frames decoded once per process. Many sidecars get byte-identical pushes
    (a first full push carries nonce 1 on every channel), and decoding 5,000 endpoints
    costs ~7 ms: 5,000 sidecars reconnecting would keep the load's core busy for 35 s.
    Equal bytes decode to equal messages, so sharing the (read-only) result changes
    nothing but the cost; every sidecar still applies and checks each push itself."""

    SMALL = 4096  # smaller frames are decoded every time: cheaper than a lookup
    LIMIT = 32

    def __init__(self) -> None:
        self._messages: dict[bytes, list[wire.Message]] = {}

    def decoded(self, frame: bytes, decode: Callable[[bytes], list[wire.Message]]) -> list[wire.Message]:
        if len(frame) < self.SMALL:
            return decode(frame)
        found = self._messages.get(frame)
        if found is None:
            if len(self._messages) >= self.LIMIT:
                self._messages.clear()
            found = self._messages[frame] = decode(frame)
        return found


class SharingDecoder(wire.FrameDecoder):
    """``wire.FrameDecoder`` for the downstream kinds, with whole frames looked up in
    :class:`SharedFrames` first. Frames are cut here; each one is decoded by
    ``FrameDecoder.feed`` (which also raises on a frame over ``wire.MAX_FRAME``)."""

    def __init__(self, shared: SharedFrames) -> None:
        super().__init__(wire.DOWNSTREAM_KINDS)
        self._shared = shared
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[wire.Message]:
        self._pending += data
        messages: list[wire.Message] = []
        while len(self._pending) >= 4:
            size = int.from_bytes(self._pending[:4], "big")
            if size > wire.MAX_FRAME:
                return messages + super().feed(bytes(self._pending[:4]))  # raises frame-too-large
            if len(self._pending) < 4 + size:
                break
            frame = bytes(self._pending[: 4 + size])
            del self._pending[: 4 + size]
            messages += self._shared.decoded(frame, super().feed)
        return messages


@dataclass
class Expectation:
    """One change every counted sidecar must see: ``instance`` present (or absent) in
    ``service`` after a push it ACKed."""

    change: int
    service: str
    instance: str
    present: bool
    waiting: set[int]
    acked_at: list[float] = field(default_factory=list)
    already: int = 0  # held the expected state before the change (a previous change lost)
    lost: int = 0

    def seen_by(self, held: Held) -> bool:
        entry = held.get(self.service)
        present = entry is not None and any(e["id"] == self.instance for e in entry[1])
        return present == self.present


class SimSidecar:
    """One simulated sidecar: one push channel, the endpoints it holds, its stamps."""

    def __init__(self, load: LoadWorker, index: int, node: str, service: str, port: int) -> None:
        self.load = load
        self.index = index  # -1 for the extra instances the change phase starts
        self.instance_id = node
        self.service = service
        self.port = port  # its (fictional) inbound listener: what the others are pushed
        self.watched = watched_by(index)
        self.expected_endpoints = sum(instances_of(s, load.total) for s in self.watched)
        self.conn = self._connection()
        # Raw non-blocking socket, writes that never wait (the control plane's Channel):
        # the load simulates thousands of sidecars on one core, and trio.SocketStream's
        # per-send scheduling and a lock per sidecar were most of its time.
        self.channel: Channel | None = None
        self.next_ping = 0.0
        self.held: Held = {}
        self.version = ""  # the endpoints type version last ACKed
        self.acked_types: set[str] = set()
        self.first_acked = False
        self.synced = False
        self.leaving = False  # said bye: the channel closing is expected
        self.has_slot = False

    @property
    def counted(self) -> bool:
        return self.index >= 0

    def _connection(self, have: dict[str, str] | None = None) -> wire.ClientConnection:
        """The client end for a ``hello`` as ready, with what the sidecar holds (``have``)."""
        instance = {
            "instance_id": self.instance_id,
            "address": f"127.0.0.1:{self.port}",
            "admin": f"127.0.0.1:{self.port + 10000}",
            "labels": {},
            "ready": True,
        }
        hello = wire.Hello(
            wire.PROTOCOL_VERSIONS,
            self.instance_id,
            self.service,
            instance,
            {wire.ENDPOINTS: have or {}},
            {wire.ENDPOINTS: self.watched},
            token=self.load.join_token,
        )
        conn = wire.ClientConnection(hello)
        conn._decoder = SharingDecoder(self.load.frames)  # the one change to wire's client: see SharedFrames
        return conn

    async def run(self, port: int, cache: Held | None = None) -> None:
        """Connect, say hello, then read and answer until the channel ends. With a
        ``cache`` (a persisted last good configuration), start from it and name its
        versions in ``hello.have``, as a real sidecar does when it reconnects."""
        await self.load.slots.acquire()
        self.has_slot = True
        self.held = dict(cache or {})
        self.conn = self._connection({name: version for name, (version, _) in self.held.items()})
        reason = "closed by the control plane"
        try:
            async with trio.open_nursery() as nursery:  # flushers, if the socket fills up
                self.channel = Channel(await connect("127.0.0.1", port), nursery.start_soon, now)
                self.send(self.conn.hello())
                self.next_ping = now() + random.uniform(0, PING_INTERVAL)  # spread the pings out
                self.load.live.add(self)
                await self._read()
                nursery.cancel_scope.cancel()
        except* (OSError, Closed, wire.WireError) as group:
            exc = group.exceptions[0]
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self.load.live.discard(self)
            self.release_slot()
            if self.channel is not None:
                self.channel.close()
        if not self.leaving:
            self.load.lost(self, reason)

    async def register_and_leave(self, port: int) -> None:
        """Register (``hello``, ready) and close the channel once ``welcome`` arrives
        (the control plane registers before it welcomes), without ``bye``: the instance
        stays registered until its lease runs out, as after a network blip, and this
        sidecar's later ``run`` registers nothing new."""
        conn = self._connection()
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await stream.send_all(conn.hello())
                while conn.protocol_version is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise trio.BrokenResourceError("the control plane closed the channel")
                    for message in conn.receive_data(data):
                        if isinstance(message, wire.Error):
                            raise wire.WireError(message.reason, message.message)
            finally:
                stream.socket.close()

    def release_slot(self) -> None:
        if self.has_slot:
            self.has_slot = False
            self.load.slots.release()

    def send(self, data: bytes) -> None:
        assert self.channel is not None
        self.channel.write(data)

    async def _read(self) -> None:
        assert self.channel is not None
        while True:
            data = await self.channel.recv()
            if not data:
                return
            for message in self.conn.receive_data(data):
                if isinstance(message, wire.Push):
                    await self._answer(message)
                elif isinstance(message, wire.Ping):
                    self.send(wire.encode(wire.Pong(message.id)))
                elif isinstance(message, wire.Error):
                    raise wire.WireError(message.reason, f"control plane said: {message.message}")

    async def _answer(self, push: wire.Push) -> None:
        try:
            held = self._applied(push) if push.type == wire.ENDPOINTS else self.held
        except wire.WireError as exc:
            self.load.problem("nack", f"{self.instance_id}: {exc}")
            self.send(self.conn.nack(push, self.version, str(exc), tuple(r.name for r in push.resources)))
            return
        self.held = held
        self.send(self.conn.ack(push))
        acked_at = now()
        if push.type == wire.ENDPOINTS:
            self.version = push.version
        self.acked_types.add(push.type)
        self.load.after_ack(self, acked_at)

    def _applied(self, push: wire.Push) -> Held:
        """What this sidecar holds after ``push``. As the real sidecar
        (``DiscoveredState.apply`` in sidecar/core/discovered.py), a full push is applied
        like any other: listed resources replace, ``rm`` removes."""
        held = dict(self.held)
        for res in push.resources:
            if res.is_delta:
                current = self.held.get(res.name)
                if current is None or current[0] != res.base:
                    raise wire.WireError("delta-base", f"{res.name}: a delta against {res.base}, not what I hold")
                held[res.name] = (res.version, self.load.lists.delta(current[1], res))
            elif res.missing:  # a watched service with no instance (yet)
                held.pop(res.name, None)
            else:
                held[res.name] = (res.version, self.load.lists.body(res))
        for name in push.removed:
            held.pop(name, None)
        return held

    def endpoint_count(self) -> int:
        return sum(len(body) for _, body in self.held.values())


class LoadWorker:
    """The sidecars of one load process, driven by commands on stdin (JSON lines);
    reports events on stdout (JSON lines)."""

    def __init__(self, args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
        self.ports = [int(port) for port in args.ports.split(",")]  # one push port per replica
        self.total = args.total
        self.join_token = args.join_token_file.read_text().strip()  # every sidecar joins with it
        self.emit = emit
        self.lists = SharedLists()
        self.frames = SharedFrames()
        self.slots = trio.Semaphore(args.concurrency)
        self.sidecars = {
            i: SimSidecar(self, i, f"sim-{i:05d}", service_of(i), 20000 + i)
            for i in range(args.first, args.total, args.step)
        }
        self.extras: dict[str, SimSidecar] = {}
        self.first_acked: set[int] = set()  # sidecars that ACKed their first push of every type
        self.synced: set[int] = set()  # sidecars that hold every endpoint of what they watch
        self.dead: set[int] = set()  # sessions that ended
        self.last_first_ack = 0.0
        self.last_synced = 0.0
        self.reported: set[str] = set()
        self.group_synced: dict[tuple[str, ...], trio.Event] = {}
        for sidecar in self.sidecars.values():
            self.group_synced.setdefault(sidecar.watched, trio.Event())
        self.expectation: Expectation | None = None
        self.problems = 0
        self.live: set[SimSidecar] = set()  # sidecars with an open channel

    # bookkeeping, called by the sidecars ------------------------------------------------
    def after_ack(self, sidecar: SimSidecar, acked_at: float) -> None:
        if not sidecar.counted:
            return
        if not sidecar.first_acked and sidecar.acked_types >= set(wire.RESOURCE_TYPES):
            sidecar.first_acked = True
            sidecar.release_slot()
            self.first_acked.add(sidecar.index)
            self.last_first_ack = acked_at
            self._report_progress()
        if not sidecar.synced and sidecar.endpoint_count() == sidecar.expected_endpoints:
            sidecar.synced = True
            self.group_synced[sidecar.watched].set()
            self.synced.add(sidecar.index)
            self.last_synced = acked_at
            self._report_progress()
        exp = self.expectation
        if exp is not None and sidecar.index in exp.waiting and exp.seen_by(sidecar.held):
            exp.waiting.discard(sidecar.index)
            exp.acked_at.append(acked_at)
            self._maybe_done(exp)

    def lost(self, sidecar: SimSidecar, reason: str) -> None:
        self.problem("session-lost", f"{sidecar.instance_id}: {reason}")
        if not sidecar.counted:
            return
        self.dead.add(sidecar.index)
        self._report_progress()
        exp = self.expectation
        if exp is not None and sidecar.index in exp.waiting:
            exp.waiting.discard(sidecar.index)
            exp.lost += 1
            self._maybe_done(exp)

    def problem(self, kind: str, detail: str) -> None:
        self.problems += 1
        if self.problems <= 20:
            self.emit({"ev": "problem", "kind": kind, "detail": detail})
        elif self.problems in (100, 1000, 10_000):
            self.emit({"ev": "problem", "kind": "more", "detail": f"{self.problems} problems so far"})

    def _report_progress(self) -> None:
        """Once per phase: every sidecar of this process got there (or died)."""
        for ev, done, last in (
            ("first_acked", self.first_acked, self.last_first_ack),
            ("synced", self.synced, self.last_synced),
        ):
            if ev not in self.reported and len(done | self.dead) == len(self.sidecars):
                self.reported.add(ev)
                self.emit({"ev": ev, "t": last, "count": len(done), "dead": len(self.dead - done)})

    def _maybe_done(self, exp: Expectation, *, timed_out: bool = False) -> None:
        if exp is not self.expectation or (exp.waiting and not timed_out):
            return
        self.expectation = None
        self.emit(
            {
                "ev": "acked",
                "change": exp.change,
                "times": exp.acked_at,
                "missing": len(exp.waiting),
                "lost": exp.lost,
                "already": exp.already,
            }
        )

    async def keepalive(self) -> None:
        """Every live sidecar pings every ``PING_INTERVAL``, each on its own phase: one
        task for all of them (as the control plane does), not a sleeping task each."""
        pings = 0
        while True:
            await trio.sleep(0.5)
            t = now()
            frame = b""
            for sidecar in list(self.live):
                if sidecar.next_ping <= t:
                    sidecar.next_ping = t + PING_INTERVAL
                    if not frame:
                        pings += 1
                        frame = wire.encode(wire.Ping(pings))
                    sidecar.send(frame)

    def port_of(self, sidecar: SimSidecar) -> int:
        """The replica sidecar ``i`` talks to: ``i % K``; the extra instances, replica 0's."""
        return self.ports[max(sidecar.index, 0) % len(self.ports)]

    # commands ------------------------------------------------------------------------------
    async def connect_all(self, cached: bool) -> None:
        """Every sidecar connects (``connect_concurrency`` at a time). ``cached``: of the
        sidecars that watch the same services, the first connects with nothing; once
        it holds every endpoint of them, what it holds is the others' persisted cache
        (the mesh did not change meanwhile)."""
        async with trio.open_nursery() as nursery:
            if not cached:
                for sidecar in self.sidecars.values():
                    nursery.start_soon(sidecar.run, self.port_of(sidecar))
                return
            groups: dict[tuple[str, ...], list[SimSidecar]] = {}
            for sidecar in self.sidecars.values():
                groups.setdefault(sidecar.watched, []).append(sidecar)
            for members in groups.values():
                nursery.start_soon(members[0].run, self.port_of(members[0]))
            for watched, members in groups.items():
                await self.group_synced[watched].wait()
                cache = members[0].held
                for sidecar in members[1:]:
                    nursery.start_soon(sidecar.run, self.port_of(sidecar), cache)

    async def preregister_all(self, concurrency: int) -> None:
        """Every sidecar registers and leaves again, ``concurrency`` at a time (see
        :meth:`SimSidecar.register_and_leave`)."""
        slots = trio.Semaphore(concurrency)

        async def one(sidecar: SimSidecar) -> None:
            async with slots:
                try:
                    await sidecar.register_and_leave(self.port_of(sidecar))
                except* (OSError, trio.BrokenResourceError, trio.TooSlowError, wire.WireError) as group:
                    self.problem("pre-registration", f"{sidecar.instance_id}: {group.exceptions[0]!r}")

        async with trio.open_nursery() as nursery:
            for sidecar in self.sidecars.values():
                nursery.start_soon(one, sidecar)
        self.emit({"ev": "preregistered", "t": now()})

    def progress(self) -> None:
        self.emit(
            {"ev": "progress", "first_acked": len(self.first_acked), "synced": len(self.synced), "dead": len(self.dead)}
        )

    async def expect(self, cmd: dict[str, Any]) -> None:
        exp = Expectation(cmd["change"], cmd["service"], cmd["instance"], cmd["present"], set())
        for index, sidecar in self.sidecars.items():
            if index in self.dead:
                continue
            if exp.seen_by(sidecar.held):
                exp.already += 1
            else:
                exp.waiting.add(index)
        self.expectation = exp
        self.emit({"ev": "expecting", "change": exp.change})
        self._maybe_done(exp)
        await trio.sleep(cmd["timeout"])
        self._maybe_done(exp, timed_out=True)

    async def change(self, cmd: dict[str, Any], nursery: trio.Nursery) -> None:
        kind, name = cmd["kind"], cmd["instance"]
        if kind in ("unready", "ready"):
            sidecar = self.sidecars[cmd["index"]]
            started = now()
            sidecar.send(wire.encode(wire.Health(kind == "ready")))
        elif kind == "join":
            extra = self.extras[name] = SimSidecar(self, -1, name, cmd["service"], cmd["address_port"])
            started = now()
            nursery.start_soon(extra.run, self.port_of(extra))
        else:  # bye
            extra = self.extras.pop(name)
            extra.leaving = True
            started = now()
            extra.send(wire.encode(wire.Bye("cp_scale benchmark")))
        self.emit({"ev": "changed", "change": cmd["change"], "t0": started})


async def worker_main(args: argparse.Namespace) -> None:
    raise_fd_limit(args.total + 1000)
    out = trio.lowlevel.FdStream(os.dup(1))
    send_events, events = trio.open_memory_channel[dict[str, Any]](10_000)

    def emit(event: dict[str, Any]) -> None:
        send_events.send_nowait(event)

    load = LoadWorker(args, emit)
    with trio.move_on_after(args.deadline):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_events, out, events)
            nursery.start_soon(load.keepalive)
            emit({"ev": "started", "pid": os.getpid(), "sidecars": len(load.sidecars)})
            await _serve_commands(load, nursery)
            nursery.cancel_scope.cancel()


async def _write_events(out: trio.lowlevel.FdStream, events: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
    async for event in events:
        await out.send_all(json.dumps(event).encode() + b"\n")


async def _serve_commands(load: LoadWorker, nursery: trio.Nursery) -> None:
    """Until stdin closes (the orchestrator is gone) or says stop."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async for line in _lines(stdin):
        cmd = json.loads(line)
        if cmd["cmd"] == "connect":
            nursery.start_soon(load.connect_all, cmd["cached"])
        elif cmd["cmd"] == "preregister":
            nursery.start_soon(load.preregister_all, cmd["concurrency"])
        elif cmd["cmd"] == "progress":
            load.progress()
        elif cmd["cmd"] == "expect":
            nursery.start_soon(load.expect, cmd)
        elif cmd["cmd"] == "change":
            await load.change(cmd, nursery)
        elif cmd["cmd"] == "stop":
            return


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line


# ======================================================================================
# The orchestrator: control plane, load processes, phases, results
# ======================================================================================

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when this script dies, even by SIGKILL."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(name: str, argv: list[str], log: Path, core: int | None, *, stdout: Path | None = None) -> Child:
    """Start ``argv`` in its own session (pinned to ``core`` with taskset, which execs:
    the PID is the program's), stderr to ``log``; stdout to a file, or stdin and stdout
    pipes (load processes). Called from the main thread only: PR_SET_PDEATHSIG follows
    that thread (trio starts processes from a worker thread, hence not trio's flavour)."""
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    if stdout is None:
        return processes.spawn(
            name, argv, log, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, preexec_fn=_die_with_parent
        )
    with open(stdout, "wb") as out_file:
        return processes.spawn(name, argv, log, stdout=out_file, cwd=REPO, preexec_fn=_die_with_parent)


async def stop(child: Child) -> None:
    """SIGTERM to its process group, then SIGKILL after STOP_TIMEOUT; never cancelled
    (a thread that is not abandoned runs to its end)."""
    await trio.to_thread.run_sync(processes.stop, child, STOP_TIMEOUT)


def proc_status_mb(pid: int, key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def core_busy_seconds(core: int | None = None) -> float:
    """user + nice + system time so far of one core (or all), whoever used it."""
    name = "cpu" if core is None else f"cpu{core}"
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == name:
            return sum(int(value) for value in fields[1:4]) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def own_cpu_seconds() -> float:
    """CPU time of this process and of the children it has reaped (all of them, at the end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), fields 14-15 of proc(5)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the control plane ----------------------------------------------------------------


@dataclass
class ControlPlane:
    child: Child
    push_port: int
    api_port: int
    data_dir: Path


@contextlib.asynccontextmanager
async def control_plane(
    tmp: Path, tag: str, core: int | None, n: int, store: str = "file"
) -> AsyncIterator[ControlPlane]:
    out, data_dir = tmp / f"cp-{tag}.out", tmp / f"cp-data-{tag}"
    argv = [sys.executable, "-m", "meshlet", "control-plane", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"]
    argv += ["--data-dir", str(data_dir), "--ttl", str(CP_TTL)]
    argv += ["--max-connections", str(n + MAX_CONNECTIONS_SPARE)]  # the default (10,000) is N at N = 10,000
    argv += [] if store == "file" else ["--store", store]
    child = spawn("control plane", argv, tmp / f"cp-{tag}.log", core, stdout=out)
    try:
        push_port, api_port = await _ready_ports(child, out)
        yield ControlPlane(child, push_port, api_port, data_dir)
    finally:
        await stop(child)


async def _ready_ports(child: Child, out: Path) -> tuple[int, int]:
    """From its ready line, ``meshlet control-plane ready push=127.0.0.1:P api=127.0.0.1:Q``."""
    with trio.fail_after(START_TIMEOUT):
        while True:
            line, newline, _ = (await trio.Path(out).read_text(errors="replace")).partition("\n")
            if newline:
                ports = processes.parse_ready_line(line).ports
                return ports["push"], ports["api"]
            child.check_alive()
            await trio.sleep(0.05)


# --- etcd, for replicas ---------------------------------------------------------------------


@dataclass
class Etcd:
    child: Child
    url: str  # its client URL (the HTTP/JSON gateway), http://127.0.0.1:PORT


def free_port() -> int:
    """A loopback port the kernel just handed out (bound to port 0, then closed): etcd
    cannot bind port 0 and say which port it got."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def etcd_server(tmp: Path, tag: str, core: int | None) -> AsyncIterator[Etcd]:
    """One etcd member on loopback, its data in ``tmp``; yields once it reports healthy."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    argv = ["etcd", "--name", "bench", "--data-dir", str(tmp / f"etcd-data-{tag}")]
    argv += ["--listen-client-urls", client, "--advertise-client-urls", client]
    argv += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"bench={peer}"]
    child = spawn("etcd", argv + ETCD_FLAGS, tmp / f"etcd-{tag}.log", core, stdout=tmp / f"etcd-{tag}.out")
    try:
        await _etcd_healthy(child, client)
        yield Etcd(child, client)
    finally:
        await stop(child)


async def _etcd_healthy(child: Child, url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        with trio.fail_after(START_TIMEOUT):
            while True:
                child.check_alive()
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    if (await client.get("/health")).json().get("health") == "true":
                        return
                await trio.sleep(0.1)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for every key under ``prefix``: its last byte plus one."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


async def put_watch_latency(url: str, puts: int = PROBE_PUTS) -> list[float]:
    """etcd's put→watch latency through the HTTP gateway the replicas use: a watch on a
    scratch prefix, then ``puts`` puts one after the other, each timed from just before
    it is sent until the watch delivers its event (the put's round trip is in it)."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=None)) as client:
        send, events = trio.open_memory_channel[tuple[bytes, float]](puts + 1)
        created = trio.Event()
        latencies = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_probe_watch, client, send, created)
            with trio.fail_after(PROBE_TIMEOUT):
                await created.wait()
                for i in range(puts):
                    key, sent = PROBE_PREFIX + b"%d" % i, now()
                    (await client.post("/v3/kv/put", json={"key": b64(key), "value": b64(b"x")})).raise_for_status()
                    seen, at = await events.receive()
                    if seen != key:
                        raise RuntimeError(f"etcd probe: the watch delivered {seen!r}, expected {key!r}")
                    latencies.append(at - sent)
            nursery.cancel_scope.cancel()
        scratch = {"key": b64(PROBE_PREFIX), "range_end": b64(prefix_end(PROBE_PREFIX))}
        (await client.post("/v3/kv/deleterange", json=scratch)).raise_for_status()
    return latencies


async def _probe_watch(
    client: httpx.AsyncClient, send: trio.MemorySendChannel[tuple[bytes, float]], created: trio.Event
) -> None:
    body = {"create_request": {"key": b64(PROBE_PREFIX), "range_end": b64(prefix_end(PROBE_PREFIX))}}
    async with client.stream("POST", "/v3/watch", json=body, headers={"Grpc-Metadata-hasleader": "true"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            at = now()
            message = json.loads(line)
            if "error" in message:
                raise RuntimeError(f"etcd probe: the watch failed: {message['error']}")
            result = message.get("result") or {}
            if result.get("created"):
                created.set()
            for event in result.get("events", []):
                send.send_nowait((base64.b64decode(event["kv"]["key"]), at))


ETCD_EXPECTED = ("simple token is not cryptographically signed",)  # no auth: said at every start


def etcd_problems(log: str) -> list[str]:
    """etcd's warnings and errors (zap JSON lines), the first 5: slow applies show up here."""
    bad = [
        line
        for line in log.splitlines()
        if re.search(r'"level":"(warn|error|fatal|panic)"', line) and not any(e in line for e in ETCD_EXPECTED)
    ]
    return bad[:5] + ([f"... and {len(bad) - 5} more such lines"] if len(bad) > 5 else [])


# --- the load processes ------------------------------------------------------------------


class Load:
    """The load processes: commands out (stdin), events in (stdout), one queue."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.problems: list[str] = []
        self._send, self._events = trio.open_memory_channel[tuple[int, dict[str, Any]]](100_000)
        self._stash: list[tuple[int, dict[str, Any]]] = []
        self._stdin = [trio.lowlevel.FdStream(os.dup(c.popen.stdin.fileno())) for c in children]  # type: ignore[union-attr]

    def owner(self, index: int) -> int:
        return index % len(self.children)

    async def pump(self, worker: int) -> None:
        stdout = self.children[worker].popen.stdout
        assert stdout is not None
        async for line in _lines(trio.lowlevel.FdStream(os.dup(stdout.fileno()))):
            event = json.loads(line)
            if event["ev"] == "problem":
                self.problems.append(f"{event['kind']}: {event['detail']}")
            else:
                await self._send.send((worker, event))

    async def send(self, worker: int, cmd: dict[str, Any]) -> None:
        await self._stdin[worker].send_all(json.dumps(cmd).encode() + b"\n")

    async def broadcast(self, cmd: dict[str, Any]) -> None:
        for worker in range(len(self.children)):
            await self.send(worker, cmd)

    async def one(self, ev: str, change: int | None = None) -> dict[str, Any]:
        return (await self.gather(ev, change, workers=1))[0]

    async def gather(self, ev: str, change: int | None = None, workers: int | None = None) -> list[dict[str, Any]]:
        """The next ``ev`` event (of ``change``) from each worker (or from ``workers`` of them)."""
        wanted = len(self.children) if workers is None else workers
        got: dict[int, dict[str, Any]] = {}

        def matches(item: tuple[int, dict[str, Any]]) -> bool:
            worker, event = item
            return event["ev"] == ev and event.get("change") == change and worker not in got

        for item in [item for item in self._stash if matches(item)]:
            self._stash.remove(item)
            got[item[0]] = item[1]
        while len(got) < wanted:
            with trio.move_on_after(1.0):
                item = await self._events.receive()
                if matches(item):
                    got[item[0]] = item[1]
                else:
                    self._stash.append(item)
                continue
            for child in self.children:
                child.check_alive()
        return list(got.values())


@contextlib.asynccontextmanager
async def load_processes(
    tmp: Path, tag: str, n: int, ports: list[int], join_token: Path, workers: int, settings: Settings, core: int | None
) -> AsyncIterator[Load]:
    """``workers`` load processes sharing N sidecars (and the replicas' push ``ports``);
    each exits on its own after the longest its N can take (``deadline``), or when its
    stdin closes."""
    concurrency = settings.concurrency
    deadline = settings.cold_limit + WARM_LIMIT + CHANGES_BUDGET + 3 * CHANGE_TIMEOUT + 60
    children = []
    try:
        for w in range(workers):
            argv = [sys.executable, str(SELF), "_worker", "--ports", ",".join(map(str, ports))]
            argv += ["--first", str(w), "--step", str(workers), "--total", str(n)]
            argv += ["--concurrency", str(max(1, concurrency // workers)), "--deadline", str(deadline)]
            argv += ["--join-token-file", str(join_token)]
            children.append(spawn(f"load process {w}", argv, tmp / f"load-{tag}-{w}.log", core))
        load = Load(children)
        async with trio.open_nursery() as nursery:
            for w in range(workers):
                nursery.start_soon(load.pump, w)
            with trio.fail_after(START_TIMEOUT):
                await load.gather("started")
            yield load
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for child in children:
                await stop(child)


# --- measuring one N -----------------------------------------------------------------------


@dataclass
class Mesh:
    """The control plane (K replicas, and their etcd), API clients and the load processes for N sidecars."""

    n: int
    tag: str
    cps: list[ControlPlane]  # the replicas; one: a single control plane
    apis: list[httpx.AsyncClient]  # their APIs, in the same order
    load: Load
    etcd: Etcd | None


@contextlib.asynccontextmanager
async def mesh(tmp: Path, n: int, settings: Settings, tag: str, problems: list[str]) -> AsyncIterator[Mesh]:
    """A fresh control plane (a fresh etcd and K replicas) and load processes; on the
    way out, what went wrong (load-side problems, warnings in the logs) lands in ``problems``."""
    cp_core, load_core = (CP_CORE, LOAD_CORE) if settings.pin else (None, None)
    async with contextlib.AsyncExitStack() as stack:
        etcd, store = None, "file"
        if settings.store == "etcd":
            etcd = await stack.enter_async_context(etcd_server(tmp, tag, cp_core))
            store = "etcd://" + etcd.url.removeprefix("http://")
        cps, apis = [], []
        for j in range(settings.replicas):  # one after the other: the first one's tokens become etcd's
            cp_tag = replica_tag(tag, j, settings)
            cp = await stack.enter_async_context(control_plane(tmp, cp_tag, cp_core, n, store))
            api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.api_port}", timeout=30)
            cps.append(cp)
            apis.append(await stack.enter_async_context(api))
        ports, workers = [cp.push_port for cp in cps], workers_for(n, settings)
        join_token = cps[0].data_dir / "join-token"  # with etcd, every replica's
        load = await stack.enter_async_context(
            load_processes(tmp, tag, n, ports, join_token, workers, settings, load_core)
        )
        try:
            yield Mesh(n, tag, cps, apis, load, etcd)
        finally:
            problems += [f"{tag}: load: {p}" for p in load.problems]
            for j, cp in enumerate(cps):
                name = "control-plane" if len(cps) == 1 else f"replica {j}"
                problems += [f"{tag}: {name} log: {line}" for line in log_problems(cp.child.log_text())]
            if etcd is not None:
                problems += [f"{tag}: etcd log: {line}" for line in etcd_problems(etcd.child.log_text())]


def replica_tag(tag: str, j: int, settings: Settings) -> str:
    return tag if settings.replicas == 1 else f"{tag}-r{j}"


def replica_cpu(m: Mesh) -> list[float]:
    return [cpu_seconds(cp.child.pid) for cp in m.cps]


def etcd_cpu(m: Mesh) -> float:
    return 0.0 if m.etcd is None else cpu_seconds(m.etcd.child.pid)


def workers_for(n: int, settings: Settings) -> int:
    return settings.workers or max(1, -(-n // SIDECARS_PER_WORKER))


@dataclass
class StartResult:
    """Getting N sidecars connected, ready and ACKed, one way."""

    how: str  # COLD or WARM
    limit_s: float
    preregistered_s: float = float("nan")  # WARM: every instance registered once
    connected_s: float = float("nan")  # all connected + first pushes ACKed (NaN: not within limit_s)
    synced_s: float = float("nan")  # every sidecar holds every endpoint of what it watches
    progress: str = ""  # how far it got when it did not finish
    status_s: float = float("nan")  # one GET /v1/status at N
    cp_cpu_s: float = float("nan")  # every replica's
    load_cpu_s: float = float("nan")
    hwm_mb: float = float("nan")  # the largest replica's
    sessions_lost: int = 0  # sessions that ended during the start
    per_replica: list[int] = field(default_factory=list)  # sessions on each replica once all were connected
    replica_cpu_s: list[float] = field(default_factory=list)
    etcd_cpu_s: float = float("nan")
    etcd_probe: list[float] = field(default_factory=list)  # put→watch latencies, replicas up, no sidecar yet

    @property
    def reached(self) -> bool:
        return self.synced_s == self.synced_s  # not NaN


COLD = "cold: every sidecar connects to an empty control plane, ready, with nothing cached"
WARM = (
    "warm: every instance registered once and dropped its channel (the lease keeps it), then every sidecar "
    "reconnects naming its cached configuration in hello.have, as after a network blip"
)


@dataclass
class SizeResult:
    n: int
    workers: int
    starts: list[StartResult] = field(default_factory=list)
    steady_on: str = ""  # which start the changes ran after
    all_acked: list[float] = field(default_factory=list)  # per change
    per_sidecar: list[float] = field(default_factory=list)  # per change and sidecar
    incomplete_changes: int = 0
    cp_histogram: dict[str, float] = field(default_factory=dict)
    rss_mb: float = float("nan")  # the largest replica's
    hwm_mb: float = float("nan")
    replica_rss_mb: list[float] = field(default_factory=list)
    replica_hwm_mb: list[float] = field(default_factory=list)
    replica_sessions: list[int] = field(default_factory=list)  # at the end
    etcd_rss_mb: float = float("nan")
    etcd_hwm_mb: float = float("nan")
    etcd_probe: list[float] = field(default_factory=list)  # put→watch latencies with N connected
    cp_cpu_per_change_s: float = float("nan")  # every replica's
    replica_cpu_per_change_s: list[float] = field(default_factory=list)
    etcd_cpu_per_change_s: float = float("nan")
    load_cpu_share: float = float("nan")  # load processes' CPU / wall time, change phase
    others_on_cp_core: float = float("nan")  # busy time of the CP's core not used by the CP, change phase
    extras_connected: int = 0  # svc-7 instances the changes added and did not remove yet
    status: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


async def measure_size(n: int, settings: Settings, tmp: Path) -> SizeResult:
    """Cold start; if it does not finish within the limit, a warm start on a fresh
    control plane; then the changes on whichever got all N sidecars synced."""
    result = SizeResult(n, workers_for(n, settings))
    async with mesh(tmp, n, settings, f"{n}-cold", result.problems) as m:
        cold = await start(m, StartResult(COLD, settings.cold_limit))
        result.starts.append(cold)
        if cold.reached:
            await steady_state(result, m, settings.changes, COLD)
            return result
    console.print(f"    [yellow]cold start not done ({cold.progress}): warm start[/yellow]")
    async with mesh(tmp, n, settings, f"{n}-warm", result.problems) as m:
        warm = await start(m, StartResult(WARM, WARM_LIMIT))
        result.starts.append(warm)
        if warm.reached:
            await steady_state(result, m, settings.changes, WARM)
        else:
            result.problems.append(f"warm start not done ({warm.progress}): no changes measured")
    return result


async def start(m: Mesh, result: StartResult) -> StartResult:
    """Connect every sidecar (after pre-registering their instances, for WARM) and wait
    until all are connected and ACKed their first pushes, then until all are synced.
    Stops waiting at ``result.limit_s``, or when sessions are lost, and records how far it got."""
    if m.etcd is not None:
        result.etcd_probe = await put_watch_latency(m.etcd.url)
    cp_cpu, etcd_cpu_before, load_cpu = replica_cpu(m), etcd_cpu(m), load_cpu_seconds(m.load)
    started = now()
    with trio.move_on_after(result.limit_s):
        try:
            if result.how == WARM:
                await m.load.broadcast({"cmd": "preregister", "concurrency": PREREGISTER_CONCURRENCY})
                result.preregistered_s = max(e["t"] for e in await m.load.gather("preregistered")) - started
                console.print(f"    all {m.n:,} instances registered (and left) in {result.preregistered_s:.2f} s")
            await m.load.broadcast({"cmd": "connect", "cached": result.how == WARM})
            result.connected_s = await connected_and_acked(m, started)
            result.per_replica = await replica_sessions(m)
            result.status_s = await status_at_n(m)
            console.print(f"    all {m.n:,} connected and first pushes ACKed after {result.connected_s:.2f} s")
            synced = await m.load.gather("synced")
            if lost := sum(e["dead"] for e in synced):
                raise SessionsLost(lost)
            result.synced_s = max(e["t"] for e in synced) - started
            console.print(f"    every sidecar holds every endpoint it watches after {result.synced_s:.2f} s")
        except SessionsLost as exc:
            console.print(f"    [yellow]{exc.count:,} sessions ended during the start[/yellow]")
    result.replica_cpu_s = [after - before for before, after in zip(cp_cpu, replica_cpu(m), strict=True)]
    result.cp_cpu_s = sum(result.replica_cpu_s)
    result.etcd_cpu_s = etcd_cpu(m) - etcd_cpu_before
    result.load_cpu_s = load_cpu_seconds(m.load) - load_cpu
    result.hwm_mb = max(proc_status_mb(cp.child.pid, "VmHWM") for cp in m.cps)
    if not result.reached:
        result.progress = await progress(m, result, now() - started)
    return result


class SessionsLost(Exception):
    """Sessions ended while getting N sidecars connected: that start failed."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} sessions lost")
        self.count = count


async def connected_and_acked(m: Mesh, started: float) -> float:
    """Seconds from ``started`` until the gauges show N sessions and every sidecar has
    ACKed its first pushes (the later of the two); reports progress every 5 s."""
    connected_at = 0.0

    async def watch_gauge() -> None:
        nonlocal connected_at
        next_report = started + 5
        while (connected := sum(await replica_sessions(m))) < m.n:
            if now() >= next_report:
                next_report += 5
                console.print(f"    {now() - started:4.0f} s: {connected:,} of {m.n:,} connected")
            await trio.sleep(0.2)
        connected_at = now()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_gauge)
        firsts = await m.load.gather("first_acked")
        if dead := sum(e["dead"] for e in firsts):
            nursery.cancel_scope.cancel()  # the gauge would never get to N
    if dead:
        raise SessionsLost(dead)
    return max(connected_at, *(e["t"] for e in firsts)) - started


async def api_get(api: httpx.AsyncClient, path: str) -> httpx.Response:
    """GET from the control plane's API. A busy control plane can stall past the
    server's keep-alive timeout, which then closes the pooled connection just as the
    next request goes out: that is retried (twice) on a new connection."""
    for attempt in range(3):
        try:
            response = await api.get(path)
            response.raise_for_status()
            return response
        except httpx.TransportError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def connected_sidecars(api: httpx.AsyncClient) -> int:
    """``meshlet_cp_connected_sidecars``: the sessions /v1/status lists, without
    serialising N of them on every poll."""
    text = (await api_get(api, "/metrics")).text
    match = re.search(r"^meshlet_cp_connected_sidecars (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


async def replica_sessions(m: Mesh) -> list[int]:
    """Each replica's connected sidecars (its own sessions)."""
    return [await connected_sidecars(api) for api in m.apis]


async def status_at_n(m: Mesh) -> float:
    """The replicas' /v1/status must list N connected sidecars between them; returns how
    long the slowest took to answer."""
    took, connected = 0.0, 0
    for api in m.apis:
        asked = now()
        status = (await api_get(api, "/v1/status")).json()
        took = max(took, now() - asked)
        connected += sum(1 for s in status["sidecars"] if s["connected"])
    if connected != m.n:
        raise RuntimeError(f"/v1/status lists {connected} connected sidecars, expected {m.n}")
    return took


async def progress(m: Mesh, result: StartResult, elapsed: float) -> str:
    """How far a start got, e.g. "after 40 s: 1,310 of 5,000 connected, 1,200 ACKed...";
    counts the sessions lost on the way into ``result``."""
    with trio.move_on_after(15):
        per_replica = await replica_sessions(m)
        await m.load.broadcast({"cmd": "progress"})
        reports = await m.load.gather("progress")
        acked, synced = sum(r["first_acked"] for r in reports), sum(r["synced"] for r in reports)
        result.sessions_lost = sum(r["dead"] for r in reports)
        split = f" ({' + '.join(f'{c:,}' for c in per_replica)})" if len(per_replica) > 1 else ""
        return (
            f"after {elapsed:.0f} s: {sum(per_replica):,} of {m.n:,} connected{split}, {acked:,} ACKed their first "
            f"pushes, {synced:,} hold every endpoint they watch, {result.sessions_lost:,} sessions lost"
        )
    return f"after {elapsed:.0f} s: no answer from the control plane or the load within 15 s"


def load_cpu_seconds(load: Load) -> float:
    return sum(cpu_seconds(child.pid) for child in load.children)


async def steady_state(result: SizeResult, m: Mesh, changes: int, on: str) -> None:
    result.steady_on = on
    await change_phase(result, m, changes)
    await final_checks(result, m)


def planned_change(k: int) -> dict[str, Any]:
    """Change ``k``: sidecar 7 not-ready / ready, an extra svc-7 instance joins / leaves."""
    kind = CHANGE_KINDS[k % len(CHANGE_KINDS)]
    cmd: dict[str, Any] = {"cmd": "change", "change": k, "kind": kind, "service": service_of(CHANGED_SERVICE)}
    if kind in ("unready", "ready"):
        cmd.update(index=FLIPPER, instance=f"sim-{FLIPPER:05d}", present=kind == "ready")
    else:
        cycle = k // len(CHANGE_KINDS)
        cmd.update(instance=f"extra-{cycle:03d}", address_port=15000 + cycle, present=kind == "join")
    return cmd


async def change_phase(result: SizeResult, m: Mesh, changes: int) -> None:
    """One change at a time: every worker learns what to look for, the owner of
    sidecar 7 makes the change, every worker reports its sidecars' ACK stamps."""
    cp_cpu, etcd_cpu_before, load_cpu, started = replica_cpu(m), etcd_cpu(m), load_cpu_seconds(m.load), now()
    cp_core_busy = core_busy_seconds(CP_CORE)
    done = 0
    for k in range(changes):
        if now() - started > CHANGES_BUDGET:
            result.problems.append(f"change phase budget ({CHANGES_BUDGET:g} s) spent after {k} changes")
            break
        cmd = planned_change(k)
        expect = {"cmd": "expect", "timeout": CHANGE_TIMEOUT}
        expect |= {key: cmd[key] for key in ("change", "service", "instance", "present")}
        with trio.fail_after(CHANGE_TIMEOUT + 5):
            await m.load.broadcast(expect)
            await m.load.gather("expecting", k)
            await m.load.send(m.load.owner(FLIPPER), cmd)
            t0 = (await m.load.one("changed", k))["t0"]
            reports = await m.load.gather("acked", k)
        record_change(result, k, t0, reports)
        result.extras_connected += {"join": 1, "bye": -1}.get(cmd["kind"], 0)
        done += 1
        await trio.sleep(0.3 + random.uniform(0, 0.2))  # spaced apart, past the 100 ms debounce
    elapsed = now() - started
    used = [after - before for before, after in zip(cp_cpu, replica_cpu(m), strict=True)]
    etcd_used = etcd_cpu(m) - etcd_cpu_before
    result.replica_cpu_per_change_s = [u / max(done, 1) for u in used]
    result.cp_cpu_per_change_s = sum(used) / max(done, 1)
    result.etcd_cpu_per_change_s = etcd_used / max(done, 1)
    result.load_cpu_share = (load_cpu_seconds(m.load) - load_cpu) / elapsed
    busy = core_busy_seconds(CP_CORE) - cp_core_busy
    result.others_on_cp_core = max(0.0, busy - sum(used) - etcd_used) / elapsed


def record_change(result: SizeResult, k: int, t0: float, reports: list[dict[str, Any]]) -> None:
    times = [t - t0 for report in reports for t in report["times"]]
    missing = sum(r["missing"] + r["lost"] for r in reports)
    already = sum(r["already"] for r in reports)
    result.per_sidecar += times
    kind = CHANGE_KINDS[k % len(CHANGE_KINDS)]
    if missing or already or len(times) != result.n:
        result.incomplete_changes += 1
        result.problems.append(
            f"change {k} ({kind}): {len(times)} of {result.n} sidecars ACKed it within {CHANGE_TIMEOUT:g} s, "
            f"{missing} missing or lost, {already} showed it already"
        )
        return
    result.all_acked.append(max(times))
    console.print(
        f"    change {k:2d} {kind:>7}: all {result.n:,} ACKed after {max(times):.3f} s "
        f"(first {min(times):.3f} s, median {percentile(times, 50):.3f} s)"
    )


async def final_checks(result: SizeResult, m: Mesh) -> None:
    result.replica_rss_mb = [proc_status_mb(cp.child.pid, "VmRSS") for cp in m.cps]
    result.replica_hwm_mb = [proc_status_mb(cp.child.pid, "VmHWM") for cp in m.cps]
    result.rss_mb, result.hwm_mb = max(result.replica_rss_mb), max(result.replica_hwm_mb)
    if m.etcd is not None:
        result.etcd_rss_mb = proc_status_mb(m.etcd.child.pid, "VmRSS")
        result.etcd_hwm_mb = proc_status_mb(m.etcd.child.pid, "VmHWM")
    result.cp_histogram = histogram_summary([(await api_get(api, "/metrics")).text for api in m.apis])
    statuses = [(await api_get(api, "/v1/status")).json() for api in m.apis]
    result.replica_sessions = [sum(1 for s in status["sidecars"] if s["connected"]) for status in statuses]
    nacked = [s["node"] for status in statuses for s in status["sidecars"] if s["last_nack"]]
    nacks_total = sum(status["nacks_total"] for status in statuses)
    connected = sum(result.replica_sessions)
    pushes_total = sum(status["pushes_total"] for status in statuses)
    result.status = {"connected": connected, "pushes_total": pushes_total, **statuses[0]["registry"]}
    if connected != result.n + result.extras_connected:
        expected = result.n + result.extras_connected
        result.problems.append(f"/v1/status at the end: {connected} connected, expected {expected}")
    if nacks_total or nacked:
        result.problems.append(f"{nacks_total} NACKs; last_nack set on {nacked[:5]}")
    for status in statuses:
        if status["registry"]["self_preservation"]:
            result.problems.append(f"self-preservation on: {status['registry']['self_preservation_reason']}")
    if m.etcd is not None:
        result.etcd_probe = await put_watch_latency(m.etcd.url)


def log_problems(log: str) -> list[str]:
    """Warnings, errors and tracebacks in the control plane's log (the first 10)."""
    bad = [line for line in log.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line)]
    return bad[:10] + ([f"... and {len(bad) - 10} more such lines"] if len(bad) > 10 else [])


def histogram_summary(metrics: list[str]) -> dict[str, float]:
    """Count and p50/p99 of ``meshlet_cp_convergence_seconds`` over every replica's
    /metrics (buckets added up; interpolated within buckets, as Prometheus' histogram_quantile)."""
    summed: dict[float, float] = {}
    for text in metrics:
        for le, count in re.findall(r'^meshlet_cp_convergence_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
            bound = float("inf") if le == "+Inf" else float(le)
            summed[bound] = summed.get(bound, 0.0) + float(count)
    buckets = sorted(summed.items())
    total = buckets[-1][1] if buckets else 0.0
    out = {"count": total}
    for q in (50, 99):
        out[f"p{q}"] = bucket_quantile(buckets, q / 100) if total else float("nan")
    return out


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- results ---------------------------------------------------------------------------------


@dataclass
class Target:
    metric: str
    value: float
    limit: float
    unit: str
    digits: int = 2

    @property
    def passed(self) -> bool:
        return self.value <= self.limit  # NaN (not measured) fails

    def row(self) -> list[str]:
        value = f"{self.value:.{self.digits}f} {self.unit}" if self.value == self.value else "not measured"
        return [self.metric, value, f"≤ {self.limit:g} {self.unit}", "PASS" if self.passed else "FAIL"]


def build_targets(results: list[SizeResult], replicas: int = 1) -> list[Target]:
    targets = []
    for r in results:
        limits = [s for k, up_to, s in CONVERGENCE_TARGETS if replicas >= k and r.n <= up_to]
        if limits:
            p99 = percentile(r.all_acked, 99) if not r.incomplete_changes else float("nan")
            targets.append(Target(f"convergence p99, all {r.n:,} ACKed", p99, min(limits), "s"))
        if replicas == 1 and r.n == RSS_TARGET_AT:
            targets.append(Target(f"control-plane RSS at {r.n:,} connected", r.rss_mb, RSS_TARGET_MB, "MiB"))
        if replicas > 1:
            targets += replica_targets(r, replicas)
    return targets


def replica_targets(r: SizeResult, replicas: int) -> list[Target]:
    """The cold start (all N synced, no session lost) and each replica's RSS."""
    cold = r.starts[0]  # always the first start
    targets = [
        Target(f"cold start of {r.n:,}: all connected and synced", cold.synced_s, COLD_TARGET_S, "s"),
        Target(f"cold start of {r.n:,}: sessions lost", float(cold.sessions_lost), 0, "sessions", 0),
    ]
    rss = r.replica_rss_mb or [float("nan")] * replicas  # not measured: the mesh never got synced
    targets += [Target(f"replica {j} RSS at {r.n:,} connected", mb, RSS_TARGET_MB, "MiB") for j, mb in enumerate(rss)]
    return targets


@dataclass
class TableData:
    title: str
    headers: list[str]
    rows: list[list[str]]


def seconds(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value == value else "-"


def start_table(results: list[SizeResult], replicas: int = 1) -> TableData:
    split = ["sessions per replica"] if replicas > 1 else []
    headers = [
        "sidecars",
        "start",
        "load procs",
        "registered s",
        "all connected + ACKed s",
        "all synced s",
        "CP CPU s",
        "load CPU s",
        "CP peak RSS MiB",
        "GET /v1/status s",
        "sessions lost",
        *split,
        "not finished",
    ]
    rows = [
        [
            f"{r.n:,}",
            s.how.split(":")[0],
            str(r.workers),
            seconds(s.preregistered_s),
            seconds(s.connected_s),
            seconds(s.synced_s),
            f"{s.cp_cpu_s:.1f}",
            f"{s.load_cpu_s:.1f}",
            f"{s.hwm_mb:.0f}",
            seconds(s.status_s),
            f"{s.sessions_lost:,}",
            *([" / ".join(f"{c:,}" for c in s.per_replica) or "-"] if split else []),
            s.progress or "-",
        ]
        for r in results
        for s in r.starts
    ]
    return TableData("Getting N sidecars connected and synced", headers, rows)


def steady_table(results: list[SizeResult]) -> TableData:
    headers = [
        "sidecars",
        "after",
        "changes",
        "all-ACKed p50 s",
        "all-ACKed p99 s",
        "per-sidecar p50 s",
        "per-sidecar p99 s",
        "CP histogram p50 / p99 s",
        "CP CPU per change s",
        "load CPU",
        "others on CP core",
        "CP RSS MiB",
        "CP peak RSS MiB",
    ]
    rows = []
    for r in results:
        h = r.cp_histogram
        incomplete = f" (+{r.incomplete_changes} incomplete)" if r.incomplete_changes else ""
        rows.append(
            [
                f"{r.n:,}",
                r.steady_on.split(":")[0] or "-",
                f"{len(r.all_acked)}{incomplete}",
                seconds(percentile(r.all_acked, 50), 3),
                seconds(percentile(r.all_acked, 99), 3),
                seconds(percentile(r.per_sidecar, 50), 3),
                seconds(percentile(r.per_sidecar, 99), 3),
                f"{seconds(h.get('p50', float('nan')), 3)} / {seconds(h.get('p99', float('nan')), 3)}"
                f" ({h.get('count', 0):,.0f} ACKs)",
                seconds(r.cp_cpu_per_change_s),
                f"{100 * r.load_cpu_share:.0f}% of a core" if r.load_cpu_share == r.load_cpu_share else "-",
                f"{100 * r.others_on_cp_core:.0f}%" if r.others_on_cp_core == r.others_on_cp_core else "-",
                f"{r.rss_mb:.0f}" if r.rss_mb == r.rss_mb else "-",
                f"{r.hwm_mb:.0f}" if r.hwm_mb == r.hwm_mb else "-",
            ]
        )
    return TableData("Convergence and memory at N connected", headers, rows)


def replicas_table(results: list[SizeResult]) -> TableData:
    """Per replica and for etcd: sessions, CPU, memory (the last start's mesh)."""
    headers = ["sidecars", "process", "sessions", "start CPU s", "CPU per change s", "RSS MiB", "peak RSS MiB"]
    rows = []
    for r in results:
        start = r.starts[-1]
        for j, cpu in enumerate(start.replica_cpu_s):
            rows.append(
                [
                    f"{r.n:,}",
                    f"replica {j}",
                    f"{r.replica_sessions[j]:,}" if r.replica_sessions else "-",
                    f"{cpu:.1f}",
                    seconds(r.replica_cpu_per_change_s[j] if r.replica_cpu_per_change_s else float("nan")),
                    f"{r.replica_rss_mb[j]:.0f}" if r.replica_rss_mb else "-",
                    f"{r.replica_hwm_mb[j]:.0f}" if r.replica_hwm_mb else "-",
                ]
            )
        rows.append(
            [
                f"{r.n:,}",
                "etcd",
                "-",
                f"{start.etcd_cpu_s:.1f}",
                seconds(r.etcd_cpu_per_change_s),
                f"{r.etcd_rss_mb:.0f}" if r.etcd_rss_mb == r.etcd_rss_mb else "-",
                f"{r.etcd_hwm_mb:.0f}" if r.etcd_hwm_mb == r.etcd_hwm_mb else "-",
            ]
        )
    return TableData("Replicas and etcd", headers, rows)


def probe_table(results: list[SizeResult]) -> TableData:
    """etcd's put→watch latency, through the HTTP gateway, before the sidecars and with N connected."""
    headers = ["sidecars", "when", "puts", "p50 ms", "p99 ms", "max ms"]
    rows = []
    for r in results:
        probes = [(f"{s.how.split(':')[0]} start: replicas up, no sidecar yet", s.etcd_probe) for s in r.starts]
        probes.append((f"{r.n:,} connected, after the changes", r.etcd_probe))
        for when, latencies in probes:
            ms = [1000 * t for t in latencies]
            stats = [percentile(ms, 50), percentile(ms, 99), max(ms, default=float("nan"))]
            rows.append([f"{r.n:,}", when, str(len(ms)), *(seconds(v) for v in stats)])
    return TableData("etcd put→watch latency (HTTP gateway)", headers, rows)


def target_table(targets: list[Target]) -> TableData:
    return TableData("Targets", ["metric", "value", "target", "result"], [t.row() for t in targets])


def print_results(tables: list[TableData], results: list[SizeResult]) -> None:
    for data in tables:
        table = Table(title=data.title, title_justify="left")
        for i, header in enumerate(data.headers):
            table.add_column(header, justify="left" if i == 0 else "right")
        for cells in data.rows:
            if data.headers[-1] == "result":
                cells = [
                    *cells[:-1],
                    f"[green]{cells[-1]}[/green]" if cells[-1] == "PASS" else f"[bold red]{cells[-1]}[/]",
                ]
            table.add_row(*cells)
        console.print(table)
    for r in results:
        for problem in shown(r.problems):
            console.print(f"[yellow]N={r.n:,}: {escape(problem)}[/yellow]")


def shown(problems: list[str], limit: int = 30) -> list[str]:
    """The first ``limit`` problems, and how many more (the logs have them all)."""
    more = len(problems) - limit
    return problems[:limit] + ([f"... and {more} more (see {LOGS.relative_to(REPO)}/)"] if more > 0 else [])


def markdown_table(data: TableData) -> str:
    lines = [
        f"### {data.title}",
        "",
        "| " + " | ".join(data.headers) + " |",
        "| " + " | ".join(":--" if i == 0 else "--:" for i in range(len(data.headers))) + " |",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in data.rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown",
    )
    return (
        f"{cpu}, nproc {os.cpu_count()}, kernel {platform.release()}, "
        f"python {platform.python_version()}, trio {trio.__version__}"
    )


def code_fingerprint() -> str:
    """Which control plane was measured: a hash of control_plane/**/*.py, and its newest file."""
    root = REPO / "control_plane"
    files = sorted(root.rglob("*.py"))
    digest = hashlib.sha256(b"".join(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() for f in files))
    newest = max(files, key=lambda f: f.stat().st_mtime)
    when = datetime.fromtimestamp(newest.stat().st_mtime).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"`control_plane/**/*.py` sha256 {digest.hexdigest()[:12]} (newest: {newest.relative_to(root)}, {when})"


@dataclass
class Interference:
    """CPU time the machine spent on processes outside this run (another job makes
    the numbers noisy; the pinning does not keep other processes off the cores)."""

    busy_s: float
    own_s: float
    clock_s: float

    @classmethod
    def start(cls) -> Interference:
        return cls(core_busy_seconds(), own_cpu_seconds(), now())

    def describe(self) -> str:
        elapsed = now() - self.clock_s
        others = max(0.0, (core_busy_seconds() - self.busy_s) - (own_cpu_seconds() - self.own_s))
        share = 100 * others / (elapsed * (os.cpu_count() or 1))
        noisy = " - other work was running: expect noise, rerun" if share > 5 else ""
        return f"CPU used by processes outside this run: {others:.0f} s ({share:.0f}% of the machine){noisy}"


def render_section(
    tables: list[TableData],
    results: list[SizeResult],
    settings: Settings,
    started: datetime,
    elapsed: float,
    interference: str,
    code: str,
) -> str:
    on_cp_core = "control plane" if settings.store == "file" else f"{settings.replicas} replica(s) and etcd"
    pinning = (
        f"{on_cp_core} on core {CP_CORE}; load processes and this script on core {LOAD_CORE} (`taskset`)"
        if settings.pin
        else "none (the kernel places every process)"
    )
    lines = [
        settings.section,
        "",
        'Written by `benchmarks/cp_scale.py` (`make bench-cp`; see benchmarks/README.md, "Control plane scale").',
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')} (run took {elapsed:.0f} s)",
        f"- machine: {machine()}",
        f"- code: {code}",
        f"- pinning: {pinning}",
        f"- {interference}",
        f"- load: N simulated sidecars in {SERVICES} services (`svc-0`..`svc-{SERVICES - 1}`), one TCP push channel "
        f"each, {settings.concurrency} connecting at a time; control plane `--ttl {CP_TTL}`. Each sidecar watches "
        f"the 3 services its app calls (protocol v2): `svc-7`, called by all N (so a change of it reaches all N), "
        "and `svc-(i+1)`, `svc-(i+2)`",
        f"- starts: {COLD}. If that is not done within {settings.cold_limit:g} s, a fresh control plane and "
        f"{WARM} (limit {WARM_LIMIT:g} s)",
        f"- changes: {settings.changes} per N, of `svc-7` ({', '.join(CHANGE_KINDS)}, in turn), one at a time. "
        "all-ACKed: from the change until the last of the N sidecars sent the ACK of the push that carried it; "
        "per-sidecar: every (change, sidecar); CP histogram: `meshlet_cp_convergence_seconds` at the end "
        "(the control plane keeps its last 5,000-10,000 ACKs, of any push)",
    ]
    if settings.store == "etcd":
        lines += [
            f"- replicas: {settings.replicas} control planes `--store etcd://...` on one etcd member "
            f"({etcd_version()}; `{' '.join(ETCD_FLAGS)}`), a fresh etcd for each start. Sidecar i connects to "
            f"replica i % {settings.replicas}; sidecar 7 (unready/ready) is on replica {FLIPPER % settings.replicas}, "
            "the extra `svc-7` instances (join/bye) on replica 0. Sessions per replica from each replica's "
            "`meshlet_cp_connected_sidecars` (start) and /v1/status (end). etcd put→watch: a watch on a scratch "
            f"prefix and {PROBE_PUTS} sequential puts, from just before a put is sent until its event arrives, "
            "through the HTTP/JSON gateway the replicas use (httpx from this script, on the load's core)",
        ]
    lines.append("")
    lines += [markdown_table(table) for table in tables]
    problems = [f"- N={r.n:,}: {p}" for r in results for p in shown(r.problems)]
    lines += ["### Problems seen", "", *(problems or ["- none"]), ""]
    return "\n".join(lines)


def etcd_version() -> str:
    first = subprocess.run(["etcd", "--version"], capture_output=True, text=True, check=False).stdout.partition("\n")[0]
    return first.strip() or "etcd"


def write_section(path: Path, section: str, title: str = SECTION) -> None:
    """Replace this benchmark's section ``title`` of ``path`` (or append it); keep everything else."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^# |^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text.rstrip("\n") + "\n")


# --- main --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    changes: int
    workers: int | None
    concurrency: int
    cold_limit: float
    pin: bool
    out: Path
    replicas: int = 1
    store: str = "file"  # or etcd: a fresh etcd for each start, the replicas on it

    @property
    def section(self) -> str:
        return SECTION if self.replicas == 1 else REPLICAS_SECTION


def parse_settings(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", metavar="N[,N...]", help="sizes to run (default 1000,5000)")
    parser.add_argument("--quick", action="store_true", help="8 changes, N=200 unless --sidecars: a smoke check")
    parser.add_argument("--changes", type=int, default=20, help="endpoint changes measured per N (default 20)")
    parser.add_argument(
        "--workers", type=int, help=f"load processes (default one per {SIDECARS_PER_WORKER:,} sidecars)"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=200, help="sidecars connecting at once (default 200)"
    )
    parser.add_argument(
        "--cold-limit",
        type=float,
        default=COLD_LIMIT,
        metavar="SECONDS",
        help=f"give the cold start this long to get all N synced, else warm start (default {COLD_LIMIT:g})",
    )
    parser.add_argument("--replicas", type=int, default=1, metavar="K", help="control-plane replicas (default 1)")
    parser.add_argument(
        "--store", choices=("file", "etcd"), help="the control plane's store (default: etcd with --replicas > 1)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the control plane and the load to cores")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="PATH", help=f"results file (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    try:
        sidecars = args.sidecars or ("200" if args.quick else "1000,5000")
        sizes = tuple(int(n) for n in sidecars.split(","))
    except ValueError:
        parser.error(f"--sidecars {args.sidecars!r}: expected numbers like 1000,5000")
    if any(n < SERVICES for n in sizes):
        parser.error(f"every N must be at least {SERVICES} (one sidecar per service)")
    pin = not args.no_pin and {CP_CORE, LOAD_CORE} <= os.sched_getaffinity(0)
    if not args.no_pin and not pin:
        console.print(f"[yellow]cores {CP_CORE} and {LOAD_CORE} are not both available: not pinning[/yellow]")
    store = args.store or ("etcd" if args.replicas > 1 else "file")
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.replicas > 1 and store != "etcd":
        parser.error("replicas share their state through etcd: --replicas > 1 needs --store etcd")
    if store == "etcd" and shutil.which("etcd") is None:
        parser.error("--store etcd needs etcd on PATH (Debian: apt-get install etcd-server)")
    changes = 8 if args.quick else args.changes
    settings = (sizes, changes, args.workers, args.connect_concurrency, args.cold_limit, pin, args.out)
    return Settings(*settings, args.replicas, store)


async def run(settings: Settings) -> list[SizeResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="meshlet-cp-scale-") as tmp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_interrupt_on_sigterm)
            try:
                for n in settings.sizes:
                    announce(f"N = {n:,}: a fresh control plane and {n:,} simulated sidecars")
                    results.append(await measure_size(n, settings, Path(tmp)))
            finally:
                save_logs(Path(tmp))
            nursery.cancel_scope.cancel()
    return results


async def _interrupt_on_sigterm() -> None:
    """SIGTERM as Ctrl-C: every phase is cancelled and every child stopped."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            raise KeyboardInterrupt("SIGTERM")


def save_logs(tmp: Path) -> None:
    """Keep the control planes' and load processes' logs (the temporary directory goes away)."""
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    for path in tmp.glob("*.log"):
        shutil.copy(path, LOGS / path.name)
    console.print(f"[dim]logs of this run: {LOGS.relative_to(REPO)}/[/dim]")


def announce(message: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] [bold cyan]▶[/bold cyan] {message}")


def unwrap(exc: BaseException) -> BaseException:
    """The one exception inside trio's nested exception groups, if there is one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        return worker(argv[1:])
    settings = parse_settings(argv)
    raise_fd_limit(max(settings.sizes) + 2000)  # the control plane inherits it
    if settings.pin:
        os.sched_setaffinity(0, {LOAD_CORE})
    started, clock, interference = datetime.now().astimezone(), now(), Interference.start()
    code = code_fingerprint()  # what the control planes load
    try:
        results = trio.run(run, settings)
    except BaseException as group:
        exc = unwrap(group)
        if isinstance(exc, KeyboardInterrupt):
            console.print("[yellow]interrupted; everything started was stopped[/yellow]")
            return 130
        if isinstance(exc, RuntimeError | trio.TooSlowError | httpx.HTTPError):
            console.print("[bold red]benchmark failed:[/bold red]", escape(f"{type(exc).__name__}: {exc}"))
            return 1
        raise
    tables = [start_table(results, settings.replicas), steady_table(results)]
    if settings.store == "etcd":
        tables += [replicas_table(results), probe_table(results)]
    tables.append(target_table(build_targets(results, settings.replicas)))
    print_results(tables, results)
    noise = interference.describe()
    console.print(f"[dim]{noise}[/dim]")
    section = render_section(tables, results, settings, started, now() - clock, noise, code)
    write_section(settings.out, section, settings.section)
    announce(f"done in {now() - clock:.0f} s; results in {settings.out} ({settings.section!r})")
    return 0


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cp_scale.py _worker")
    parser.add_argument("--ports", required=True, help="the replicas' push ports, comma-separated")
    for name in ("--first", "--step", "--total", "--concurrency"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="exit after this many seconds, whatever happens")
    parser.add_argument("--join-token-file", type=Path, required=True, help="the control plane's bootstrap token")
    trio.run(worker_main, parser.parse_args(argv))  # SIGTERM: the default, exit at once
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
