"""The control plane's composition root: store, registry, push server, HTTP API."""

from __future__ import annotations

import logging
import random
import secrets
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as serve_asgi

from meshlet.policy import read_policy_files
from meshlet.private_files import PrivateFileError, read_private, write_new

from . import ca, tokens
from .api import build_api
from .ca_rotation import Rotation
from .collectors import parse_allowed
from .joins import Joins
from .policies import PolicyStore
from .push_tls import PushTLS
from .registry import Registry
from .replicas.cluster import Cluster
from .replicas.shared_files import share_directory, share_file
from .scraper import Scraper, scrape_targets
from .server import MAX_CONNECTIONS, PushServer
from .session_age import MAX_SESSION_AGE
from .state_export import API_TOKEN_KEY, CA_PREFIX, JOIN_TOKEN_KEY
from .store import Store, open_store
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
    max_session_age: float = MAX_SESSION_AGE  # sidecar sessions end after this (± 10 %); 0: never
    api_tls_cert: Path | None = None  # --api-tls-cert/--api-tls-key: the API over https
    api_tls_key: Path | None = None
    # --api-read-token VALUE|@FILE: reads need a token (a secret: kept out of the repr)
    api_read_token: str | None = field(default=None, repr=False)
    allowed_collectors: tuple[str, ...] = ()  # --allowed-collector HOST[:PORT]; empty: any http(s)
    trust_domain: str = "meshlet.local"
    ca_cert: Path | None = None  # --ca-cert/--ca-key: the operator's root; None: <data_dir>/ca
    ca_key: Path | None = None
    cert_lifetime: float = ca.LEAF_LIFETIME  # of the sidecars' certificates


