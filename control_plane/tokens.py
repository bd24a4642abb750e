"""Join tokens: what a sidecar presents on its first connection, before it holds a certificate.

A token reads ``mjt_<id>.<secret>``: ``id`` is 12 hex digits that name the token (safe to
log and to show), ``secret`` is 32 random bytes in URL-safe base64 without padding. The
control plane keeps a ``TokenRecord`` per token: the id, the SHA-256 of the secret (never the
secret, so a copy of the store lets nobody join), the service it is scoped to (None: any),
when it expires (None: never, the bootstrap token) and when it was made.

``mint`` and ``verify`` are pure: the time is passed in, and the random bytes come from a
``token_bytes`` function (``secrets.token_bytes`` unless a test passes its own).
``verify`` answers with a ``Verdict`` whose reasons never hold the secret, and compares the
hash in constant time; a wrong secret for a known id is "unknown", as an id nobody made,
so that only a holder of the secret learns whether its token expired or whom it is for.

``bootstrap_token_file`` is the file I/O: the unscoped token the control plane writes to
``<data dir>/join-token`` (0600) at first start and reads back afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meshlet.names import is_service_name
from meshlet.private_files import PrivateFileError, read_private, write_new

PREFIX = "mjt_"
JOIN_TOKEN_FILE = "join-token"
_ID_BYTES = 6  # 12 hex digits
_SECRET_BYTES = 32
_TOKEN = re.compile(r"mjt_([0-9a-f]{12})\.([A-Za-z0-9_-]{43})")  # 43: 32 bytes of base64, unpadded
_ID = re.compile(r"[0-9a-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Longer than any token, so a pasted file is refused before anything reads it whole.
_MAX_TOKEN = 128

TokenBytes = Callable[[int], bytes]
Reason = Literal["ok", "malformed", "unknown", "expired", "wrong-service"]


class TokenFileError(Exception):
    """The join-token file cannot be trusted or read; the message says what to do."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    secret_sha256: str  # hex
    service: str | None  # the one service it may join as; None: any
    expires: float | None  # seconds since the epoch; None: never
    created: float

    def has_expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "secret_sha256": self.secret_sha256,
            "service": self.service,
            "expires": self.expires,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TokenRecord:
        """A record from ``to_dict``'s output; ValueError on anything else (a store is
        read back, and a damaged one must not become a token that lets anyone in)."""
        if set(data) != {"id", "secret_sha256", "service", "expires", "created"}:
            raise ValueError(
                f"a token record has the keys id, secret_sha256, service, expires, created: {sorted(data)}"
            )
        token_id, digest, service = data["id"], data["secret_sha256"], data["service"]
        if not isinstance(token_id, str) or not _ID.fullmatch(token_id):
            raise ValueError("a token record's id must be 12 hex digits")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ValueError(f"token {token_id}: secret_sha256 must be 64 lowercase hex digits")
        if service is not None and not is_service_name(service):
            raise ValueError(f"token {token_id}: service must be a service name or null")
        expires = None if data["expires"] is None else _time(token_id, "expires", data["expires"])
        return cls(token_id, digest, service, expires, _time(token_id, "created", data["created"]))


def _time(token_id: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"token {token_id}: {key} must be a finite number of seconds")
    return float(value)


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: Reason
    detail: str  # for logs and for the refused sidecar: never the secret
    record: TokenRecord | None = None  # the token's record when it is known

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _record(token_id: str, secret: str, service: str | None, expires: float | None, now: float) -> TokenRecord:
    return TokenRecord(token_id, _digest(secret), service, expires, now)


