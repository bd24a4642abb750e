"""The push channel's wire protocol: frames, messages and both ends' state, sans-IO.

Both packages import this module (the sidecar is the client, the control plane the
server); nothing else crosses between them. No sockets, no clock, no randomness here:
bytes in (``receive_data``) → messages out; calls in → bytes out. docs/protocol.md is
the reader's version of this file, with examples.

Frames
------
A frame is a 4-byte big-endian length, then that many bytes of one msgpack map (the
message). A frame over ``MAX_FRAME`` bytes, bytes that are not msgpack, or a message
that is not a map with a known ``k`` (kind) is a :class:`WireError`: the receiver sends
an ``error`` message if it can and closes the connection.

Semantics (xDS semantics)
-----------------------------------------------------------
* The sidecar opens with ``hello`` (protocol versions it speaks, who it is, and the
  resource versions it already has, so a reconnect costs only what changed). The
  control plane answers ``welcome`` with the version chosen (the highest both speak),
  or ``error`` + close when there is none.
* ``push`` carries resources of one type. Every resource has a version (a content
  hash), every push a fresh nonce. The sidecar answers each push with ``ack`` (the new
  type version, the nonce) or ``nack`` (the previous type version, the nonce, the
  reason and the names it rejected). It applies the valid resources of a nacked push.
* Endpoint resources may be deltas: ``add`` / ``remove`` against the version the
  sidecar has (``base``); the resulting content must hash to ``ver``, else the sidecar
  nacks and the control plane sends the whole resource.
* The first push of each type on a connection is ``full``: it accounts for every
  resource: those the sidecar lacks or holds at another version are listed, those it
  holds (``hello``'s ``have``) that no longer exist are in ``rm``, and names neither
  listed nor removed are current. Until that first push arrives, the sidecar keeps its
  cache.
* ``ping`` / ``pong`` both ways; a peer silent for 3 ping intervals is dead.
* ``health`` reports the app's readiness; ``bye`` deregisters (draining) before close.
* ``welcome`` names the control plane's store (``store``, its id) and ``hello`` the store
  the sidecar's policies came from: a sidecar keeps policies that a control plane on
  another store (an empty one) would remove (docs/security.md).
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSIONS = (1, 2, 3)  # spoken by this build, oldest first
WATCH_VERSION = 2  # the first version with subscriptions (hello.watch, the watch message)
IDENTITY_VERSION = 3  # the first version with certificates (the csr, cert and bundle messages)
MAX_FRAME = 16 * 1024 * 1024  # far above any real snapshot; bounds what a peer can make us buffer
# Until its hello is accepted a peer is nobody: the control plane buffers at most this much for
# it. A hello lists what the sidecar holds and watches (~30 bytes a name): thousands of services.
HELLO_MAX_FRAME = 256 * 1024
_HEADER = struct.Struct(">I")
# Bounds on the identity fields (a P-256 CSR is ~0.5 KB of PEM, a leaf ~0.8 KB, a root ~0.7 KB):
# a peer that sends more is not sending one of these.
MAX_TOKEN_TEXT = 128  # a join token is 60 characters
MAX_CSR_PEM = 4 * 1024
MAX_CHAIN_PEM = 16 * 1024
MAX_BUNDLE_PEM = 64 * 1024  # a few roots while a CA rotates

# Resource types, in the order a snapshot is pushed (make-before-break, as xDS's ADS).
ENDPOINTS = "endpoints"
POLICIES = "policies"
RESOURCE_TYPES = (ENDPOINTS, POLICIES)


class WireError(Exception):
    """Bytes or a message that break the protocol; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- messages --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource at one version. ``body`` None means "does not exist".
    For a delta, ``body`` is None and ``add``/``remove`` apply to version ``base``."""

    name: str
    version: str
    body: Any = None
    base: str | None = None
    add: tuple[Any, ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def is_delta(self) -> bool:
        return self.base is not None

    @property
    def missing(self) -> bool:
        """The control plane has no such resource (yet): the answer to a watched name
        that does not exist. It is pushed if it appears."""
        return self.base is None and self.body is None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ver": self.version}
        if self.base is not None:
            out["base"] = self.base
            out["add"] = list(self.add)
            out["remove"] = list(self.remove)
        else:
            out["body"] = self.body
        return out

    @classmethod
    def from_wire(cls, raw: Any) -> Resource:
        raw = _map(raw, "resource")
        name, version = _str(raw, "name"), _str(raw, "ver")
        if "base" in raw:
            return cls(
                name,
                version,
                None,
                _str(raw, "base"),
                tuple(_list(raw, "add")),
                tuple(str(x) for x in _list(raw, "remove")),
            )
        return cls(name, version, raw.get("body"))


@dataclass(frozen=True, slots=True)
class Hello:
    """Sidecar → control plane, first message."""

    protocol_versions: tuple[int, ...]
    node: str
    service: str
    instance: Mapping[str, Any]  # instance_id, address, admin, labels
    have: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # type → {name: version}
    # v2: type → the names the sidecar subscribes to; a type not named here is a wildcard
    # (every resource of it), which is all protocol version 1 knows.
    watch: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    store: str = ""  # the id of the store its policies came from; "": none held, or not known
    # v3: the credential of a first join (a join token; never in a repr, so never in a log) and
    # a certificate signing request (PEM) for the key the sidecar made.
    token: str = field(default="", repr=False)
    csr: bytes = b""
    kind = "hello"

    def to_wire(self) -> dict[str, Any]:
        out = {
            "k": "hello",
            "pv": list(self.protocol_versions),
            "node": self.node,
            "service": self.service,
            "instance": dict(self.instance),
            "have": {t: dict(v) for t, v in self.have.items()},
        }
        if self.watch:  # absent, a version-1 hello stays byte for byte what it was
            out["watch"] = {t: list(names) for t, names in self.watch.items()}
        if self.store:
            out["store"] = self.store
        out.update(_credentials_to_wire(self.token, self.csr))
        return out

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Hello:
        versions = _list(raw, "pv")
        if not versions or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
            raise WireError("bad-message", "hello.pv must be a non-empty list of integers")
        have = _map(raw.get("have", {}), "hello.have")
        watch = _map(raw.get("watch", {}), "hello.watch")
        return cls(
            tuple(versions),
            _str(raw, "node"),
            _str(raw, "service"),
            _map(raw.get("instance"), "hello.instance"),
            {str(t): {str(n): str(v) for n, v in _map(names, "hello.have[type]").items()} for t, names in have.items()},
            {str(t): _names(names, "hello.watch[type]") for t, names in watch.items()},
            _store_id(raw),
            *_credentials_from_wire(raw),
        )


@dataclass(frozen=True, slots=True)
class Welcome:
    """Control plane → sidecar: the protocol version both will speak."""

    protocol_version: int
    server: str
    api_port: int = 0  # the control plane's HTTP API (its trace store), on the host the sidecar dialled; 0: not said
    store: str = ""  # the id of the control plane's store; "": not said (a build before store ids)
    # What this session's spans carry to that store (Authorization: Bearer); "": not given. A secret: not in repr.
    span_token: str = field(default="", repr=False)
    api_tls: bool = False  # that API speaks https (--api-tls-cert): spans go to https://
    issued: Issued | None = None  # v3: the certificate issued for the hello's CSR
    kind = "welcome"

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": "welcome", "pv": self.protocol_version, "server": self.server}
        if self.api_port:
            out["api"] = self.api_port
        if self.store:
            out["store"] = self.store
        if self.span_token:
            out["span_token"] = self.span_token
        if self.api_tls:
            out["api_tls"] = True
        if self.issued is not None:
            out["cert"] = self.issued.to_wire()
        return out

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Welcome:
        api = raw.get("api", 0)
        api_port = api if isinstance(api, int) and 0 < api < 65536 else 0
        return cls(
            _int(raw, "pv"),
            _str(raw, "server"),
            api_port,
            _store_id(raw),
            _span_token(raw.get("span_token")),
            raw.get("api_tls") is True,
            issued=None if raw.get("cert") is None else Issued.from_wire(raw["cert"], "welcome.cert"),
        )


_SPAN_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")


def _span_token(value: Any) -> str:
    """A span token goes into an HTTP header: anything but a plain token of 16 to 256 characters
    (a CR or LF would add headers of the control plane's choosing) is no token."""
    return value if isinstance(value, str) and _SPAN_TOKEN.fullmatch(value) else ""


@dataclass(frozen=True, slots=True)
class Push:
    """Control plane → sidecar: resources of one type."""

    type: str
    version: str  # the type version the sidecar has after applying this push
    nonce: str
    resources: tuple[Resource, ...] = ()
    removed: tuple[str, ...] = ()
    full: bool = False  # the first push of a type: accounts for everything the sidecar said it has
    kind = "push"

    def to_wire(self) -> dict[str, Any]:
        return {
            "k": "push",
            "t": self.type,
            "v": self.version,
            "n": self.nonce,
            "r": [r.to_wire() for r in self.resources],
            "rm": list(self.removed),
            "full": self.full,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Push:
        return cls(
            _str(raw, "t"),
            _str(raw, "v"),
            _str(raw, "n"),
            tuple(Resource.from_wire(r) for r in _list(raw, "r")),
            tuple(str(x) for x in _list(raw, "rm")),
            bool(raw.get("full", False)),
        )


@dataclass(frozen=True, slots=True)
class Ack:
    type: str
    version: str
    nonce: str
    kind = "ack"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "ack", "t": self.type, "v": self.version, "n": self.nonce}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Ack:
        return cls(_str(raw, "t"), _str(raw, "v"), _str(raw, "n"))


@dataclass(frozen=True, slots=True)
class Nack:
    type: str
    version: str  # the version the sidecar still runs (the previous one)
    nonce: str
    message: str
    names: tuple[str, ...]  # the rejected resources; the others were applied
    kind = "nack"

    def to_wire(self) -> dict[str, Any]:
        return {
            "k": "nack",
            "t": self.type,
            "v": self.version,
            "n": self.nonce,
            "err": {"msg": self.message, "names": list(self.names)},
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Nack:
        err = _map(raw.get("err"), "nack.err")
        return cls(
            _str(raw, "t"), _str(raw, "v"), _str(raw, "n"), _str(err, "msg"), tuple(str(x) for x in _list(err, "names"))
        )


@dataclass(frozen=True, slots=True)
class Ping:
    id: int
    kind = "ping"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "ping", "id": self.id}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Ping:
        return cls(_int(raw, "id"))


@dataclass(frozen=True, slots=True)
class Pong:
    id: int
    kind = "pong"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "pong", "id": self.id}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Pong:
        return cls(_int(raw, "id"))