async def run(
    options: ControlPlaneOptions, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    config = Config()
    config.bind = [f"{options.api[0]}:{options.api[1]}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("meshlet.cp.api")
    api_tls(config, options.api_tls_cert, options.api_tls_key)  # ValueError: the files will not do
    token, read_token = api_tokens(options)
    allowed_collectors = tuple(parse_allowed(entry) for entry in options.allowed_collectors)
    # The store keeps what must survive a restart (applied policy); the registry is
    # rebuilt by the sidecars re-registering (with replicas on etcd, it is in etcd too).
    async with open_store(options.store, options.data_dir) as store:
        cluster = Cluster.of(store, options.ttl)
        if cluster is not None:  # replicas: the tokens and the CA are etcd's, the same for all
            await share_files(cluster.store, options)
            token, read_token = api_tokens(options)
        policies = PolicyStore(store, allowed_collectors)
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
        registry = Registry(ttl=options.ttl) if cluster is None else cluster.shared.registry
        push = PushServer(
            registry,
            policies=policies,
            max_connections=options.max_connections,
            max_session_age=options.max_session_age,
            store_id=store.id,
            joins=joins,
            tls=PushTLS(lambda: joins.authority),
            registrar=None if cluster is None else cluster.registrar,
        )
        ca_dir = ca_directory(options)
        on_ca_change = push.bundle_changed if cluster is None else cluster.on_ca_change(push.bundle_changed)
        rotation = Rotation(joins, ca_dir, on_ca_change)
        replica = None
        if cluster is not None:
            replica = cluster.replica(
                push,
                policies=policies,
                book=book,
                ca_dir=ca_dir,
                authority=lambda: open_authority(options),
                rotation=rotation,
            )
        async with trio.open_nursery() as nursery:
            if cluster is not None:
                # The registry, policies and leader as etcd has them, before any sidecar is served.
                await nursery.start(cluster.run)
            push_port = await nursery.start(push.serve, *options.listen)
            scraper = Scraper(lambda: scrape_targets(registry.instances()))
            nursery.start_soon(scraper.run)
            if replica is None:
                nursery.start_soon(rotation.run)  # with replicas, the leader's job
            api = build_api(
                push, token, scraper=scraper, read_token=read_token, tokens=book, rotation=rotation, replica=replica
            )
            # Starlette types the ASGI scope as a mapping and hypercorn as TypedDicts: one protocol, two spellings.
            binds = await nursery.start(partial(serve_asgi, api, config))  # type: ignore[arg-type]
            api_port = int(binds[0].rsplit(":", 1)[1])
            push.api_port, push.api_tls = api_port, config.ssl_enabled
            if replica is not None:  # on its card from now on
                replica.set_addresses(advertised(options.listen[0], push_port), advertised(options.api[0], api_port))
            task_status.started({"push": push_port, "api": api_port})
            print(
                f"meshlet control-plane ready push={options.listen[0]}:{push_port} api={options.api[0]}:{api_port}",
                flush=True,
            )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("signal %s: stopping", signal.Signals(signum).name)
                    break
            if replica is not None:
                await replica.leave()
            nursery.cancel_scope.cancel()


async def share_files(store: Store, options: ControlPlaneOptions) -> None:
    """Replicas: the API token, the bootstrap join token and our own CA (not an operator's root,
    which each replica is given) become etcd's copies (control_plane/replicas/shared_files.py)."""
    # The API token file exists (api_tokens made it): offered to etcd if etcd has none.
    await share_file(store, API_TOKEN_KEY, options.data_dir / TOKEN_FILE)
    bootstrap_join_token(options.data_dir)
    await share_file(store, JOIN_TOKEN_KEY, options.data_dir / tokens.JOIN_TOKEN_FILE)
    directory = ca_directory(options)
    if directory is not None:
        open_authority(options)  # made at first start: offered to etcd if etcd has none
        await share_directory(store, CA_PREFIX, directory, ca.CERT_FILE)


def advertised(host: str, port: int) -> str:
    """HOST:PORT other replicas and `meshlet status` reach a listener at: its address, or, bound to
    every address, this host's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


CA_DIRECTORY = "ca"


def open_authority(options: ControlPlaneOptions) -> ca.Authority:
    """The CA: the operator's root (--ca-cert/--ca-key), else the one in ``<data dir>/ca``,
    made at first start. CAError says why a root cannot be used."""
    now = time.time()
    if options.ca_cert is not None or options.ca_key is not None:
        if options.ca_cert is None or options.ca_key is None:
            raise ca.CAError("--ca-cert and --ca-key go together: give both, or neither for a CA of its own")
        root = ca.read_operator_root(options.ca_cert, options.ca_key, options.trust_domain, now)
        _log_authority(f"the operator's root {options.ca_cert}", root)
        return ca.Authority(root)
    # Our own root, with the roots a rotation retired and a rotation under way (ca_rotation.py).
    authority = ca.open_authority(options.data_dir / CA_DIRECTORY, options.trust_domain, now, random.SystemRandom())
    _log_authority(f"the root in {options.data_dir / CA_DIRECTORY}", authority.current)
    for retired in authority.retired:
        log.info(
            "certificate authority: a retired root is trusted until %s (a rotation's overlap)",
            ca.iso(retired.trusted_until),
        )
    return authority


def ca_directory(options: ControlPlaneOptions) -> Path | None:
    """Where the CA this control plane rotates is kept; None for an operator's root."""
    if options.ca_cert is not None or options.ca_key is not None:
        return None
    return options.data_dir / CA_DIRECTORY


def _log_authority(where: str, root: ca.Root) -> None:
    log.info(
        "certificate authority: %s, trust domain %s, valid until %s",
        where,
        root.trust_domain,
        root.certificate.not_valid_after_utc.strftime("%Y-%m-%d"),
    )


def bootstrap_join_token(data_dir: Path) -> tokens.TokenRecord:
    """The bootstrap join token's record, its file made at first start (0600). Where it is
    is logged, never what it holds."""
    text = tokens.bootstrap_token_file(data_dir)
    path = (data_dir / tokens.JOIN_TOKEN_FILE).absolute()
    log.info("join token in %s: sidecars join with --join-token @%s", path, path)
    return tokens.unscoped_record(text, 0.0)


TOKEN_FILE = "api-token"
MAX_TOKEN_FILE = 4096
MIN_READ_TOKEN = 16  # characters: a short token can be guessed


class ApiTokenError(ValueError):
    """An API token file or value that cannot be used; the message says what to do (never the token)."""


def api_token(data_dir: Path) -> str:
    """The write API's token: made at first start, kept 0600 in the data directory
    (docs/policy.md); `meshlet apply` on this machine reads it from there. A token file that
    group or others may read, a symlink or another user's is refused (meshlet/private_files.py)."""
    path = data_dir / TOKEN_FILE
    try:
        return _token_from_file(path, in_data_dir=True)
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(32)  # hex: never starts with "-" (an option, to argparse)
    try:
        write_new(path, (token + "\n").encode())
    except FileExistsError:  # another process made it first: theirs is the token
        pass
    return _token_from_file(path, in_data_dir=True)


def api_tokens(options: ControlPlaneOptions) -> tuple[str, str | None]:
    """The write token and the read token (None: reads are open). ApiTokenError says why not."""
    token = api_token(options.data_dir)
    read_token = api_read_token(options.api_read_token)
    if read_token is not None and read_token == token:
        raise ApiTokenError("--api-read-token: give a token of its own, not the write token (api-token)")
    return token, read_token


def api_read_token(spec: str | None) -> str | None:
    """``--api-read-token VALUE|@FILE``: the token, or None when not given. A file is read as a
    private file (0600, else refused: chmod 600); the token is printable ASCII, 16+ characters."""
    if spec is None:
        return None
    if spec.startswith("@"):
        try:
            token = _token_from_file(Path(spec[1:]), in_data_dir=False)
        except FileNotFoundError:
            raise ApiTokenError(f"--api-read-token: {spec[1:]}: no such file") from None
        except ApiTokenError as error:
            raise ApiTokenError(f"--api-read-token: {error}") from None
    else:
        token = spec.strip()
    if len(token) < MIN_READ_TOKEN or not token.isascii() or not token.isprintable() or " " in token:
        raise ApiTokenError(
            f"--api-read-token: the token must be at least {MIN_READ_TOKEN} printable ASCII characters without "
            "spaces (make one with: openssl rand -hex 32)"
        )
    return token


def _token_from_file(path: Path, *, in_data_dir: bool) -> str:
    try:
        raw = read_private(path, MAX_TOKEN_FILE, what="token file", in_data_dir=in_data_dir)
    except PrivateFileError as error:
        raise ApiTokenError(str(error)) from None
    token = raw.decode("ascii", errors="replace").strip()
    if len(raw) > MAX_TOKEN_FILE or not token or "\n" in token:
        remedy = "; remove it to have a new one made" if in_data_dir else ""
        raise ApiTokenError(f"{path} does not hold one token (one line of text){remedy}")
    return token


def api_tls(config: Config, cert: Path | None, key: Path | None) -> None:
    """``--api-tls-cert``/``--api-tls-key``: serve the API over https. The key file must be
    closed to group and others (chmod 600); both are loaded once here, so a bad pair is
    refused at start with the reason, not at the first client's handshake."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        raise ValueError("give both --api-tls-cert and --api-tls-key (the API's certificate and its key)")
    try:
        read_private(key, 1, what="API TLS key", in_data_dir=False)  # the mode check; ssl reads it below
    except FileNotFoundError:
        raise ValueError(f"--api-tls-key {key}: no such file") from None
    except PrivateFileError as error:
        raise ValueError(f"--api-tls-key: {error}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except FileNotFoundError:
        raise ValueError(f"--api-tls-cert {cert}: no such file") from None
    except (ssl.SSLError, OSError) as error:
        # ssl's reasons name no key material ("PEM lib", "key values mismatch")
        raise ValueError(f"--api-tls-cert/--api-tls-key: cannot use {cert} with its key: {error}") from None
    config.certfile, config.keyfile = str(cert), str(key)
