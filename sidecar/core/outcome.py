"""What became of one attempt, classified once for everyone who learns from it. Pure.

An attempt ends with a response head (its status, and the ``x-meshlet-error`` reason
when the next sidecar made it) or with a mesh error of our own (connect failure, reset,
timeout...). One :class:`Outcome` per attempt feeds the circuit breaker, the outlier
detector, the balancer, the retry decision and the metrics, so they never disagree
about what a failure is:

* the breaker counts 5xx responses, connect failures, resets and timeouts (Hystrix:
  failures and timeouts; a 4xx is the caller's fault, not the destination's);
* the outlier detector counts the same per endpoint (Envoy's consecutive 5xx, which
  include locally detected connect failures and resets);
* a retry happens only when the attempt matches one of the policy's ``retry_on``
  conditions (Envoy's vocabulary, docs/policy.md), the method is idempotent (or the policy
  allows others) and it was not the overall timeout that ended it.

A gRPC call's answer is classified by its gRPC status too (``grpc``, sidecar/core/grpc.py),
whatever its HTTP status: UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN and DATA_LOSS
are the destination's failures (meshlet/grpc.py), and ``retry_on`` names the statuses
worth another attempt (``unavailable``, ``cancelled``...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshlet.grpc import SERVER_FAULTS, Status

from . import errors

# RFC 9110 §9.2.2; CONNECT is never retried, POST and PATCH only when the policy says so.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
NEVER_RETRIED = frozenset((b"CONNECT",))

# retry_on's gRPC conditions (Envoy's names): a gRPC answer with one of these statuses.
GRPC_CONDITIONS = {
    "cancelled": Status.CANCELLED,
    "deadline-exceeded": Status.DEADLINE_EXCEEDED,
    "internal": Status.INTERNAL,
    "resource-exhausted": Status.RESOURCE_EXHAUSTED,
    "unavailable": Status.UNAVAILABLE,
}

_TRANSPORT = frozenset((errors.CONNECT_FAILED.name, errors.UPSTREAM_RESET.name, errors.TIMEOUT.name))


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int  # of the response the caller would get from this attempt
    reason: str = ""  # mesh reason: ours (a MeshError) or the next sidecar's x-meshlet-error
    local: bool = False  # True: this sidecar made it (no response from the upstream)
    cause: str = ""  # "refused" for a refused connection
    # A gRPC call's status, where the answer's head tells it (Trailers-Only, an HTTP error);
    # None: not a gRPC call, or its status comes in the trailers (judged at the end).
    grpc: int | None = None

    @property
    def failed(self) -> bool:
        """A failure of the destination: 5xx, no usable answer at all, or a gRPC server fault."""
        return (
            self.status >= 500
            or (self.local and self.reason in _TRANSPORT)
            or (self.grpc is not None and self.grpc in SERVER_FAULTS)
        )

    @property
    def name(self) -> str:
        """How an attempt ended, for explain and metrics: "200", "503", "connect-failed",
        "UNAVAILABLE" (a gRPC status)..."""
        if self.local:
            return self.reason
        return str(self.status) if self.grpc is None else Status(self.grpc).name


def response_outcome(status: int, mesh_reason: str = "") -> Outcome:
    return Outcome(status, mesh_reason)


def error_outcome(error: errors.MeshError) -> Outcome:
    return Outcome(error.reason.status, error.reason.name, True, error.cause)


class RetryOn:
    """A policy's ``retry_on`` conditions (and ``retriable_status_codes``), compiled."""

    __slots__ = ("connect", "refused", "reset", "statuses", "all_5xx", "gateway", "grpc")

    def __init__(self, conditions: Iterable[str], status_codes: Iterable[int] = ()) -> None:
        conditions = set(conditions)
        self.all_5xx = "5xx" in conditions  # Envoy: any 5xx, and no response at all
        self.gateway = "gateway-error" in conditions  # 502, 503, 504, and no response at all
        self.connect = "connect-failure" in conditions or self.all_5xx or self.gateway
        self.refused = "refused" in conditions
        self.reset = "reset" in conditions or self.all_5xx or self.gateway
        statuses: set[int] = set()
        if "unavailable" in conditions:
            statuses.add(503)
        if self.gateway:
            statuses.update((502, 503, 504))
        if "retriable-status-codes" in conditions:
            statuses.update(status_codes)
        self.statuses = frozenset(statuses)
        # gRPC statuses: "unavailable" is UNAVAILABLE as well as 503.
        self.grpc = frozenset(code for name, code in GRPC_CONDITIONS.items() if name in conditions)

    def matches(self, outcome: Outcome, *, per_try_timeout: bool = False) -> bool:
        """Whether this outcome is worth another attempt. ``per_try_timeout``: a timeout
        that ended this try only (the overall deadline still has time) — retried under
        5xx / gateway-error as in Envoy; the overall timeout never is."""
        if outcome.local:
            reason = outcome.reason
            if reason == errors.CONNECT_FAILED.name:
                return self.connect or (self.refused and outcome.cause == "refused")
            if reason == errors.UPSTREAM_RESET.name:
                return self.reset
            if reason == errors.TIMEOUT.name:
                return per_try_timeout and (self.all_5xx or self.gateway)
            return False  # a bad request, a protocol error: the same again would fail the same way
        status = outcome.status
        if status in self.statuses or (self.all_5xx and status >= 500):
            return True
        return outcome.grpc is not None and outcome.grpc in self.grpc


def retriable_method(method: bytes, non_idempotent: bool) -> bool:
    if method in IDEMPOTENT:
        return True
    return non_idempotent and method not in NEVER_RETRIED


__all__ = [
    "GRPC_CONDITIONS",
    "IDEMPOTENT",
    "Outcome",
    "RetryOn",
    "error_outcome",
    "response_outcome",
    "retriable_method",
]