@dataclass(frozen=True, slots=True)
class Health:
    """Sidecar → control plane: the local app's readiness changed."""

    ready: bool
    kind = "health"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "health", "ready": self.ready}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Health:
        ready = raw.get("ready")
        if not isinstance(ready, bool):
            raise WireError("bad-message", "health.ready must be true or false")
        return cls(ready)


@dataclass(frozen=True, slots=True)
class Bye:
    """Sidecar → control plane: deregister me now (draining), then the channel closes."""

    reason: str = ""
    kind = "bye"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "bye", "reason": self.reason}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Bye:
        return cls(str(raw.get("reason", "")))


@dataclass(frozen=True, slots=True)
class Watch:
    """Sidecar → control plane (v2): subscribe to more names of a type, or drop some.

    Every added name is answered in the next push of that type, even one the control
    plane thinks the sidecar holds (it may have dropped it), as a resource or, when it
    does not exist, as a resource with no body. Dropped names need no answer."""

    type: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    kind = "watch"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "watch", "t": self.type, "add": list(self.add), "remove": list(self.remove)}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Watch:
        return cls(
            _str(raw, "t"), _names(raw.get("add", []), "watch.add"), _names(raw.get("remove", []), "watch.remove")
        )


@dataclass(frozen=True, slots=True)
class Error:
    """Either way, before closing: why."""

    reason: str
    message: str
    kind = "error"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "error", "reason": self.reason, "msg": self.message}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Error:
        return cls(_str(raw, "reason"), _str(raw, "msg"))


