"""Who may join the push channel, and the certificates its sessions get.

A ``hello`` proves who it is in one of two ways: a join token (``tokens.verify`` against the
records: the bootstrap token of ``<data dir>/join-token`` and those ``meshlet token create``
minted) whose scope allows ``hello.service``, or a client certificate from our CA whose SPIFFE
ID names ``hello.service`` (once the push channel runs over TLS). :func:`decide` is that rule,
pure: the time and the records are passed in. The service it admits is the session's identity:
everything the session does afterwards (registering, asking for certificates) is for that
service only, whatever a message claims.

:class:`Joins` is the stateful shell the push server holds: it counts and logs refusals (once
per burst: a sidecar retrying with a bad token, or a scan, must not flood the log) and issues
certificates with the CA for an admitted service. It never logs or returns a token's secret.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from meshlet import wire

from . import ca, tokens
from .tokens import TokenRecord

log = logging.getLogger("meshlet.cp.joins")

Reason = Literal["ok", "missing", "invalid", "expired", "wrong-service", "bad-certificate"]
REFUSALS: tuple[Reason, ...] = ("missing", "invalid", "expired", "wrong-service", "bad-certificate")
_FROM_TOKEN: dict[str, Reason] = {
    "ok": "ok",
    "malformed": "invalid",
    "unknown": "invalid",
    "expired": "expired",
    "wrong-service": "wrong-service",
}
BURST_WINDOW = 10.0  # seconds: refusals within this of a logged one are counted, not logged


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to a hello: ``service`` is the proven identity (None when refused)."""

    reason: Reason
    detail: str  # for the log and the refused sidecar; never a secret
    service: str | None = None

    @property
    def ok(self) -> bool:
        return self.service is not None


def decide(
    token: str,
    service: str,
    records: Mapping[str, TokenRecord],
    now: float,
    *,
    certificate_service: str | None = None,
    certificate_error: str = "",
) -> Admission:
    """May a hello for ``service`` join? ``certificate_service``: the service the session's
    verified client certificate names (None: no certificate); ``certificate_error``: why a
    certificate it presented did not verify. A certificate, when there is one, decides; else
    the token does. ``now``: seconds since the epoch."""
    if certificate_error:
        return Admission("bad-certificate", f"the client certificate is refused: {certificate_error}")
    if certificate_service is not None:
        if certificate_service != service:
            return Admission("wrong-service", f"the client certificate is {certificate_service!r}'s, not {service!r}'s")
        return Admission("ok", "client certificate", service)
    if not token:
        return Admission("missing", "the hello carries no join token")
    verdict = tokens.verify(records, token, service, now)
    reason = _FROM_TOKEN[verdict.reason]
    return Admission(reason, verdict.detail, service if reason == "ok" else None)


class BurstLog:
    """Whether to log a refusal now: the first of a burst is logged, those within
    ``window`` seconds of it only counted (the next logged one says how many)."""

    def __init__(self, window: float = BURST_WINDOW) -> None:
        self.window = window
        self._last: float | None = None
        self.suppressed = 0

    def due(self, now: float) -> bool:
        if self._last is not None and now - self._last < self.window:
            self.suppressed += 1
            return False
        self._last = now
        return True


class Joins:
    """Admits hellos (:func:`decide` with the current records) and issues certificates.

    ``records``: every token record to check against (the bootstrap one and the minted ones);
    ``token_path``: where the bootstrap token is, for the refused sidecar's hint."""

    def __init__(
        self,
        authority: ca.Authority,
        records: Callable[[], Mapping[str, TokenRecord]],
        *,
        token_path: str,
        lifetime: float = ca.LEAF_LIFETIME,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.authority = authority
        self.records = records
        self.token_path = token_path
        self.lifetime = lifetime
        self.rng = rng or random.SystemRandom()
        self.wall = wall
        self.refused: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self.issued = 0
        self._burst = BurstLog()

    @property
    def trust_domain(self) -> str:
        return self.authority.current.trust_domain

    def admit(
        self,
        hello: wire.Hello,
        peer: str,
        now: float,
        *,
        certificate_service: str | None = None,
        certificate_error: str = "",
    ) -> Admission:
        """``now``: the monotonic clock, for the burst log (the wall clock decides expiry).
        ``certificate_*``: what the session's verified client certificate proves (TLS)."""
        admission = decide(
            hello.token,
            hello.service,
            self.records(),
            self.wall(),
            certificate_service=certificate_service,
            certificate_error=certificate_error,
        )
        if not admission.ok:
            self._refused(admission.reason, f"for service {hello.service!r} from {peer}: {admission.detail}", now)
        return admission

    def refuse_handshake(self, peer: str, why: str, now: float) -> None:
        """A TLS handshake on the push channel failed (a client certificate that does not
        verify, most often): counted as ``bad-certificate``."""
        self._refused("bad-certificate", f"from {peer}: the TLS handshake failed: {why}", now)

    def _refused(self, reason: Reason, what: str, now: float) -> None:
        self.refused[reason] += 1
        if self._burst.due(now):
            more = self._burst.suppressed
            self._burst.suppressed = 0
            log.warning(
                "join refused (%s) %s%s (counted in meshlet_cp_joins_refused_total)",
                reason,
                what,
                f"; {more} more refused since the last one logged" if more else "",
            )

    def refusal(self, admission: Admission) -> str:
        """What the refused sidecar is told: why, and what to do."""
        return (
            f"join refused ({admission.reason}): {admission.detail}; pass --join-token @{self.token_path} "
            "of the control plane, or mint one with `meshlet token create --service NAME`"
        )

    def issue(self, csr_pem: bytes, service: str) -> wire.Issued:
        """A certificate for ``service`` (the session's proven identity: the CSR's names are
        ignored) and the bundle to verify peers with; CAError if the CSR is refused."""
        now = self.wall()
        chain = self.authority.issue(csr_pem, service, now, self.rng, self.lifetime)
        not_after = x509.load_pem_x509_certificate(chain).not_valid_after_utc.timestamp()
        self.issued += 1
        return wire.Issued(chain, self.authority.bundle(now), not_after)

    def bundle(self) -> bytes:
        return self.authority.bundle(self.wall())
