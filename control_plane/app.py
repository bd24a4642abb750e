"""The control plane's composition root: store, registry, push server, HTTP API."""

from __future__ import annotations

import logging
import os
import random
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

from . import ca, tokens
from .api import build_api
from .joins import Joins
from .policies import PolicyStore
from .push_tls import PushTLS
from .registry import Registry
from .scraper import Scraper
from .server import MAX_CONNECTIONS, PushServer
from .store import open_store
from .token_records import TokenBook

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
    trust_domain: str = "meshlet.local"
    ca_cert: Path | None = None  # --ca-cert/--ca-key: the operator's root; None: <data_dir>/ca
    ca_key: Path | None = None
    cert_lifetime: float = ca.LEAF_LIFETIME  # of the sidecars' certificates


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
        book = TokenBook(store, bootstrap_join_token(options.data_dir))
        await book.load()
        joins = Joins(
            open_authority(options),
            book.records,
            token_path=str((options.data_dir / tokens.JOIN_TOKEN_FILE).absolute()),
            lifetime=options.cert_lifetime,
        )
        push = PushServer(
            registry,
            policies=policies,
            max_connections=options.max_connections,
            joins=joins,
            tls=PushTLS(lambda: joins.authority),
        )
        async with trio.open_nursery() as nursery:
            push_port = await nursery.start(push.serve, *options.listen)
            token = api_token(options.data_dir)
            scraper = Scraper(lambda: ((i.instance_id, i.admin) for i in registry.instances()))
            nursery.start_soon(scraper.run)
            api = build_api(push, token, scraper=scraper, tokens=book)
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


CA_DIRECTORY = "ca"


def open_authority(options: ControlPlaneOptions) -> ca.Authority:
    """The CA: the operator's root (--ca-cert/--ca-key), else the one in ``<data dir>/ca``,
    made at first start. CAError says why a root cannot be used."""
    now = time.time()
    if options.ca_cert is not None or options.ca_key is not None:
        if options.ca_cert is None or options.ca_key is None:
            raise ca.CAError("--ca-cert and --ca-key go together: give both, or neither for a CA of its own")
        root = ca.read_operator_root(options.ca_cert, options.ca_key, options.trust_domain, now)
        where = f"the operator's root {options.ca_cert}"
    else:
        root = ca.open_root(options.data_dir / CA_DIRECTORY, options.trust_domain, now, random.SystemRandom())
        where = f"the root in {options.data_dir / CA_DIRECTORY}"
    log.info(
        "certificate authority: %s, trust domain %s, valid until %s",
        where,
        root.trust_domain,
        root.certificate.not_valid_after_utc.strftime("%Y-%m-%d"),
    )
    return ca.Authority(root)


def bootstrap_join_token(data_dir: Path) -> tokens.TokenRecord:
    """The bootstrap join token's record, its file made at first start (0600). Where it is
    is logged, never what it holds."""
    text = tokens.bootstrap_token_file(data_dir)
    path = (data_dir / tokens.JOIN_TOKEN_FILE).absolute()
    log.info("join token in %s: sidecars join with --join-token @%s", path, path)
    return tokens.unscoped_record(text, 0.0)


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