# --- identities (v3) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate the control plane issued: the chain (PEM, the leaf first), the trust
    bundle (PEM, every root trusted now) and when the leaf expires (seconds since the epoch).
    The sidecar checks all of it against its own key before it uses any."""

    chain: bytes
    bundle: bytes
    not_after: float

    def to_wire(self) -> dict[str, Any]:
        return {"chain": self.chain, "bundle": self.bundle, "not_after": self.not_after}

    @classmethod
    def from_wire(cls, raw: Any, what: str) -> Issued:
        raw = _map(raw, what)
        not_after = raw.get("not_after")
        if isinstance(not_after, bool) or not isinstance(not_after, int | float) or not math.isfinite(not_after):
            raise WireError("bad-message", f"{what}.not_after must be a number of seconds")
        return cls(_pem(raw, "chain", MAX_CHAIN_PEM, what), _pem(raw, "bundle", MAX_BUNDLE_PEM, what), float(not_after))


@dataclass(frozen=True, slots=True)
class Csr:
    """Sidecar → control plane (v3): sign this request (PEM) for my session's service; the
    answer is ``cert``. Renewal on the live channel: nothing is dropped."""

    csr: bytes
    kind = "csr"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "csr", "csr": self.csr}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Csr:
        return cls(_pem(raw, "csr", MAX_CSR_PEM, "csr"))


@dataclass(frozen=True, slots=True)
class Cert:
    """Control plane → sidecar (v3): the certificate issued for the last ``csr``."""

    issued: Issued
    kind = "cert"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "cert", **self.issued.to_wire()}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Cert:
        return cls(Issued.from_wire(raw, "cert"))


@dataclass(frozen=True, slots=True)
class Bundle:
    """Control plane → sidecar (v3): the trust bundle changed (a CA rotation began or an
    overlap ended); trust these roots (PEM) from now on."""

    bundle: bytes
    kind = "bundle"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "bundle", "bundle": self.bundle}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Bundle:
        return cls(_pem(raw, "bundle", MAX_BUNDLE_PEM, "bundle"))


def _credentials_to_wire(token: str, csr: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if token:
        out["token"] = token
    if csr:
        out["csr"] = csr
    return out


def _credentials_from_wire(raw: Mapping[str, Any]) -> tuple[str, bytes]:
    """A hello's ``token`` and ``csr`` (empty when absent), bounded and typed."""
    token = raw.get("token", "")
    if not isinstance(token, str):
        raise WireError("bad-message", "hello.token must be a string")
    if len(token) > MAX_TOKEN_TEXT:
        raise WireError("bad-message", f"hello.token: {len(token)} characters (at most {MAX_TOKEN_TEXT})")
    csr = _pem(raw, "csr", MAX_CSR_PEM, "hello") if "csr" in raw else b""
    return token, csr


