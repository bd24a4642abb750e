"""The control plane's composition root: store, registry, push server, HTTP API."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as serve_asgi

from .api import build_api
from .registry import Registry
from .server import PushServer
from .store import open_store

log = logging.getLogger("meshlet.cp")


@dataclass
class ControlPlaneOptions:
    listen: tuple[str, int] = ("127.0.0.1", 15010)
    api: tuple[str, int] = ("127.0.0.1", 15000)
    store: str = "file"  # PRODUCT §3: memory | file:PATH | etcd://...; "file" = in data_dir
    data_dir: Path = Path(".meshlet-cp")
    ttl: float = 10.0


async def run(
    options: ControlPlaneOptions, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    registry = Registry(ttl=options.ttl)
    push = PushServer(registry)
    config = Config()
    config.bind = [f"{options.api[0]}:{options.api[1]}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("meshlet.cp.api")
    # The store keeps what must survive a restart (applied policy, static services: issue 4);
    # the registry is rebuilt by the sidecars re-registering.
    async with open_store(options.store, options.data_dir), trio.open_nursery() as nursery:
        push_port = await nursery.start(push.serve, *options.listen)
        binds = await nursery.start(partial(serve_asgi, build_api(push), config))
        api_port = int(binds[0].rsplit(":", 1)[1])
        task_status.started({"push": push_port, "api": api_port})
        print(
            f"meshlet control-plane ready push={options.listen[0]}:{push_port} api={options.api[0]}:{api_port}",
            flush=True,
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %s: stopping", signal.Signals(signum).name)
                break
        nursery.cancel_scope.cancel()
