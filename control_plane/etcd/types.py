"""What the etcd client returns and raises: plain frozen values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class EtcdError(Exception):
    """Any failure talking to etcd; the message says what. ``code`` is etcd's gRPC code when it
    answered with one; ``endpoint`` the member that answered (or the last one tried)."""

    def __init__(self, message: str, *, code: int | None = None, endpoint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.endpoint = endpoint


class EtcdUnavailable(EtcdError):
    """No member could answer: down, without a leader or quorum (gRPC code 14), or timed out."""


class Compacted(EtcdError):
    """The revision asked for was compacted away: list again, then watch from that revision + 1.
    ``compact_revision`` is 0 when etcd did not say (a range below it)."""

    def __init__(self, message: str, *, compact_revision: int = 0, code: int | None = 11, endpoint: str = "") -> None:
        super().__init__(message, code=code, endpoint=endpoint)
        self.compact_revision = compact_revision


class LeaseNotFound(EtcdError):
    """The lease expired or was revoked."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    type: Literal["put", "delete"]
    kv: KeyValue  # of a delete: the key and the revision of the delete, no value
    prev_kv: KeyValue | None  # when the watch asked for it and the key existed


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One revision's events or more, in order. ``events == ()``: a progress notification,
    everything up to ``revision`` was delivered. Else ``revision`` is the last event's."""

    revision: int
    events: tuple[Event, ...]


CompareTarget = Literal["VALUE", "VERSION", "CREATE", "MOD", "LEASE"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction, always EQUAL. A key that is absent has create_revision 0;
    a value comparison on an absent key is false."""

    key: bytes
    target: CompareTarget
    operand: bytes | int

    @classmethod
    def value(cls, key: bytes, value: bytes) -> Compare:
        return cls(key, "VALUE", value)

    @classmethod
    def version(cls, key: bytes, version: int) -> Compare:
        return cls(key, "VERSION", version)

    @classmethod
    def create_revision(cls, key: bytes, revision: int) -> Compare:
        return cls(key, "CREATE", revision)

    @classmethod
    def mod_revision(cls, key: bytes, revision: int) -> Compare:
        return cls(key, "MOD", revision)

    @classmethod
    def lease(cls, key: bytes, lease_id: int) -> Compare:
        return cls(key, "LEASE", lease_id)


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a transaction."""

    kind: Literal["put", "delete", "range"]
    key: bytes
    value: bytes = b""
    lease: int = 0
    range_end: bytes | None = None

    @classmethod
    def put(cls, key: bytes, value: bytes, lease: int = 0) -> Op:
        return cls("put", key, value, lease)

    @classmethod
    def delete(cls, key: bytes, range_end: bytes | None = None) -> Op:
        return cls("delete", key, range_end=range_end)

    @classmethod
    def range(cls, key: bytes, range_end: bytes | None = None) -> Op:
        return cls("range", key, range_end=range_end)


@dataclass(frozen=True, slots=True)
class OpResponse:
    """What one operation of a transaction returned: a range's ``kvs`` (and ``count``), a
    delete's ``deleted``; a put has neither."""

    kind: Literal["put", "delete", "range"]
    kvs: tuple[KeyValue, ...] = ()
    count: int = 0
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[OpResponse, ...]  # of the branch that ran, in order


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # granted, in seconds (etcd raises anything below its minimum)


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One endpoint's answer to a status request; ``error != ""``: it did not answer, and the
    other fields are empty. ``member_id`` and ``leader`` are hex, as etcdctl prints them."""

    endpoint: str
    member_id: str = ""
    leader: str = ""
    raft_term: int = 0
    revision: int = 0
    db_size: int = 0
    version: str = ""
    error: str = ""