def _pem(raw: Mapping[str, Any], key: str, limit: int, what: str) -> bytes:
    """A PEM field: msgpack bin, ASCII, at most ``limit`` bytes. Its content is checked by
    whoever parses it (the CA, the sidecar's TLS); this only bounds and types it."""
    value = raw.get(key)
    if not isinstance(value, bytes):
        raise WireError("bad-message", f"{what}.{key} must be bytes (PEM)")
    if len(value) > limit:
        raise WireError("bad-message", f"{what}.{key}: {len(value)} bytes (at most {limit})")
    if not value.isascii():
        raise WireError("bad-message", f"{what}.{key} is not PEM (not ASCII)")
    return value


Message = Hello | Welcome | Push | Ack | Nack | Ping | Pong | Health | Bye | Watch | Error | Csr | Cert | Bundle
_FROM_WIRE: dict[str, Callable[[dict[str, Any]], Message]] = {
    cls.kind: cls.from_wire
    for cls in (Hello, Welcome, Push, Ack, Nack, Ping, Pong, Health, Bye, Watch, Error, Csr, Cert, Bundle)
}
UPSTREAM_KINDS = frozenset({"hello", "ack", "nack", "ping", "pong", "health", "bye", "watch", "error", "csr"})
MAX_WATCHED = 4096  # names per type one sidecar may watch: a bound on what it can make us keep
DOWNSTREAM_KINDS = frozenset({"welcome", "push", "ping", "pong", "error", "cert", "bundle"})
IDENTITY_KINDS = frozenset({"csr", "cert", "bundle"})  # only once version 3 is spoken


