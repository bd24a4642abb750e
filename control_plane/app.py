"""The control plane's composition root: store, registry, push server, HTTP API."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as serve_asgi

from meshlet.policy import read_policy_files

from .api import build_api
from .policies import PolicyStore
from .registry import Registry
from .scraper import Scraper, scrape_targets
from .server import MAX_CONNECTIONS, PushServer
from .store import open_store

log = logging.getLogger("meshlet.cp")


@dataclass
class ControlPlaneOptions:
    listen: tuple[str, int] = ("127.0.0.1", 15010)
    api: tuple[str, int] = ("127.0.0.1", 15000)
    store: str = "file"  # memory | file:PATH | etcd://...; "file" = in data_dir
    data_dir: Path = Path(".meshlet-cp")
    ttl: float = 10.0
    policy: Path | None = None  # --policy FILE|DIR: applied at start (GitOps)
    max_connections: int = MAX_CONNECTIONS  # push-channel connections at once


async def run(
    options: ControlPlaneOptions, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    registry = Registry(ttl=options.ttl)
    config = Config()
    config.bind = [f"{options.api[0]}:{options.api[1]}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("meshlet.cp.api")
    # The store keeps what must survive a restart (applied policy); the registry is
    # rebuilt by the sidecars re-registering.
    async with open_store(options.store, options.data_dir) as store:
        policies = PolicyStore(store)
        await policies.load()  # PolicyError: the stored policy no longer validates (the caller says so)
        if options.policy is not None:
            result = await policies.apply(
                read_policy_files(options.policy), source=f"--policy {options.policy}", now=time.time()
            )
            log.info("policy from %s: version %s (%d changes)", options.policy, result.version, len(result.changes))
        push = PushServer(registry, policies=policies, max_connections=options.max_connections, store_id=store.id)
        async with trio.open_nursery() as nursery:
            push_port = await nursery.start(push.serve, *options.listen)
            token = api_token(options.data_dir)
            scraper = Scraper(lambda: scrape_targets(registry.instances()))
            nursery.start_soon(scraper.run)
            api = build_api(push, token, scraper=scraper)
            # Starlette types the ASGI scope as a mapping and hypercorn as TypedDicts: one protocol, two spellings.
            binds = await nursery.start(partial(serve_asgi, api, config))  # type: ignore[arg-type]
            api_port = int(binds[0].rsplit(":", 1)[1])
            push.api_port = api_port
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


TOKEN_FILE = "api-token"


def api_token(data_dir: Path) -> str:
    """The write API's token: made at first start, kept 0600 in the data directory
    (docs/policy.md); `meshlet apply` on this machine reads it from there."""
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(32)  # hex: never starts with "-" (an option, to argparse)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token
