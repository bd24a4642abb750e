"""The private channel between a ``--workers`` supervisor and each worker it feeds.

With a control plane, the supervisor holds the push channel (one registration, one session)
and hands every worker what it applied: the pushed configuration, the static file's text,
the trace collector and the certificate with its key. Each worker has a unix socket pair of
its own, its end inherited as a descriptor: no path anyone could open, nothing in argv (the
key travels only here).

Frames: a 4-byte big-endian length, then a msgpack map whose ``t`` names it. A frame over
``MAX_FRAME``, or one that is not such a map, ends the channel (:class:`ChannelError`).

supervisor → worker
    ``config``     {seq, source, pushed, static, static_name, collector, credentials}: apply it
    ``discovered`` {service, reason, detail}: a lookup's answer (reason "": found, in the
                   configuration sent before it)
    ``drain``      stop as on SIGTERM (the supervisor has deregistered already)
worker → supervisor
    ``applied``    {seq}; ``refused`` {seq, reason}: what became of a ``config``
    ``discover``   {service}: look this service up (one the app called that is not known here)

The worker's end is :class:`SupervisorLink`: it stands where the control-plane client stands
in a sidecar of its own (lookups, the collector), and a worker takes no connection before
the first configuration arrived.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshlet import wire

from ..core import errors
from ..core.config import MeshSnapshot, load_static
from ..core.credentials import CredentialHolder, Credentials
from ..core.discovered import PushedConfig
from ..core.errors import MeshError
from ..core.services import ServiceConfig
from .control import DISCOVERY_TIMEOUT
from .exporter import Collector

log = logging.getLogger("meshlet.worker")

MAX_FRAME = wire.MAX_FRAME  # a configuration is at most what one push may carry, and then some
MAX_NAME = 253  # a service name asked for: a DNS name at most
# A lookup waits for the supervisor's, which waits for the control plane up to DISCOVERY_TIMEOUT.
LOOKUP_TIMEOUT = DISCOVERY_TIMEOUT + 1.0
_REASONS = {reason.name: reason for reason in (errors.NO_ROUTE, errors.NO_HEALTHY_ENDPOINTS)}


class ChannelError(Exception):
    """The peer broke the channel's rules (the message says how); the channel is done."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame, framed as the push channel's (meshlet.wire)."""
    try:
        return wire.frame(message, f"a {message.get('t')} frame")
    except wire.WireError as exc:
        raise ChannelError(exc.detail) from None


class Channel:
    """Frames over one end of a socket pair. ``send`` may be called from several tasks."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._frames: deque[dict[str, Any]] = deque()
        self._send_lock = trio.StrictFIFOLock()

    @classmethod
    def of(cls, sock: socket.socket) -> Channel:
        return cls(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def send(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(frame)

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the peer closed its end."""
        while not self._frames:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._feed(data)
        return self._frames.popleft()

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        try:
            messages = wire.take_frames(self._buffer, MAX_FRAME)
        except wire.WireError as exc:
            raise ChannelError(exc.detail) from None
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("t"), str):
                raise ChannelError("a frame that is not a message")
            self._frames.append(message)

    async def aclose(self) -> None:
        await self.stream.aclose()


def field(message: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    """``message[key]``, checked to be a ``kind`` (None allowed when ``optional``)."""
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ChannelError(f"{message.get('t')}.{key}: expected {kind.__name__}")
    return value


def credentials_message(credentials: Credentials | None) -> dict[str, Any] | None:
    if credentials is None:
        return None
    return {
        "chain": credentials.cert_chain,
        "key": credentials.key,
        "bundle": credentials.bundle,
        "trust_domain": credentials.trust_domain,
        "service": credentials.service,
        "not_before": credentials.not_before,
        "not_after": credentials.not_after,
    }


def _credentials(raw: dict[str, Any]) -> Credentials:
    return Credentials(
        cert_chain=field(raw, "chain", bytes),
        key=field(raw, "key", bytes),
        bundle=field(raw, "bundle", bytes),
        trust_domain=field(raw, "trust_domain", str),
        service=field(raw, "service", str),
        not_before=float(field(raw, "not_before", float)),
        not_after=float(field(raw, "not_after", float)),
    )


class _Lookup:
    __slots__ = ("detail", "done", "reason")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reason = ""
        self.detail = ""


class SupervisorLink:
    """A worker's end: the configurations it applies, the lookups it asks for."""

    def __init__(self, fd: int, credentials: CredentialHolder, apply: Callable[[MeshSnapshot], None]) -> None:
        self.fd = fd
        self.credentials = credentials
        self._apply = apply
        self.channel: Channel | None = None
        self.collector: Collector | None = None  # the control plane's trace store, with the session's token
        self._lookups: dict[str, _Lookup] = {}
        self._static: tuple[str, dict[str, ServiceConfig]] | None = None  # the text last parsed, and its services

    async def receive_first(self) -> None:
        """Before the listeners open: a worker serves nothing without its configuration."""
        self.channel = Channel.of(socket.socket(fileno=self.fd))
        message = await self.channel.receive()
        if message is None or message["t"] != "config":
            raise ChannelError("the supervisor sent no configuration")
        if not await self._configure(message):
            raise ChannelError("the first configuration was refused: nothing to serve")  # fail closed

    async def serve(self, drain: Callable[[], Awaitable[None]]) -> None:
        """Follow the supervisor; drain on its word, or when it is gone (nobody would feed us)."""
        assert self.channel is not None
        try:
            while (message := await self.channel.receive()) is not None and message["t"] != "drain":
                if message["t"] == "config":
                    await self._configure(message)
                elif message["t"] == "discovered":
                    self._answered(message)
                else:
                    raise ChannelError(f"unexpected {message['t']!r}")
        except (ChannelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.error("the channel to the supervisor failed: %s", exc)
            message = None
        if message is None:
            log.error("the supervisor is gone: draining")
        self._answer_all()
        await drain()

    async def _configure(self, message: dict[str, Any]) -> bool:
        """Apply a configuration and tell the supervisor; False: refused (the last one serves on)."""
        assert self.channel is not None
        seq = field(message, "seq", int)
        try:
            self._apply(self._snapshot(message))
        except Exception as exc:  # noqa: BLE001 - whatever it is, the supervisor NACKs with it; we serve on
            log.error("refused configuration %d: %s", seq, exc)
            await self.channel.send(encode({"t": "refused", "seq": seq, "reason": f"{type(exc).__name__}: {exc}"}))
            return False
        await self.channel.send(encode({"t": "applied", "seq": seq}))
        return True

    def _snapshot(self, message: dict[str, Any]) -> MeshSnapshot:
        """The snapshot ``message`` makes; the credentials and collector it brings installed."""
        pushed = PushedConfig.from_json(field(message, "pushed", dict))
        text = field(message, "static", str, optional=True)
        services: dict[str, ServiceConfig] = {}
        if text is not None:
            if self._static is None or self._static[0] != text:  # parsed again only when it changed
                self._static = (text, dict(load_static(text, field(message, "static_name", str)).services))
            services = self._static[1]
        raw = field(message, "credentials", dict, optional=True)
        credentials = None if raw is None else _credentials(raw)
        if credentials != self.credentials.current:  # the TLS contexts are rebuilt on a change only
            self.credentials.install(credentials)
        collector = field(message, "collector", list, optional=True)
        self.collector = None if collector is None else Collector(str(collector[0]), str(collector[1]))
        return pushed.snapshot(services, field(message, "source", str))

    # lookups ---------------------------------------------------------------------------
    async def discover(self, service: str) -> None:
        """As ControlPlaneClient.discover, through the supervisor: return once ``service``
        is in the snapshot applied, else MeshError (404 no-route, 503 no-healthy-endpoints)."""
        lookup = self._lookups.get(service)
        if lookup is None:
            if len(self._lookups) >= wire.MAX_WATCHED or len(service) > MAX_NAME:
                raise MeshError(errors.NO_ROUTE, f"no service named {service[:MAX_NAME]!r} can be looked up")
            lookup = self._lookups[service] = _Lookup()
            try:
                assert self.channel is not None
                await self.channel.send(encode({"t": "discover", "service": service}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lookups.pop(service, None)
                raise MeshError(errors.NO_HEALTHY_ENDPOINTS, "the supervisor is gone: nobody to look it up") from None
        with trio.move_on_after(LOOKUP_TIMEOUT):
            await lookup.done.wait()
        if not lookup.done.is_set():
            if self._lookups.get(service) is lookup:
                del self._lookups[service]
            raise MeshError(
                errors.NO_HEALTHY_ENDPOINTS, f"service {service!r}: no answer from the supervisor to the lookup"
            )
        if lookup.reason:
            raise MeshError(_REASONS.get(lookup.reason, errors.NO_HEALTHY_ENDPOINTS), lookup.detail)

    def _answered(self, message: dict[str, Any]) -> None:
        lookup = self._lookups.pop(field(message, "service", str), None)
        if lookup is not None:
            lookup.reason = field(message, "reason", str)
            lookup.detail = field(message, "detail", str)
            lookup.done.set()

    def _answer_all(self) -> None:
        lookups, self._lookups = self._lookups, {}
        for lookup in lookups.values():
            lookup.reason, lookup.detail = errors.NO_HEALTHY_ENDPOINTS.name, "the supervisor is gone"
            lookup.done.set()