def _map(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError("bad-message", f"{what} must be a map")
    return value


def _str(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise WireError("bad-message", f"{raw.get('k', 'message')}.{key} must be a string")
    return value


def _int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError("bad-message", f"{raw.get('k', 'message')}.{key} must be an integer")
    return value


STORE_ID = re.compile(r"[0-9A-Za-z._-]{1,64}")  # a control plane's are 32 hex digits
# A policies NACK whose message starts with this names, besides rejected resources, the held
# policies the sidecar keeps because the control plane's store does not have them.
STORE_CONFLICT = "store-conflict"
# An ``error`` with this reason is no failure: the control plane ends every session after a
# maximum age (``--max-session-age``), so that sidecars spread again over its replicas. The
# sidecar reconnects at once, to the next address it was given.
SESSION_AGE = "session-age"


def _store_id(raw: Mapping[str, Any]) -> str:
    """``store`` of a hello or welcome: absent is "", anything but a short id is an error."""
    value = raw.get("store", "")
    if value == "":
        return ""
    if not isinstance(value, str) or not STORE_ID.fullmatch(value):
        raise WireError("bad-message", f"{raw.get('k', 'message')}.store must be a store id (1-64 of [0-9A-Za-z._-])")
    return value


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise WireError("bad-message", f"{what} must be a list of strings")
    if len(value) > MAX_WATCHED:
        raise WireError("bad-message", f"{what}: {len(value)} names (at most {MAX_WATCHED})")
    return tuple(value)


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise WireError("bad-message", f"{raw.get('k', 'message')}.{key} must be a list")
    return value


# --- frames ----------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """One frame. Map keys keep the order of ``to_wire``: the bytes are deterministic."""
    return frame(message.to_wire(), message.kind)


def frame(value: Any, what: str) -> bytes:
    """``value`` as one frame: a 4-byte big-endian length, then its msgpack (this protocol's
    framing; the --workers supervisor's channel to its workers uses it too). ``what`` names it
    in the error when it is over MAX_FRAME."""
    body: bytes = msgpack.packb(value, use_bin_type=True)  # msgpack is untyped
    if len(body) > MAX_FRAME:
        raise WireError("frame-too-large", f"{what} is {len(body)} bytes (max {MAX_FRAME})")
    return _HEADER.pack(len(body)) + body


def take_frames(buffer: bytearray, max_frame: int) -> list[Any]:
    """The msgpack values of the whole frames at the start of ``buffer``, removed from it; a
    frame not all there yet stays. WireError for a frame longer than ``max_frame`` (before
    its bytes are waited for) or one that is not msgpack."""
    values: list[Any] = []
    while len(buffer) >= 4:
        (size,) = _HEADER.unpack_from(buffer)
        if size > max_frame:
            raise WireError("frame-too-large", f"a frame of {size} bytes (max {max_frame})")
        if len(buffer) < 4 + size:
            break
        body = bytes(buffer[4 : 4 + size])
        del buffer[: 4 + size]
        try:
            values.append(msgpack.unpackb(body, raw=False, strict_map_key=True))
        except (
            ValueError,
            msgpack.exceptions.ExtraData,
            msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError,
            TypeError,
        ) as exc:
            raise WireError("bad-frame", f"not msgpack: {exc}") from None
    return values


def decode_message(raw: Any, allowed: frozenset[str] | None = None) -> Message:
    raw = _map(raw, "a message")
    kind = raw.get("k")
    from_wire = _FROM_WIRE.get(kind) if isinstance(kind, str) else None
    if from_wire is None or (allowed is not None and kind not in allowed):
        raise WireError("unknown-message", f"message kind {kind!r} is not expected here")
    return from_wire(raw)


class FrameDecoder:
    """Bytes in, whole messages out; never buffers more than one frame (≤ MAX_FRAME)."""

    def __init__(self, allowed: frozenset[str] | None = None, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._allowed = allowed
        self.max_frame = max_frame  # may be raised later (the server's, once hello is accepted)

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        return [decode_message(raw, self._allowed) for raw in take_frames(self._buffer, self.max_frame)]


# --- the two ends ----------------------------------------------------------------------


# Thousands of sessions get byte-identical pushes (the first full push of a fresh
# sidecar, the delta of a change): versions are content hashes, so a push is named by
# its type, versions, nonce and names, and its bytes are encoded once.
_PUSH_BYTES: dict[tuple[Any, ...], bytes] = {}
_PUSH_BYTES_MAX = 256


def _encode_push(message: Push) -> bytes:
    key = (
        message.type,
        message.version,
        message.nonce,
        message.removed,
        message.full,
        tuple((r.name, r.version, r.base) for r in message.resources),
    )
    data = _PUSH_BYTES.get(key)
    if data is None:
        if len(_PUSH_BYTES) >= _PUSH_BYTES_MAX:
            _PUSH_BYTES.clear()
        data = _PUSH_BYTES[key] = encode(message)
    return data


def negotiate(theirs: tuple[int, ...], ours: tuple[int, ...] = PROTOCOL_VERSIONS) -> int | None:
    common = set(theirs) & set(ours)
    return max(common) if common else None


class ServerConnection:
    """The control plane's end of one sidecar's channel.

    ``receive_data`` returns the messages to act on; the first must be ``hello`` and is
    answered by :meth:`accept` (or :meth:`reject`). :meth:`push` numbers each push;
    ``ack``/``nack`` for anything but the latest nonce of its type are stale and dropped
    here (xDS: the server never answers a stale nonce).
    """

    def __init__(
        self,
        server: str,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        api_port: int = 0,
        api_tls: bool = False,
        store: str = "",
    ) -> None:
        self.server = server
        self.versions = versions
        self.api_port = api_port  # told in welcome, with api_tls
        self.api_tls = api_tls
        self.store = store  # the store's id, told in welcome
        self.hello: Hello | None = None
        self.protocol_version: int | None = None
        self.closed = False
        self._decoder = FrameDecoder(UPSTREAM_KINDS, max_frame=HELLO_MAX_FRAME)  # MAX_FRAME once accepted
        self._nonce = 0
        self.pending: dict[str, str] = {}  # type → nonce of the push awaiting an answer
        self.acked: dict[str, str] = {}  # type → version the sidecar confirmed
        self.last_nack: Nack | None = None
        self.stale_answers = 0

    def receive_data(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        for message in self._decoder.feed(data):
            if self.hello is None:
                if not isinstance(message, Hello):
                    raise WireError("expected-hello", f"the first message must be hello, not {message.kind}")
                self.hello = message
            elif isinstance(message, Hello):
                raise WireError("unexpected-hello", "hello was already received on this channel")
            elif isinstance(message, Watch) and (self.protocol_version or 0) < WATCH_VERSION:
                raise WireError("unknown-message", f"watch needs protocol version {WATCH_VERSION}")
            elif message.kind in IDENTITY_KINDS and (self.protocol_version or 0) < IDENTITY_VERSION:
                raise WireError("unknown-message", f"{message.kind} needs protocol version {IDENTITY_VERSION}")
            elif isinstance(message, Ack | Nack):
                if self.pending.get(message.type) != message.nonce:
                    self.stale_answers += 1
                    continue
                del self.pending[message.type]
                if isinstance(message, Ack):
                    self.acked[message.type] = message.version
                else:
                    self.last_nack = message
            out.append(message)
        return out

    def choose_version(self) -> int:
        """The version both speak (the highest); WireError if there is none in common."""
        assert self.hello is not None, "choose_version() after hello"
        chosen = negotiate(self.hello.protocol_versions, self.versions)
        if chosen is None:
            raise WireError(
                "unsupported-version",
                f"sidecar speaks {list(self.hello.protocol_versions)}, control plane speaks {list(self.versions)}",
            )
        return chosen

    def accept(self, issued: Issued | None = None, span_token: str = "") -> bytes:
        """``welcome`` with the version chosen (and, v3, the certificate issued for the
        hello's CSR; and this session's ``span_token``); WireError if there is no version in
        common."""
        chosen = self.choose_version()
        if issued is not None and chosen < IDENTITY_VERSION:
            raise WireError("unsupported-version", f"certificates need protocol version {IDENTITY_VERSION}")
        self.protocol_version = chosen
        self._decoder.max_frame = MAX_FRAME
        return encode(Welcome(chosen, self.server, self.api_port, self.store, span_token, self.api_tls, issued=issued))

    @property
    def speaks_identity(self) -> bool:
        return (self.protocol_version or 0) >= IDENTITY_VERSION

    def push(
        self,
        type: str,
        version: str,
        resources: tuple[Resource, ...] = (),
        removed: tuple[str, ...] = (),
        *,
        full: bool = False,
    ) -> tuple[Push, bytes]:
        self._nonce += 1
        message = Push(type, version, str(self._nonce), resources, removed, full)
        self.pending[type] = message.nonce
        return message, _encode_push(message)

    def in_flight(self, type: str) -> bool:
        return type in self.pending

    def watches(self) -> dict[str, set[str] | None]:
        """type → the names this sidecar subscribed to in hello (None: every name)."""
        assert self.hello is not None
        scoped = (self.protocol_version or 0) >= WATCH_VERSION
        return {t: set(self.hello.watch[t]) if scoped and t in self.hello.watch else None for t in RESOURCE_TYPES}


class ClientConnection:
    """The sidecar's end. ``receive_data`` returns welcome / push / ping / pong / error;
    answer every push with :meth:`ack` or :meth:`nack`."""

    def __init__(self, hello: Hello) -> None:
        self.hello_message = hello
        self.protocol_version: int | None = None
        self._decoder = FrameDecoder(DOWNSTREAM_KINDS)
        self.received_first: set[str] = set()  # types whose first (full) push arrived

    def hello(self) -> bytes:
        return encode(self.hello_message)

    def receive_data(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        for message in self._decoder.feed(data):
            if self.protocol_version is None and not isinstance(message, Welcome | Error):
                raise WireError("expected-welcome", f"the first message must be welcome, not {message.kind}")
            if isinstance(message, Welcome):
                if message.protocol_version not in self.hello_message.protocol_versions:
                    raise WireError("unsupported-version", f"control plane chose {message.protocol_version}")
                self.protocol_version = message.protocol_version
            elif message.kind in IDENTITY_KINDS and (self.protocol_version or 0) < IDENTITY_VERSION:
                raise WireError("unknown-message", f"{message.kind} needs protocol version {IDENTITY_VERSION}")
            elif isinstance(message, Push):
                self.received_first.add(message.type)
            out.append(message)
        return out

    @property
    def can_watch(self) -> bool:
        return (self.protocol_version or 0) >= WATCH_VERSION

    def watch(self, type: str, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> bytes:
        if not self.can_watch:
            raise WireError("unsupported-version", f"watch needs protocol version {WATCH_VERSION}")
        return encode(Watch(type, add, remove))

    def csr(self, csr_pem: bytes) -> bytes:
        if (self.protocol_version or 0) < IDENTITY_VERSION:
            raise WireError("unsupported-version", f"csr needs protocol version {IDENTITY_VERSION}")
        return encode(Csr(csr_pem))

    @staticmethod
    def ack(push: Push) -> bytes:
        return encode(Ack(push.type, push.version, push.nonce))

    @staticmethod
    def nack(push: Push, previous_version: str, message: str, names: tuple[str, ...]) -> bytes:
        return encode(Nack(push.type, previous_version, push.nonce, message, names))


# --- versions ----------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return [[k, _canonical(value[k])] for k in sorted(value)]
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def canonical_bytes(value: Any) -> bytes:
    """The bytes a version hashes: msgpack of the value with maps as sorted pairs."""
    packed: bytes = msgpack.packb(_canonical(value), use_bin_type=True)  # msgpack is untyped
    return packed


def content_version(body: Any) -> str:
    """A resource's version: a hash of its content, so equal content has an equal
    version on any control-plane replica and across restarts (a reconnect to another
    replica then resends nothing). Endpoint lists must be sorted by ``id`` first."""

    return hashlib.sha256(canonical_bytes(body)).hexdigest()[:12]


def list_version(items: list[bytes]) -> str:
    """``content_version`` of a list, given each item's ``canonical_bytes``: a msgpack
    array is its header, then its items. The control plane keeps each endpoint's bytes,
    so a service of 100 instances that gains one hashes 101 cached items instead of
    re-encoding all of them."""
    n = len(items)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return hashlib.sha256(header + b"".join(items)).hexdigest()[:12]


def type_version(versions: Mapping[str, str]) -> str:
    """The version of a whole type as one sidecar holds it: its resources' versions."""
    return content_version(dict(versions)) if versions else ""


def endpoint(
    instance_id: str,
    address: str,
    labels: Mapping[str, str] | None = None,
    weight: int = 1,
    app_port: int = 0,
    *,
    mtls: bool = False,
    protocol: str = "",
) -> dict[str, Any]:
    """One endpoint as it travels in an ``endpoints`` resource body (``app_port`` only when
    known; ``mtls: true`` for a sidecar's inbound listener, which callers dial with mTLS;
    ``protocol`` only when its sidecar declared what the app speaks)."""
    body = {"id": instance_id, "address": address, "labels": dict(labels or {}), "weight": weight}
    if app_port:
        body["app_port"] = app_port
    if mtls:
        body["mtls"] = True
    if protocol:
        body["protocol"] = protocol
    return body


def apply_endpoint_delta(current: list[dict[str, Any]], resource: Resource) -> list[dict[str, Any]]:
    """The endpoint list after a delta, sorted by id; WireError when the result does not
    hash to the version the control plane announced (then the sidecar nacks)."""
    removed = set(resource.remove)
    by_id = {e["id"]: e for e in current if e["id"] not in removed}
    for item in resource.add:
        item = _map(item, "endpoint")
        by_id[_str(item, "id")] = item
    result = [by_id[k] for k in sorted(by_id)]
    if content_version(result) != resource.version:
        raise WireError(
            "delta-mismatch", f"{resource.name}: endpoints after the delta do not match version {resource.version}"
        )
    return result
