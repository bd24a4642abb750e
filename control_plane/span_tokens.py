"""Span tokens: what lets a sidecar write its own spans, and only those, to the trace store.

Each push-channel session is given a fresh random token in its ``welcome``; the sidecar
sends it as ``Authorization: Bearer TOKEN`` when it posts spans to this control plane's
store (``POST /api/v2/spans``), and to no other collector. The store takes a batch only
with a live span token, or with the API's write token (an operator, or a Zipkin client the
operator gave it to); anything else is 401. A span token names the service of the session
it was given to: of its batches, only spans whose local service is that one are stored,
the others are dropped and counted. A token dies with its session, after :data:`GRACE`
seconds for spans still on their way (a draining sidecar's last requests: its drain
lasts 30 s by default, then one export interval and one POST).

Only a hash of each token is held, so a lookup's timing says nothing about the tokens
(and a dump of this process's memory holds none). Pure: ``now`` is passed in (seconds on
one monotonic clock, ``trio.current_time()``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

from .ownership import Burst

log = logging.getLogger("meshlet.cp.spans")

GRACE = 35.0  # seconds a token outlives its session (see the module doc)
PREFIX = "mst_"  # meshlet span token: recognisable in a leak scan
EVERY_SERVICE = "*"  # what the API's write token may write spans for
SPAN_REFUSALS = ("other-service",)  # spans dropped from an accepted batch, by reason
POST_REFUSALS = ("no-token", "unknown-token")  # batches refused whole (401), by reason


def new_token() -> str:
    """A fresh span token: 256 random bits."""
    return PREFIX + secrets.token_urlsafe(32)


@dataclass(slots=True)
class _Grant:
    service: str
    expires_at: float = math.inf  # until its session ends


class SpanTokens:
    """The live span tokens (by hash) and the service each may write spans for."""

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        self._grants: dict[bytes, _Grant] = {}
        self._sessions: dict[int, bytes] = {}  # id(session) → its token's hash
        self._ending: deque[tuple[float, bytes]] = deque()  # (expires at, hash), oldest first
        self.spans_refused = dict.fromkeys(SPAN_REFUSALS, 0)
        self.posts_refused = dict.fromkeys(POST_REFUSALS, 0)
        self._burst = Burst()

    def grant(self, session: object, token: str, service: str) -> None:
        """``token`` (given to ``session`` in its welcome) writes spans of ``service``."""
        digest = _digest(token)
        self._grants[digest] = _Grant(service)
        self._sessions[id(session)] = digest

    def revoke(self, session: object, now: float) -> None:
        """``session`` ended: its token lives ``grace`` seconds more. Idempotent."""
        digest = self._sessions.pop(id(session), None)
        grant = self._grants.get(digest) if digest is not None else None
        if digest is None or grant is None:
            return
        grant.expires_at = now + self.grace
        self._ending.append((grant.expires_at, digest))
        self._forget(now)

    def service(self, token: str, now: float) -> str | None:
        """The service ``token`` writes spans for; None if it is not (or no longer) a live token."""
        self._forget(now)
        grant = self._grants.get(_digest(token))
        if grant is None or grant.expires_at <= now:
            return None
        return grant.service

    def writer(self, authorization: str, api_token: str | None, now: float) -> str | None:
        """Whose spans a POST with this ``Authorization`` header may write: a service,
        :data:`EVERY_SERVICE` (the API's write token), or None (refused, counted)."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self.posts_refused["no-token"] += 1
            return None
        if api_token is not None and hmac.compare_digest(token.encode(), api_token.encode()):
            return EVERY_SERVICE
        service = self.service(token, now)
        if service is None:
            self.posts_refused["unknown-token"] += 1
        return service

    def keep(self, spans: list[dict[str, Any]], writer: str, now: float) -> list[dict[str, Any]]:
        """The spans of ``spans`` that ``writer`` may store; the others are counted (and the
        first of a burst logged, without the token)."""
        if writer == EVERY_SERVICE:
            return spans
        kept = [span for span in spans if _local_service(span) == writer]
        dropped = len(spans) - len(kept)
        if dropped:
            self.spans_refused["other-service"] += dropped
            if self._burst.starts(now):
                log.warning(
                    "spans refused: a sidecar of %s posted %d span(s) of another service (counted in "
                    "meshlet_cp_spans_refused_total, not logged again in this burst)",
                    writer,
                    dropped,
                )
        return kept

    def __len__(self) -> int:
        return len(self._grants)

    def _forget(self, now: float) -> None:
        ending = self._ending
        while ending and ending[0][0] <= now:
            _, digest = ending.popleft()
            grant = self._grants.get(digest)
            if grant is not None and grant.expires_at <= now:
                del self._grants[digest]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _local_service(span: dict[str, Any]) -> str:
    local = span.get("localEndpoint") or {}
    name = local.get("serviceName", "") if isinstance(local, dict) else ""
    return name.lower() if isinstance(name, str) else ""


__all__ = ["EVERY_SERVICE", "GRACE", "SpanTokens", "new_token"]
