"""What a sidecar proves and what it trusts: its certificate, its key and the trust bundle.

The control-plane session (``net/control.py``) installs a new :class:`Credentials` when a
certificate is issued or renewed, or when the trust bundle changes; the TLS layer
(``net/tls.py``) builds its contexts from ``holder.current`` and rebuilds them when
``holder.generation`` moves. Connections already open keep the credentials they were made
with: a renewal never drops a connection.

Pure: no files, no sockets, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Credentials:
    cert_chain: bytes  # PEM: the leaf first, then any intermediates
    key: bytes  # PEM, unencrypted; never logged, never leaves the process or its data dir
    bundle: bytes  # PEM: every root trusted now (more than one during a CA rotation)
    trust_domain: str
    service: str  # the service the certificate names: spiffe://<trust_domain>/service/<service>
    not_before: float  # seconds since the epoch
    not_after: float

    def __repr__(self) -> str:  # the key must not reach a log through a repr
        return (
            f"Credentials(service={self.service!r}, trust_domain={self.trust_domain!r}, "
            f"not_before={self.not_before!r}, not_after={self.not_after!r})"
        )


class CredentialHolder:
    """The sidecar's current credentials (None until the first certificate) and a
    generation counter that moves on every change, so readers rebuild only then."""

    __slots__ = ("current", "generation")

    def __init__(self, current: Credentials | None = None) -> None:
        self.current = current
        self.generation = 0 if current is None else 1

    def install(self, credentials: Credentials | None) -> None:
        self.current = credentials
        self.generation += 1
