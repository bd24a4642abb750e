"""etcd v3 over its HTTP/JSON gateway: the client (client.py), its wire format (codec.py) and the
control plane's store on it (store.py)."""

from .client import Etcd, Watch
from .codec import prefix_end
from .types import (
    Compacted,
    Compare,
    EtcdError,
    EtcdUnavailable,
    Event,
    KeyValue,
    Lease,
    LeaseNotFound,
    MemberStatus,
    Op,
    OpResponse,
    TxnResult,
    WatchBatch,
)

__all__ = [
    "Compacted",
    "Compare",
    "Etcd",
    "EtcdError",
    "EtcdUnavailable",
    "Event",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "MemberStatus",
    "Op",
    "OpResponse",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "prefix_end",
]
