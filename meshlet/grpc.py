"""gRPC's status codes, shared by the sidecar (which classifies gRPC calls by them) and the
control plane (which counts their failures in ``meshlet stat``): their numbers and names,
and which of them are the server's fault (docs/policy.md, "gRPC")."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# A failure of the destination, as Envoy's and Linkerd's failure accrual see gRPC: the breaker,
# the outlier detector and the success rate count these; the caller's own faults
# (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED...) and a CANCELLED call are not.
SERVER_FAULTS = frozenset(
    (Status.UNKNOWN, Status.DEADLINE_EXCEEDED, Status.INTERNAL, Status.UNAVAILABLE, Status.DATA_LOSS)
)

# The ``grpc_status`` label of the per-hop metrics: the code's number ("" on a non-gRPC request).
LABELS = tuple(str(int(status)) for status in Status)
FAILED_LABELS = frozenset(LABELS[status] for status in SERVER_FAULTS)

__all__ = ["FAILED_LABELS", "LABELS", "SERVER_FAULTS", "Status"]
