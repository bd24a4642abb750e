"""``--workers N``: N sidecar processes sharing the listeners, one supervisor.

The supervisor fixes every listener's port first (a port-0 listener becomes a real
port, held by a bound but not listening SO_REUSEPORT socket so nobody else takes it),
then starts N workers that each bind the same ports with SO_REUSEPORT: the kernel
spreads connections across them. Workers serve the data path; their own admin
listeners are private (loopback, port 0). The supervisor serves the public admin
listener and answers /metrics and /clusters by adding up every worker's counters
(fetched as JSON from ``/_worker/snapshot``), so the numbers are the sidecar's, not
one worker's. A worker that dies is started again.

With a control plane the supervisor is the one sidecar the control plane sees (:class:`Feed`):
it holds the session (one registration), the key and its certificates, and hands every
worker each configuration it applied over a private channel (sidecar/net/worker_channel.py);
a worker asks it to look up services. A push is ACKed once every live worker applied it; a
worker (re)started gets the current configuration before it listens. The supervisor reports
ready when every worker serves, and on SIGTERM deregisters first, then drains every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

import meshlet
from meshlet import wire
from meshlet.io import ConnectionLimit, Deadlines, derived_connection_limits, raise_open_files_limit, startup_os_error
from meshlet.names import is_service_name

from .app import DRAIN_PROPAGATION, SidecarOptions, health_url, instance_info, state_file
from .core import errors
from .core.config import MeshSnapshot, load_static
from .core.credentials import CredentialHolder, Credentials
from .core.errors import MeshError
from .core.services import Endpoint, ServiceConfig
from .layers.base import Request, Response
from .net.admin import AdminHandler, json_response
from .net.admin_views import control_dump
from .net.control import ControlPlaneClient
from .net.control_tls import ControlPlaneTLS
from .net.downstream import Timeouts
from .net.identity import SidecarIdentity
from .net.listeners import serve_http
from .net.worker_channel import MAX_NAME, Channel, ChannelError, credentials_message, encode, field
from .telemetry import cardinality, render

log = logging.getLogger("meshlet.workers")

RESTART_DELAY = 1.0  # between a worker's death and its restart
APPLY_TIMEOUT = 10.0  # a worker that has not applied a configuration by then is stuck: restarted
# Frames queued for one worker: every lookup's answer at once (a session lost answers them all)
# and configurations (one bytes object shared by all); more means it stopped reading: restarted.
OUTBOX = wire.MAX_WATCHED + 256


@dataclass
class Worker:
    index: int
    process: trio.Process | None = None
    admin: str = ""
    ready: bool = False
    # With a control plane: what goes to it (in order), and what it made of the configurations.
    outbox: trio.MemorySendChannel[bytes] | None = None
    applied: int = 0  # the last configuration (seq) it applied
    refused: tuple[int, str] = (0, "")  # the last one it refused, and why
    lookups: int = 0  # its lookups in flight

    def kill(self, why: str) -> None:
        if self.process is not None and self.process.returncode is None:
            log.error("worker %d: %s: restarting it", self.index, why)
            self.process.kill()


def _discovered(service: str, reason: errors.Reason | None = None, detail: str = "") -> bytes:
    """A lookup's answer for a worker: found (no reason), else the MeshError to raise."""
    return encode({"t": "discovered", "service": service, "reason": reason.name if reason else "", "detail": detail})


def _worker_env() -> dict[str, str]:
    """The supervisor's environment, with the folder its own meshlet was imported from first
    on PYTHONPATH: a worker runs the supervisor's code, never a `meshlet/` folder that happens
    to be in the working directory (``python -m`` would look there first; ``-P`` stops it)."""
    root = str(Path(meshlet.__file__).resolve().parent.parent)
    inherited = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not inherited else os.pathsep.join((root, inherited))}


