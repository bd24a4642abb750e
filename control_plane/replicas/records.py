"""What replicas keep in etcd besides the store's own items, and how each record is spelled.

Pure: bytes in, values out. Everything read from etcd is untrusted (anyone with access to etcd
can write there): a record that does not decode, or whose key and content disagree, raises
:class:`RecordError` naming the key and the fault, and the caller skips it (logged), so one bad
key never stops a replica or becomes an endpoint.

The layout under the store's prefix (docs/architecture.md, "Replicas on etcd"):

``registry/instances/<instance id>``
    One registered instance as JSON, attached to the lease of the replica holding its sidecar's
    session: if that replica dies, the instance goes one TTL later unless its sidecar reconnected
    to another replica, which writes the key again under its own lease.
``replicas/<replica id>``
    A replica's card (its addresses, sessions, version) as JSON, under its lease: it disappears
    when the replica does.
``leader``
    The id of the replica that does what must happen once (CA rotation, compaction), under that
    replica's lease: created only if absent (an etcd transaction), so there is one at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..ownership import Owner
from ..registry import Instance

INSTANCES = "registry/instances/"
REPLICAS = "replicas/"
LEADER = "leader"
MAX_RECORD = 64 * 1024  # an instance is a few hundred bytes; labels are bounded by the hello
REPLICA_ID = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")


class RecordError(ValueError):
    """A record in etcd that cannot be used; the message names the key and why."""


def instance_key(instance_id: str) -> str:
    return INSTANCES + instance_id


def encode_instance(instance: Instance, replica: str, connected: bool) -> bytes:
    """An instance as its replica writes it: every field of :class:`Instance`, who holds its
    session (``replica``) and whether that session is open."""
    body: dict[str, Any] = {
        "service": instance.service,
        "instance_id": instance.instance_id,
        "address": instance.address,
        "admin": instance.admin,
        "labels": dict(instance.labels),
        "node": instance.node,
        "app_port": instance.app_port,
        "protocol": instance.protocol,
        "ready": instance.ready,
        "owner": None if instance.owner is None else [instance.owner.identity, instance.owner.host],
        "replica": replica,
        "connected": connected,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    instance: Instance
    replica: str  # whose session registered it
    connected: bool  # that session is open


def decode_instance(key: str, raw: bytes) -> InstanceRecord:
    """The record at ``key``; RecordError if it is not one, or not the instance its key names."""
    body = _json_object(key, raw)
    owner = body.get("owner")
    if owner is not None and not (
        isinstance(owner, list) and len(owner) == 2 and all(isinstance(part, str) for part in owner)
    ):
        raise RecordError(f"{key}: owner {owner!r} is not [identity, host]")
    replica, connected = body.get("replica"), body.get("connected")
    if not isinstance(replica, str) or not REPLICA_ID.fullmatch(replica):
        raise RecordError(f"{key}: replica {replica!r} is not a replica id")
    if not isinstance(connected, bool):
        raise RecordError(f"{key}: connected {connected!r} is not true or false")
    labels = body.get("labels", {})
    if not isinstance(labels, Mapping):
        raise RecordError(f"{key}: labels are not a map")
    try:
        instance = Instance(
            service=body.get("service"),  # type: ignore[arg-type]  # Instance checks every field
            instance_id=body.get("instance_id"),  # type: ignore[arg-type]
            address=body.get("address"),  # type: ignore[arg-type]
            admin=body.get("admin"),  # type: ignore[arg-type]
            labels=labels,
            node=body.get("node", ""),
            app_port=body.get("app_port", 0),
            protocol=body.get("protocol", ""),
            ready=body.get("ready", False),
            owner=None if owner is None else Owner(owner[0], owner[1]),
        )
    except (ValueError, TypeError) as exc:
        raise RecordError(f"{key}: {exc}") from None
    if key != instance_key(instance.instance_id):
        raise RecordError(f"{key}: holds instance {instance.instance_id!r}, not the one its key names")
    return InstanceRecord(instance, replica, connected)


@dataclass(frozen=True, slots=True)
class ReplicaCard:
    """What a replica says about itself, for ``meshlet status`` and for the others."""

    id: str
    push: str  # HOST:PORT sidecars connect to
    api: str  # HOST:PORT of its HTTP API
    version: str  # meshlet's
    started: float  # Unix time
    sessions: int  # sidecar sessions open on it when it last wrote its card
    lease: int = 0  # the etcd lease its instances are under (filled in from the key, not the value)

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "push": self.push,
            "api": self.api,
            "version": self.version,
            "started": self.started,
            "sessions": self.sessions,
        }


def decode_card(key: str, raw: bytes, lease: int) -> ReplicaCard:
    body = _json_object(key, raw)
    replica = body.get("id")
    if not isinstance(replica, str) or key != REPLICAS + replica or not REPLICA_ID.fullmatch(replica):
        raise RecordError(f"{key}: id {replica!r} is not the replica its key names")
    texts = {name: body.get(name) for name in ("push", "api", "version")}
    for name, value in texts.items():
        if not isinstance(value, str) or len(value) > 256:
            raise RecordError(f"{key}: {name} {value!r} is not a short string")
    started, sessions = body.get("started"), body.get("sessions")
    if isinstance(started, bool) or not isinstance(started, int | float):
        raise RecordError(f"{key}: started {started!r} is not a time")
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 0:
        raise RecordError(f"{key}: sessions {sessions!r} is not a count")
    return ReplicaCard(replica, texts["push"], texts["api"], texts["version"], float(started), sessions, lease)  # type: ignore[arg-type]


def decode_leader(raw: bytes) -> str:
    """The leader's replica id ("" if the value is not one)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return ""
    return text if REPLICA_ID.fullmatch(text) else ""


def _json_object(key: str, raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_RECORD:
        raise RecordError(f"{key}: {len(raw)} bytes, more than a record may be ({MAX_RECORD})")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{key}: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RecordError(f"{key}: a JSON {type(body).__name__}, not an object")
    return body
