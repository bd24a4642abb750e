"""sidecar/net/tls.py: the identity a verified certificate proves (exactly one SPIFFE ID of
our trust domain), contexts rebuilt only when the credentials change, and the key never
left on disk."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlet.io import TLSConnection
from sidecar.core.credentials import CredentialHolder, Credentials
from sidecar.net import tls
from sidecar.net.tls import MeshTLS, PeerIdentityError, build_context, peer_service

from ...certs import TestCA, context
from ...meshlet.test_io_tls import pair


def leaf_with(authority: TestCA, names: list[x509.GeneralName], credentials: Credentials) -> Credentials:
    """``credentials`` with a certificate whose SANs are ``names`` (signed by ``authority``)."""
    key = serialization.load_pem_private_key(credentials.key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(authority.root.certificate.not_valid_before_utc)
        .not_valid_after(x509.load_pem_x509_certificate(credentials.cert_chain).not_valid_after_utc)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    cert = builder.sign(authority.root.key, hashes.SHA256())
    return replace(credentials, cert_chain=cert.public_bytes(serialization.Encoding.PEM))


URI = x509.UniformResourceIdentifier
CASES = [
    ("one SPIFFE ID", [URI("spiffe://meshlet.local/service/item")], "item"),
    ("two URIs", [URI("spiffe://meshlet.local/service/item"), URI("spiffe://meshlet.local/service/user")], "2 URI"),
    ("a DNS name only", [x509.DNSName("item")], "0 URI"),
    ("no SAN", [], "0 URI"),
    ("another trust domain", [URI("spiffe://other.local/service/item")], "trust domain 'other.local'"),
    ("the plaintext callers' name", [URI("spiffe://meshlet.local/service/unauthenticated")], "unauthenticated"),
    ("another path", [URI("spiffe://meshlet.local/ns/default/sa/item")], "/service/<name>"),
]


@pytest.mark.parametrize(("case", "names", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_peer_service(tmp_path: Path, case: str, names: list[x509.GeneralName], expected: str) -> None:
    authority = TestCA()
    server_credentials = leaf_with(authority, names, authority.credentials("item"))
    contexts = (
        context(server_credentials, tmp_path, server_side=True),
        context(authority.credentials("user"), tmp_path, server_side=False),
    )
    server, client = await pair(contexts)
    assert isinstance(client, TLSConnection)
    if case == "one SPIFFE ID":
        assert peer_service(client, "meshlet.local") == expected
    else:
        with pytest.raises(PeerIdentityError, match=expected):
            peer_service(client, "meshlet.local")
    server.close()
    client.close()


def test_contexts_rebuilt_only_when_the_credentials_change() -> None:
    authority = TestCA()
    holder = CredentialHolder()
    mesh = MeshTLS(holder)
    assert not mesh.refresh() and mesh.client_context("item") is None  # no credentials: plaintext
    epoch = mesh.epoch()
    holder.install(authority.credentials("user"))
    assert mesh.epoch() == epoch + 1  # plaintext → TLS: pooled plaintext connections are not reused
    client, server = mesh.client_context("item"), mesh.server
    assert client is not None and server is not None
    mesh.sessions[("127.0.0.1", 1)] = (client, object())  # type: ignore[assignment]
    assert mesh.client_context("item") is client and mesh.server is server  # same generation: same contexts
    holder.install(authority.credentials("user"))  # a renewal
    assert mesh.client_context("item") is not client and mesh.epoch() == epoch + 1  # TLS still: same epoch
    assert mesh.sessions == {}  # sessions belong to the old context
    assert mesh.service == "user" and mesh.trust_domain == "meshlet.local"


def test_modes_and_off_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    authority = TestCA()
    mesh = MeshTLS(CredentialHolder(authority.credentials("user")))
    assert mesh.mode("item") == "permissive" and mesh.client_context("item") is not None
    with caplog.at_level(logging.WARNING, logger="meshlet.tls"):
        mesh.configure("permissive", {"item": "off", "cart": "strict"})
    assert mesh.client_context("item") is None and mesh.client_context("cart") is not None
    assert mesh.mode("user") == "permissive"
    assert [r.getMessage() for r in caplog.records] == ["Service item has mtls.mode off: calls to it are plaintext"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meshlet.tls"):
        mesh.configure("off", {})
    assert "MeshConfig mtls.mode is off" in caplog.text
    assert mesh.client_context("user") is None


def test_the_key_is_not_left_on_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """load_cert_chain reads a file: the key is written in a private directory, 0600, and
    both are gone once the context is built."""
    seen: list[tuple[int, int]] = []
    real = tls.ssl.SSLContext.load_cert_chain

    def spy(self: tls.ssl.SSLContext, certfile: str, keyfile: str) -> None:
        seen.append((os.stat(keyfile).st_mode & 0o777, os.stat(os.path.dirname(keyfile)).st_mode & 0o777))
        real(self, certfile, keyfile)

    monkeypatch.setattr(tls.ssl.SSLContext, "load_cert_chain", spy)
    monkeypatch.setattr(tls, "_KEY_DIRECTORY", str(tmp_path))
    build_context(TestCA().credentials("user"), server_side=True)
    assert seen == [(0o600, 0o700)]
    assert list(tmp_path.iterdir()) == []