def _reserve(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket: fixes the port, takes no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _address(pair: tuple[str, int]) -> str:
    host, port = pair
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _RelayedCredentials(CredentialHolder):
    """The supervisor's credentials: every change (a certificate issued, a bundle) goes to the workers."""

    __slots__ = ("on_change",)

    def __init__(self) -> None:
        super().__init__()
        self.on_change: Callable[[], None] = lambda: None

    def install(self, credentials: Credentials | None) -> None:
        super().install(credentials)
        self.on_change()


class Feed:
    """The control-plane side of a supervisor: the session, the identity, and the configuration
    every worker is handed (a latest value, numbered ``seq``)."""

    def __init__(self, options: SidecarOptions, workers: list[Worker]) -> None:
        self.options = options
        self.workers = workers
        self.credentials = _RelayedCredentials()
        self.identity = SidecarIdentity(  # IdentityError: a key file we must not use
            options.service,
            self.credentials,
            join_token=options.join_token,
            join_token_file=options.join_token_file,
            directory=options.data_dir,
        )
        self.static_text: str | None = None
        self.static_services: dict[str, ServiceConfig] = {}
        self.control: ControlPlaneClient | None = None
        self.snapshot: MeshSnapshot | None = None
        self.seq = 0
        self.frame = b""  # the current configuration, encoded once for every worker
        self.configured = trio.Event()
        self._changed = trio.Event()  # a worker applied, refused or went away

    def load_static(self) -> None:
        """Read --static (at start and on SIGHUP): its text goes to the workers as it is."""
        path = self.options.static
        assert path is not None
        text = path.read_text()
        self.static_services = dict(load_static(text, str(path)).services)  # ConfigError: keep the last
        self.static_text = text
        if self.control is not None:
            self.control.reinstall("static-reload")

    def start(self, nursery: trio.Nursery, inbound: tuple[str, int], admin: tuple[str, int]) -> None:
        opts = self.options
        if opts.static is not None:
            self.load_static()
        self.identity.load_persisted()
        control = self.control = ControlPlaneClient(
            opts.control_plane,
            instance_info(opts, inbound, admin),
            self._apply,
            static=lambda: self.static_services,
            app_health_url=health_url(self._app(None), opts.health_path),
            state_file=state_file(opts),
            watch_all=opts.transparent,
            identity=self.identity,
            tls=ControlPlaneTLS(self.identity, opts.control_plane_ca),
            settle=self.settled,
            serving=lambda: all(w.ready for w in self.workers),
        )
        # A certificate issued (every session's welcome brings one, after the span token) or a
        # new bundle reaches the workers at once, with the rest of the configuration.
        self.credentials.on_change = lambda: self.publish() if self.snapshot is not None else None
        control.load_persisted()
        control.config.discovered.watched.update(n for n in opts.upstreams if is_service_name(n))
        nursery.start_soon(self.identity.watch_expiry)
        nursery.start_soon(control.serve)

    def _app(self, snapshot: MeshSnapshot | None) -> Endpoint:
        opts = self.options
        protocol = opts.app_protocol or ("" if snapshot is None else snapshot.protocols.get(opts.service, ""))
        return Endpoint(*opts.app, protocol=protocol)

    def _apply(self, snapshot: MeshSnapshot) -> None:
        self.snapshot = snapshot
        if self.control is not None and self.control.health is not None:
            self.control.health.url = health_url(self._app(snapshot), self.options.health_path)  # tcp, grpc: a connect
        self.publish()
        log.info("applied config %s from %s (%d services)", snapshot.version, snapshot.source, len(snapshot.services))

    def publish(self) -> None:
        """Number the current configuration and queue it for every worker."""
        control, snapshot = self.control, self.snapshot
        assert control is not None and snapshot is not None
        collector = control.span_collector
        self.seq += 1
        self.frame = encode(
            {
                "t": "config",
                "seq": self.seq,
                "source": snapshot.source,
                "pushed": control.config.to_json(),
                "static": self.static_text,
                "static_name": str(self.options.static),
                "collector": None if collector is None else [collector.url, collector.token],
                "credentials": credentials_message(self.credentials.current),
            }
        )
        for worker in self.workers:
            self.post(worker, self.frame)
        self.configured.set()

    def post(self, worker: Worker, frame: bytes) -> None:
        if worker.outbox is None:
            return
        try:
            worker.outbox.send_nowait(frame)
        except trio.WouldBlock:
            worker.kill(f"{OUTBOX} frames it has not read")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it is going away

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def settled(self) -> str:
        """Once every live worker applied the current configuration: "", else why not."""
        seq = self.seq
        with trio.move_on_after(APPLY_TIMEOUT):
            while True:
                live = [w for w in self.workers if w.outbox is not None]
                refused = [w for w in live if w.refused[0] == seq]
                if refused:
                    return "; ".join(f"worker {w.index}: {w.refused[1]}" for w in refused)
                if all(w.applied >= seq for w in live):
                    return ""
                await self._changed.wait()
        stuck = [w for w in self.workers if w.outbox is not None and w.applied < seq]
        for worker in stuck:
            worker.kill(f"configuration {seq} not applied within {APPLY_TIMEOUT:g}s")
        return f"worker(s) {[w.index for w in stuck]} did not apply it within {APPLY_TIMEOUT:g}s (restarted)"

    def attach(self, worker: Worker, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Serve one worker's channel in ``nursery``: the current configuration first."""
        channel = Channel.of(sock)
        send, receive = trio.open_memory_channel[bytes](OUTBOX)
        worker.outbox, worker.applied, worker.refused, worker.lookups = send, 0, (0, ""), 0
        send.send_nowait(self.frame)
        nursery.start_soon(self._write, receive, channel)
        nursery.start_soon(self._read, worker, channel, nursery)

    def detach(self, worker: Worker) -> None:
        if worker.outbox is not None:
            worker.outbox.close()
            worker.outbox = None
        self.changed()

    async def _write(self, receive: trio.MemoryReceiveChannel[bytes], channel: Channel) -> None:
        async with receive:
            async for frame in receive:
                try:
                    await channel.send(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # it died: its process ends, and a new one gets the current frame

    async def _read(self, worker: Worker, channel: Channel, nursery: trio.Nursery) -> None:
        try:
            while (message := await channel.receive()) is not None:
                kind = message["t"]
                if kind == "applied":
                    worker.applied = max(worker.applied, field(message, "seq", int))
                    self.changed()
                elif kind == "refused":
                    worker.refused = (field(message, "seq", int), field(message, "reason", str)[:1024])
                    self.changed()
                elif kind == "discover":
                    service = field(message, "service", str)[:MAX_NAME]
                    if worker.lookups >= wire.MAX_WATCHED:  # it asks once per service, as many at most
                        self.post(worker, _discovered(service, errors.NO_HEALTHY_ENDPOINTS, "too many lookups at once"))
                        continue
                    worker.lookups += 1
                    nursery.start_soon(self._lookup, worker, service)
                else:
                    raise ChannelError(f"unexpected {kind!r}")
        except (ChannelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            worker.kill(f"its channel failed: {exc}")

    async def _lookup(self, worker: Worker, service: str) -> None:
        """A worker's lookup, as the control-plane client makes it; the answer follows the
        configuration that has the service (one outbox: in order)."""
        assert self.control is not None
        answer = _discovered(service)
        try:
            await self.control.discover(service)
        except MeshError as exc:
            answer = _discovered(service, exc.reason, exc.detail)
        worker.lookups -= 1
        self.post(worker, answer)

    def readiness(self) -> tuple[bool, str]:
        if self.snapshot is None:
            return False, "no configuration applied yet"
        if why := self.identity.not_ready():
            return False, why
        return True, ""

    def telemetry(self) -> dict[str, Any]:
        """The sidecar's own gauges for /metrics, before the workers' (the first says)."""
        control, snapshot = self.control, self.snapshot
        expiry = self.identity.expires_in()
        return {
            "info": [[snapshot.version if snapshot else "", int(control.connected) if control else 0]],
            "certificate_expiry": [] if expiry is None else [[expiry]],
        }

    def config_dump(self, dump: dict[str, Any]) -> dict[str, Any]:
        assert self.control is not None
        return {**dump, "control_plane": control_dump(self.control, self.identity)}


class Supervisor:
    def __init__(self, options: SidecarOptions, count: int) -> None:
        self.options = options
        self.count = count
        self.workers = [Worker(i) for i in range(count)]
        self.reserved: list[socket.socket] = []
        self.fixed = options
        self.client = httpx.AsyncClient(timeout=5)
        self.feed = Feed(options, self.workers) if options.control_plane else None
        self.admin_address = ""
        self.draining = False
        self.stopping = False  # no restarts: every worker is to end
        self.ended = 0  # workers that ended while stopping
        self.all_ended = trio.Event()

    def fix_ports(self) -> None:
        opts = self.options
        listeners = {"inbound": opts.inbound, "outbound": opts.outbound}
        upstreams = dict(opts.upstreams)
        for name, (host, port) in list(listeners.items()):
            sock = _reserve(host, port)
            self.reserved.append(sock)
            listeners[name] = (host, sock.getsockname()[1])
        for name, (host, port) in list(upstreams.items()):
            sock = _reserve(host, port)
            self.reserved.append(sock)
            upstreams[name] = (host, sock.getsockname()[1])
        self.fixed = replace(opts, inbound=listeners["inbound"], outbound=listeners["outbound"], upstreams=upstreams)

    def worker_args(self, channel: int | None = None) -> list[str]:
        opts = self.fixed
        args = [
            sys.executable,
            "-P",  # not the working directory first on sys.path: see _worker_env
            "-m",
            "meshlet",
            "sidecar",
            "--worker",
            "--workers",  # explicit: a MESHLET_WORKERS the worker inherits must not make it a supervisor
            "1",
            "--service",
            opts.service,
            "--app",
            _address(opts.app),
            "--inbound",
            _address(opts.inbound),
            "--outbound",
            _address(opts.outbound),
            "--admin",
            "127.0.0.1:0",
            "--header-timeout",
            str(opts.header_timeout),
        ]
        if channel is not None:  # fed by this supervisor: no --static (its text comes with each configuration)
            args += ["--worker-channel", str(channel)]
        elif opts.static is not None:
            args += ["--static", str(opts.static)]
        for name, address in opts.upstreams.items():
            args += ["--upstream", f"{name}={_address(address)}"]
        if opts.trace_collector:
            args += ["--trace-collector", opts.trace_collector]
        if opts.trace_sampling is not None:
            args += ["--trace-sampling", str(opts.trace_sampling)]
        if opts.api_ca is not None:
            args += ["--api-ca", str(opts.api_ca)]
        if opts.transparent:
            args.append("--transparent")
        if opts.app_protocol:
            args += ["--app-protocol", opts.app_protocol]
        if opts.tls_files is not None:
            for flag, path in zip(("--tls-cert", "--tls-key", "--trust-bundle"), opts.tls_files, strict=True):
                args += [flag, str(path)]
        args += ["--drain-timeout", str(opts.drain_timeout)]
        for listener in ("inbound", "outbound", "admin"):  # per worker: each has its own descriptors
            value = getattr(opts, f"max_{listener}_connections")
            if value is not None:
                args += [f"--max-{listener}-connections", str(value)]
        return args

    async def run_worker(
        self, worker: Worker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        while not self.stopping:
            if self.feed is not None:
                await self.feed.configured.wait()  # nothing to serve before the first configuration
            async with trio.open_nursery() as nursery:
                process = await self._start(worker, nursery)
                try:
                    line = await _read_line(process)
                    worker.admin = _field(line, "admin")
                    worker.ready = bool(worker.admin)
                    await self._readiness_changed()
                    if not started:
                        started = True
                        task_status.started()
                    await process.wait()
                finally:
                    worker.ready = False
                    if self.feed is not None:
                        self.feed.detach(worker)
                    if process.returncode is None:
                        process.send_signal(signal.SIGTERM)
                        with trio.move_on_after(5) as scope:
                            scope.shield = True
                            await process.wait()
                        if process.returncode is None:
                            process.kill()
                    nursery.cancel_scope.cancel()
            if self.stopping:
                break
            await self._readiness_changed()
            log.error("worker %d exited with %s; restarting", worker.index, process.returncode)
            await trio.sleep(RESTART_DELAY)
        self.ended += 1
        if self.ended == len(self.workers):
            self.all_ended.set()

    async def _start(self, worker: Worker, nursery: trio.Nursery) -> trio.Process:
        """Start the worker's process; with a control plane, its channel (served in ``nursery``)
        has the current configuration queued before the process runs."""
        if self.feed is None:
            process = await trio.lowlevel.open_process(self.worker_args(), stdout=subprocess.PIPE, env=_worker_env())
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.feed.attach(worker, ours, nursery)
                process = await trio.lowlevel.open_process(
                    self.worker_args(theirs.fileno()),
                    stdout=subprocess.PIPE,
                    pass_fds=(theirs.fileno(),),
                    env=_worker_env(),
                )
            finally:
                theirs.close()  # the worker's now: its end closes when it dies, so we see it
        worker.process = process
        return process

    async def _readiness_changed(self) -> None:
        if self.feed is not None and self.feed.control is not None:
            await self.feed.control.report_readiness()

    async def snapshots(self) -> list[dict[str, Any] | None]:
        """Each worker's counters, by worker index (None: it did not answer)."""
        results: list[dict[str, Any] | None] = [None] * len(self.workers)

        async def fetch(worker: Worker) -> None:
            if not worker.ready:
                return
            try:
                response = await self.client.get(f"http://{worker.admin}/_worker/snapshot")
                results[worker.index] = response.json()
            except httpx.HTTPError as exc:
                log.warning("worker %d did not answer: %s", worker.index, exc)

        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(fetch, worker)
        return results

    async def admin(self, request: Request) -> Response:
        path = request.head.target.split(b"?", 1)[0]
        by_worker = await self.snapshots()
        snapshots = [s for s in by_worker if s is not None]
        if path == b"/workers":
            return json_response(
                [
                    {
                        "index": w.index,
                        "pid": w.process.pid if w.process else None,
                        "ready": w.ready,
                        "requests": sum(row[-1] for row in s["telemetry"]["requests"]) if s else None,
                    }
                    for w, s in zip(self.workers, by_worker, strict=True)
                ]
            )
        if path in (b"/metrics", b"/metrics/cardinality"):
            own = [] if self.feed is None else [self.feed.telemetry()]  # the session's gauges first: they win
            text = render(lambda: [*own, *(s["telemetry"] for s in snapshots)])
            handler = AdminHandler(
                metrics=lambda: text,
                ready=self.readiness,
                config_dump=dict,
                clusters=dict,
                cardinality=lambda: cardinality(text),  # each worker applies the bounds to its own series
            )
        else:
            handler = AdminHandler(
                metrics=bytes,
                ready=self.readiness,
                config_dump=lambda: self.config_dump(snapshots),
                clusters=lambda: _merge_clusters(snapshots),
                explain=lambda wanted: _explain(snapshots, wanted),
            )
        return await handler(request)

    def config_dump(self, snapshots: list[dict[str, Any]]) -> dict[str, Any]:
        """One worker's (they share the configuration), with the public admin listener and,
        with a control plane, the supervisor's session."""
        if not snapshots:
            return {}
        dump = dict(snapshots[0]["config_dump"])
        dump["listeners"] = {**dump.get("listeners", {}), "admin": self.admin_address}
        return dump if self.feed is None else self.feed.config_dump(dump)

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining (stopping)"
        if self.feed is not None and not (ready := self.feed.readiness())[0]:
            return ready
        down = [w.index for w in self.workers if not w.ready]
        if down:
            return False, f"workers not ready: {down}"
        return True, ""

    async def serve(self) -> None:
        self.fix_ports()
        opts = self.fixed
        async with trio.open_nursery() as nursery:
            deadlines = Deadlines()
            await nursery.start(deadlines.serve)
            admin_limit = opts.max_admin_connections or derived_connection_limits(raise_open_files_limit()).admin
            admin_port = await nursery.start(
                partial(
                    serve_http,
                    *opts.admin,
                    self.admin,
                    Timeouts(deadlines),
                    limit=ConnectionLimit("admin", admin_limit),
                )
            )
            self.admin_address = f"{opts.admin[0]}:{admin_port}"
            if self.feed is not None:  # the one session; workers start with its first configuration
                self.feed.start(nursery, opts.inbound, (opts.admin[0], admin_port))
            async with trio.open_nursery() as starting:  # side by side: each takes its imports' time
                for worker in self.workers:
                    starting.start_soon(nursery.start, self.run_worker, worker)
            for sock in self.reserved:  # every worker listens now
                sock.close()
            parts = [
                f"outbound={_address(opts.outbound)}",
                f"inbound={_address(opts.inbound)}",
                f"admin={self.admin_address}",
            ]
            parts += [f"upstream:{n}={_address(a)}" for n, a in opts.upstreams.items()]
            print("meshlet sidecar ready " + " ".join(parts) + f" workers={self.count}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        break
                    self.reload()
            await self.drain()
            nursery.cancel_scope.cancel()

    def reload(self) -> None:
        """SIGHUP: --static read again (by the supervisor when it feeds the workers, else by each)."""
        if self.feed is None:
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.send_signal(signal.SIGHUP)
            return
        if self.options.static is None:
            return
        try:
            self.feed.load_static()
        except Exception as exc:  # noqa: BLE001 - keep serving the last good config
            log.error("reload of %s failed, keeping the last good config:\n%s", self.options.static, exc)

    async def drain(self) -> None:
        """As one sidecar drains (docs/architecture.md): not ready, deregistered, and only then
        every worker drains (stops accepting, finishes what is in flight); we end with the last."""
        self.draining = True
        log.info("stopping: draining %d workers", len(self.workers))
        if self.feed is not None and self.feed.control is not None:
            await self.feed.control.drain()
            await trio.sleep(DRAIN_PROPAGATION)
        self.stopping = True
        drain = encode({"t": "drain"})
        for worker in self.workers:
            if self.feed is not None:
                self.feed.post(worker, drain)
            elif worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.options.drain_timeout + 5):
            await self.all_ended.wait()


def _explain(snapshots: list[dict[str, Any]], wanted: str | None) -> Any:
    """/explain across the workers: one request's explanation, or all recent ones in brief."""
    every = [e for s in snapshots for e in s.get("explanations", ())]
    if wanted:
        return next((e for e in every if e["request_id"] == wanted), None)
    every.sort(key=lambda e: e["at"], reverse=True)
    return [{k: e[k] for k in ("request_id", "at", "service", "result")} for e in every]


def _merge_clusters(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for snap in snapshots:
        for service, endpoints in snap["clusters"].items():
            into = merged.setdefault(service, {})
            for row in endpoints:
                have = into.get(row["endpoint"])
                if have is None:
                    into[row["endpoint"]] = dict(row)
                else:
                    for key, value in row.items():
                        if key != "endpoint":
                            have[key] += value
    return {service: list(rows.values()) for service, rows in merged.items()}


async def _read_line(process: trio.Process) -> str:
    assert process.stdout is not None
    buffer = b""
    with trio.move_on_after(30):
        while b"\n" not in buffer:
            data = await process.stdout.receive_some(4096)
            if not data:
                break
            buffer += data
    return buffer.decode(errors="replace").strip()


def _field(line: str, name: str) -> str:
    for item in line.split():
        key, _, value = item.partition("=")
        if key == name:
            return value
    return ""


def run_workers(options: SidecarOptions, count: int) -> int:
    from .net.identity import IdentityError

    options.reuse_port = True
    try:
        supervisor = Supervisor(options, count)
    except IdentityError as exc:
        print(f"meshlet: this sidecar's key cannot be used: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(supervisor.serve)
    except (OSError, BaseExceptionGroup) as exc:  # a group: from a nursery
        listen_error = startup_os_error(exc)  # a port in use, an address not ours
        if listen_error is None:
            raise
        print(f"meshlet: cannot listen: {listen_error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
