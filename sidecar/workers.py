"""``--workers N``: N sidecar processes sharing the listeners, one supervisor.

The supervisor fixes every listener's port first (a port-0 listener becomes a real
port, held by a bound but not listening SO_REUSEPORT socket so nobody else takes it),
then starts N workers that each bind the same ports with SO_REUSEPORT: the kernel
spreads connections across them. Workers serve the data path; their own admin
listeners are private (loopback, port 0). The supervisor serves the public admin
listener and answers /metrics and /clusters by adding up every worker's counters
(fetched as JSON from ``/_worker/snapshot``), so the numbers are the sidecar's, not
one worker's. A worker that dies is started again.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import httpx
import trio

from meshlet.io import ConnectionLimit, Deadlines, derived_connection_limits, raise_open_files_limit

from .app import SidecarOptions
from .layers.base import Request, Response
from .net.admin import AdminHandler, json_response
from .net.downstream import Timeouts
from .net.listeners import serve_http
from .telemetry import cardinality, render

log = logging.getLogger("meshlet.workers")

RESTART_DELAY = 1.0  # between a worker's death and its restart


@dataclass
class Worker:
    index: int
    process: trio.Process | None = None
    admin: str = ""
    ready: bool = False


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


class Supervisor:
    def __init__(self, options: SidecarOptions, count: int) -> None:
        self.options = options
        self.count = count
        self.workers = [Worker(i) for i in range(count)]
        self.reserved: list[socket.socket] = []
        self.fixed = options
        self.client = httpx.AsyncClient(timeout=5)

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

    def worker_args(self) -> list[str]:
        opts = self.fixed
        args = [
            sys.executable,
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
        if opts.static is not None:
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
        while True:
            process = await trio.lowlevel.open_process(self.worker_args(), stdout=subprocess.PIPE)
            worker.process = process
            try:
                line = await _read_line(process)
                worker.admin = _field(line, "admin")
                worker.ready = bool(worker.admin)
                if not started:
                    started = True
                    task_status.started()
                await process.wait()
            finally:
                worker.ready = False
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(5) as scope:
                        scope.shield = True
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
            log.error("worker %d exited with %s; restarting", worker.index, process.returncode)
            await trio.sleep(RESTART_DELAY)

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
            text = render(lambda: [s["telemetry"] for s in snapshots])
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
                config_dump=lambda: snapshots[0]["config_dump"] if snapshots else {},
                clusters=lambda: _merge_clusters(snapshots),
                explain=lambda wanted: _explain(snapshots, wanted),
            )
        return await handler(request)

    def readiness(self) -> tuple[bool, str]:
        down = [w.index for w in self.workers if not w.ready]
        if down:
            return False, f"workers not ready: {down}"
        return True, ""

    async def serve(self) -> None:
        self.fix_ports()
        opts = self.fixed
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                await nursery.start(self.run_worker, worker)
            for sock in self.reserved:  # every worker listens now
                sock.close()
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
            parts = [
                f"outbound={_address(opts.outbound)}",
                f"inbound={_address(opts.inbound)}",
                f"admin={opts.admin[0]}:{admin_port}",
            ]
            parts += [f"upstream:{n}={_address(a)}" for n, a in opts.upstreams.items()]
            print("meshlet sidecar ready " + " ".join(parts) + f" workers={self.count}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        break
                    for worker in self.workers:  # reload: every worker rereads --static
                        if worker.process is not None and worker.process.returncode is None:
                            worker.process.send_signal(signal.SIGHUP)
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.send_signal(signal.SIGTERM)
            nursery.cancel_scope.cancel()


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
    options.reuse_port = True
    supervisor = Supervisor(options, count)
    try:
        trio.run(supervisor.serve)
    except OSError as exc:
        print(f"meshlet: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