def mint(
    scope_service: str | None,
    ttl: float | None,
    now: float,
    token_bytes: TokenBytes = secrets.token_bytes,
) -> tuple[str, TokenRecord]:
    """A new token: its text (shown once, to whoever asked for it) and the record to keep.

    ``scope_service``: the one service it may join as (None: any); ``ttl``: seconds it is
    valid from ``now`` (None: never expires, for the bootstrap token only).
    """
    if scope_service is not None and not is_service_name(scope_service):
        raise ValueError(f"{scope_service!r} is not a service name (a DNS label: a-z, 0-9, '-', at most 63)")
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"a token's ttl must be a positive number of seconds, not {ttl!r}")
    token_id = token_bytes(_ID_BYTES).hex()
    secret = base64.urlsafe_b64encode(token_bytes(_SECRET_BYTES)).rstrip(b"=").decode("ascii")
    text = f"{PREFIX}{token_id}.{secret}"
    if not _TOKEN.fullmatch(text):  # a token_bytes that returns the wrong length
        raise ValueError("token_bytes returned the wrong number of bytes")
    return text, _record(token_id, secret, scope_service, None if ttl is None else now + ttl, now)


def verify(records: Mapping[str, TokenRecord], token_text: object, service: object, now: float) -> Verdict:
    """May the holder of ``token_text`` join as ``service`` at ``now``?

    ``records`` maps token ids to their records. Reasons, in the order they are checked:
    ``malformed`` (not a token's shape, or ``service`` is not a service name), ``unknown``
    (no such id, or the wrong secret), ``expired``, ``wrong-service`` (scoped to another),
    ``ok``.
    """
    if not isinstance(token_text, str) or len(token_text) > _MAX_TOKEN:
        return Verdict("malformed", "not a join token (mjt_<id>.<secret>)")
    match = _TOKEN.fullmatch(token_text)
    if match is None:
        return Verdict("malformed", "not a join token (mjt_<id>.<secret>)")
    if not is_service_name(service):
        return Verdict("malformed", "the service to join as is not a service name (a DNS label: a-z, 0-9, '-')")
    token_id, secret = match.groups()
    record = records.get(token_id)
    # Compare even without a record, so an unknown id takes as long as a wrong secret.
    expected = record.secret_sha256 if record is not None else "0" * 64
    if not hmac.compare_digest(_digest(secret), expected) or record is None:
        return Verdict("unknown", f"join token {token_id} is not one this control plane made (or was revoked)")
    if record.has_expired(now):
        return Verdict("expired", f"join token {token_id} expired: ask the mesh operator for a new one", record)
    if record.service is not None and record.service != service:
        return Verdict(
            "wrong-service",
            f"join token {token_id} is scoped to service {record.service!r}, not {service!r}",
            record,
        )
    return Verdict("ok", f"join token {token_id}", record)


def unscoped_record(token_text: str, created: float) -> TokenRecord:
    """The record of an unscoped, never-expiring token whose text we hold (the bootstrap
    token read back from its file)."""
    match = _TOKEN.fullmatch(token_text)
    if match is None:
        raise ValueError("not a join token (mjt_<id>.<secret>)")
    token_id, secret = match.groups()
    return _record(token_id, secret, None, None, created)


def bootstrap_token_file(data_dir: Path, token_bytes: TokenBytes = secrets.token_bytes) -> str:
    """The bootstrap join token's text: read from ``<data_dir>/join-token``, or, at first
    start, minted (unscoped, never expiring) and written there, mode 0600.

    TokenFileError if the file is not a regular file we own, is readable or writable by
    group or others (chmod 600), or does not hold a token.
    """
    path = data_dir / JOIN_TOKEN_FILE
    try:
        return _read_token_file(path)
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    text, _ = mint(None, None, 0.0, token_bytes)  # the record is rebuilt from the text: no time needed
    try:
        write_new(path, (text + "\n").encode())
    except FileExistsError:  # another process wrote it first: theirs is the token
        pass
    return _read_token_file(path)


def _read_token_file(path: Path) -> str:
    try:
        content = read_private(path, _MAX_TOKEN, what="join-token file")
    except PrivateFileError as error:
        raise TokenFileError(str(error)) from None
    text = content.decode("ascii", errors="replace").strip()
    if len(content) > _MAX_TOKEN or not _TOKEN.fullmatch(text):
        raise TokenFileError(f"{path} does not hold a join token: remove it to have a new one made at start")
    return text
