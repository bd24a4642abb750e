"""The push channel over TLS: the control plane's server certificate, from its own CA, and the
service a sidecar's client certificate proves.

The control plane proves ``spiffe://<trust domain>/control-plane`` with a certificate its CA
signs for itself (a name no sidecar can be issued: a service's is ``/service/<name>``). It is
made at start with a fresh key and made again when half its lifetime has passed. Client
certificates are optional (a sidecar's first join has none and presents a join token) but,
when presented, verified against the trust bundle: a certificate that does not verify fails
the handshake.

``ssl`` loads a certificate and key only from files: they are written to a private temporary
directory (0700, the files 0600), loaded, and removed at once.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import random
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshlet import identity
from meshlet.io import TLSConnection

from .ca import CLOCK_SKEW, Authority

log = logging.getLogger("meshlet.cp.tls")

SERVER_LIFETIME = 30 * 24 * 3600.0  # the control plane's own certificate; made again at half of it
TLS_HANDSHAKE = 0x16  # the first byte of a TLS connection (a handshake record)


def control_plane_id(trust_domain: str) -> str:
    return f"{identity.SCHEME}{trust_domain}/control-plane"


class PushTLS:
    def __init__(
        self,
        authority: Callable[[], Authority],
        *,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        lifetime: float = SERVER_LIFETIME,
    ) -> None:
        self.authority = authority
        self.rng = rng or random.SystemRandom()
        self.wall = wall
        self.lifetime = lifetime
        self._context: ssl.SSLContext | None = None
        self._renew_at = 0.0
        self._built_for: Authority | None = None  # the authority the context's bundle and certificate came from

    @property
    def trust_domain(self) -> str:
        return self.authority().current.trust_domain

    def context(self) -> ssl.SSLContext:
        """The server context, made again once half the certificate's lifetime has passed, and
        when the authority changes (a rotation: the bundle client certificates are verified
        with, and the root that signs ours)."""
        now = self.wall()
        authority = self.authority()
        if self._context is None or now >= self._renew_at or authority is not self._built_for:
            self._context = self._build(now)
            self._renew_at = now + self.lifetime / 2
            self._built_for = authority
        return self._context

    def _build(self, now: float) -> ssl.SSLContext:
        authority = self.authority()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _server_certificate(authority, key, now, self.rng, self.lifetime)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_OPTIONAL  # a first join has no certificate: its token decides
        context.load_verify_locations(cadata=authority.bundle(now).decode("ascii"))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        log.info(
            "push channel TLS: certificate %s, SHA-256 fingerprint %s (what a sidecar trusting it on first use logs)",
            control_plane_id(authority.current.trust_domain),
            hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )
        with tempfile.TemporaryDirectory(prefix="meshlet-push-tls-") as directory:  # 0700
            cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
            # After a rotation, the chain goes on to the old root too (ca.Authority.cross).
            cross = b"" if authority.cross is None else authority.cross.public_bytes(serialization.Encoding.PEM)
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + cross)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key_pem)
            context.load_cert_chain(cert_path, key_path)
        return context

    def peer_service(self, conn: TLSConnection) -> tuple[str | None, str]:
        """(the service the verified client certificate names, or None without one; why a
        certificate is refused, or "")."""
        peer = conn.peer_certificate()
        if not peer:
            return None, ""
        names = peer.get("subjectAltName", ())
        uris = [value for kind, value in names if kind == "URI"] if isinstance(names, tuple) else []
        if len(uris) != 1:
            return None, f"the client certificate has {len(uris)} URI names, not one SPIFFE ID"
        try:
            return identity.parse_spiffe_id(uris[0], self.trust_domain), ""
        except identity.IdentityError as exc:
            return None, str(exc)


def _server_certificate(
    authority: Authority, key: ec.EllipticCurvePrivateKey, now: float, rng: random.Random, lifetime: float
) -> x509.Certificate:
    root = authority.current
    public = key.public_key()
    ski = root.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + lifetime, root.not_after)
    signing_key = root.key
    hash_ = (
        hashes.SHA384()
        if isinstance(signing_key, ec.EllipticCurvePrivateKey) and isinstance(signing_key.curve, ec.SECP384R1)
        else hashes.SHA256()
    )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.certificate.subject)
        .public_key(public)
        .serial_number(rng.getrandbits(159) or 1)
        .not_valid_before(_utc(max(now - CLOCK_SKEW, root.not_before)))
        .not_valid_after(_utc(not_after))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(control_plane_id(root.trust_domain))]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(signing_key, hash_)
    )


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(math.floor(seconds), tz=datetime.UTC)
