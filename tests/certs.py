"""Test credentials, minted with control_plane/ca.py: a root for the mesh's trust domain and
leaf certificates for services, as Credentials, as files (the key 0600), or as SSLContexts."""

from __future__ import annotations

import random
import ssl
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane import ca
from sidecar.core.credentials import Credentials

TRUST_DOMAIN = "meshlet.local"


class TestCA:
    """A root, and leaves it signs. ``now``: the time leaves are issued at (default: now)."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, trust_domain: str = TRUST_DOMAIN, seed: int = 1) -> None:
        self.trust_domain = trust_domain
        self.rng = random.Random(seed)
        self.root = ca.create_root(trust_domain, time.time() - 86400, self.rng)  # leaves may be back-dated

    @property
    def bundle(self) -> bytes:
        return self.root.certificate_pem()

    def credentials(self, service: str, *, now: float | None = None, lifetime: float = ca.LEAF_LIFETIME) -> Credentials:
        issued_at = time.time() if now is None else now
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        cert = ca.issue(self.root, csr, service, self.trust_domain, issued_at, self.rng, lifetime)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        leaf = x509.load_pem_x509_certificate(cert)
        return Credentials(
            cert_chain=cert,
            key=key_pem,
            bundle=self.bundle,
            trust_domain=self.trust_domain,
            service=service,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
        )

    def write(self, directory: Path, service: str, **kwargs: float) -> tuple[Path, Path, Path]:
        """``service``'s certificate, key (0600) and the bundle as files: the sidecar's
        ``--tls-cert``, ``--tls-key`` and ``--trust-bundle``."""
        return write_credentials(directory, self.credentials(service, **kwargs))


def write_credentials(directory: Path, credentials: Credentials) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    name = credentials.service
    cert, key, bundle = directory / f"{name}.crt", directory / f"{name}.key", directory / "bundle.pem"
    cert.write_bytes(credentials.cert_chain)
    key.touch(mode=0o600)
    key.chmod(0o600)
    key.write_bytes(credentials.key)
    bundle.write_bytes(credentials.bundle)
    return cert, key, bundle


def context(credentials: Credentials, directory: Path, *, server_side: bool) -> ssl.SSLContext:
    """A plain mTLS 1.3 context for ``credentials`` (no SPIFFE check: for tests of the I/O)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    cert, key, bundle = write_credentials(directory / ("server" if server_side else "client"), credentials)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=bundle)
    return context


def sidecar_flags(authority: TestCA, directory: Path, service: str, **kwargs: float) -> list[str]:
    """``meshlet sidecar`` flags for static credentials of ``service`` (files in ``directory``)."""
    cert, key, bundle = authority.write(directory / service, service, **kwargs)
    return ["--tls-cert", str(cert), "--tls-key", str(key), "--trust-bundle", str(bundle)]
