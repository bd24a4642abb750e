"""control_plane.ca: the root, issuance from untrusted CSRs, the trust bundle across a rotation,
and the key files. Every leaf is checked by two independent verifiers: cryptography's
x509.verification (the client verifier: the server one takes DNS names and IPs only, and a
sidecar's identity is a URI) and `openssl verify`."""

from __future__ import annotations

import datetime
import functools
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane import ca
from control_plane.ca import CAError

from ..conftest import need

NOW = 1_800_000_000.0  # 2027-01-15: a fixed clock
TD = "meshlet.local"
HOUR = 3600.0
DAY = 24 * HOUR
YEAR = 365 * DAY


def rng() -> random.Random:
    return random.Random(17)


@functools.cache
def root_at(now: float = NOW, trust_domain: str = TD) -> ca.Root:
    return ca.create_root(trust_domain, now, rng())


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_for(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None,
    subject: x509.Name | None = None,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> bytes:
    key = p256() if key is None else key
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def leaf_for(service: str = "item", root: ca.Root | None = None, now: float = NOW, **kwargs: float) -> bytes:
    return ca.issue(root or root_at(), csr_for(), service, TD, now, rng(), **kwargs)


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


# the two verifiers ----------------------------------------------------------------------------


def verified_by_cryptography(bundle: bytes, leaf: bytes, at: float) -> list[x509.GeneralName]:
    """The leaf's verified names, or VerificationError."""
    store = verification.Store(x509.load_pem_x509_certificates(bundle))
    verifier = verification.PolicyBuilder().store(store).time(utc(at)).build_client_verifier()
    return list(verifier.verify(cert(leaf), []).subjects or [])


def verified_by_openssl(bundle: bytes, leaf: bytes, at: float, directory: Path, purpose: str) -> bool:
    openssl = need("openssl")
    (directory / "bundle.pem").write_bytes(bundle)
    (directory / "leaf.pem").write_bytes(leaf)
    command = [openssl, "verify", "-x509_strict", "-purpose", purpose, "-attime", str(int(at))]
    result = subprocess.run(
        [*command, "-CAfile", str(directory / "bundle.pem"), str(directory / "leaf.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


def assert_verifies(bundle: bytes, leaf: bytes, at: float, directory: Path, service: str = "item") -> None:
    identity = x509.UniformResourceIdentifier(f"spiffe://{TD}/service/{service}")
    assert verified_by_cryptography(bundle, leaf, at) == [identity]
    assert verified_by_openssl(bundle, leaf, at, directory, "sslclient")
    assert verified_by_openssl(bundle, leaf, at, directory, "sslserver")


def assert_refused(bundle: bytes, leaf: bytes, at: float, directory: Path) -> None:
    with pytest.raises(verification.VerificationError):
        verified_by_cryptography(bundle, leaf, at)
    assert not verified_by_openssl(bundle, leaf, at, directory, "sslclient")


# the root -------------------------------------------------------------------------------------


def test_root_is_a_p256_ca_that_signs_leaves_only() -> None:
    root = root_at()
    certificate = root.certificate
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert certificate.subject == certificate.issuer
    assert certificate.subject.rfc4514_string() == "CN=meshlet root meshlet.local,O=meshlet"
    ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert root.not_before == NOW - ca.CLOCK_SKEW
    assert root.not_after == NOW + 10 * YEAR
    certificate.verify_directly_issued_by(certificate)


def test_root_serial_comes_from_the_rng_passed_in() -> None:
    first, again = (ca.create_root(TD, NOW, random.Random(5)) for _ in range(2))
    other = ca.create_root(TD, NOW, random.Random(6))
    assert first.certificate.serial_number == again.certificate.serial_number
    assert first.certificate.serial_number != other.certificate.serial_number
    assert 0 < first.certificate.serial_number < 2**159


def test_root_for_a_long_trust_domain_keeps_its_common_name_short() -> None:
    root = ca.create_root("a" * 200, NOW, rng())
    assert root.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meshlet root"


def test_root_repr_shows_no_key() -> None:
    assert "key=" not in repr(root_at())


# issuance -------------------------------------------------------------------------------------


def test_leaf_verifies_against_the_bundle_with_both_verifiers(tmp_path: Path) -> None:
    leaf = leaf_for()
    assert_verifies(ca.Authority(root_at()).bundle(NOW), leaf, NOW, tmp_path)


def test_leaf_has_exactly_the_profile() -> None:
    key = p256()
    leaf = cert(ca.issue(root_at(), csr_for(key), "item", TD, NOW, rng()))
    extensions = {e.oid: e for e in leaf.extensions}
    assert set(extensions) == {
        x509.SubjectAlternativeName.oid,
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
    }
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty: RFC 5280 then wants the SAN critical
    assert list(san.value) == [x509.UniformResourceIdentifier("spiffe://meshlet.local/service/item")]
    assert leaf.subject == x509.Name([])
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root_at().certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert leaf.issuer == root_at().certificate.subject
    assert leaf.public_key() == key.public_key()
    assert leaf.not_valid_before_utc == utc(NOW - 60)
    assert leaf.not_valid_after_utc == utc(NOW + DAY)


def test_csr_names_and_extensions_are_ignored(tmp_path: Path) -> None:
    # A CSR asking for another service's identity, a CA certificate and a name of its own.
    greedy = csr_for(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments")]),
        extensions=(
            (
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier("spiffe://meshlet.local/service/payments"),
                        x509.DNSName("payments"),
                    ]
                ),
                False,
            ),
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
        ),
    )
    leaf = ca.issue(root_at(), greedy, "item", TD, NOW, rng())
    certificate = cert(leaf)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://meshlet.local/service/item")]
    assert certificate.subject == x509.Name([])
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"payments" not in certificate.public_bytes(serialization.Encoding.DER)
    assert_verifies(ca.Authority(root_at()).bundle(NOW), leaf, NOW, tmp_path)


_LABEL = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    service=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True).filter(
        lambda s: s != "unauthenticated"
    ),
    asked=st.lists(_LABEL.map(lambda s: f"spiffe://{TD}/service/{s}"), max_size=3),
    dns=st.lists(_LABEL, max_size=3),
    # cryptography bounds a common name to 64 bytes of UTF-8, not 64 characters
    common_name=st.text(min_size=1, max_size=64).filter(lambda s: len(s.encode()) <= 64),
)
def test_the_leaf_names_only_the_requested_service(
    service: str, asked: list[str], dns: list[str], common_name: str
) -> None:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in asked]
    names += [x509.DNSName(d) for d in dns]
    extensions = ((x509.SubjectAlternativeName(names), False),) if names else ()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    leaf = cert(ca.issue(root_at(), csr_for(subject=subject, extensions=extensions), service, TD, NOW, rng()))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/service/{service}")]
    assert leaf.subject == x509.Name([])


def _altered(pem: bytes, old: bytes, new: bytes) -> bytes:
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    changed = der.replace(old, new)
    return x509.load_der_x509_csr(changed).public_bytes(serialization.Encoding.PEM)


def _with_public_key_of(pem: bytes, other: bytes) -> bytes:
    def spki(csr_pem: bytes) -> bytes:
        return (
            x509.load_pem_x509_csr(csr_pem)
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    return _altered(pem, spki(pem), spki(other))


def _with_flipped_signature(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the ECDSA signature's s
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def _named(name: str) -> bytes:
    return csr_for(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))


REFUSED_CSRS = {
    "subject altered after signing": (lambda: _altered(_named("item-aaaa"), b"item-aaaa", b"item-aaab"), "signature"),
    "another key put in": (lambda: _with_public_key_of(_named("x"), _named("x")), "signature"),
    "signature altered": (lambda: _with_flipped_signature(_named("x")), "signature"),
    "P-384 key": (
        lambda: csr_for(ec.generate_private_key(ec.SECP384R1())),
        "EC secp384r1: a sidecar's key must be EC P-256",
    ),
    "RSA key": (
        lambda: csr_for(rsa.generate_private_key(65537, 1024)),
        "RSA 1024 bits: a sidecar's key must be EC P-256",
    ),
    "Ed25519 key": (lambda: csr_for(ed25519.Ed25519PrivateKey.generate()), "Ed25519: a sidecar's key must be EC P-256"),
    "not PEM": (lambda: b"hello", "not a PEM certificate request"),
    "a certificate, not a CSR": (lambda: root_at().certificate_pem(), "not a PEM certificate request"),
    "empty": (lambda: b"", "not a PEM certificate request"),
    "too large": (lambda: csr_for() + b"\n" * ca.MAX_CSR_BYTES, "is not one CSR"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CSRS))
def test_untrusted_csr_refused(case: str) -> None:
    make, reason = REFUSED_CSRS[case]
    with pytest.raises(CAError, match="CSR") as refused:
        ca.issue(root_at(), make(), "item", TD, NOW, rng())
    assert reason in refused.value.reason


def test_csr_that_is_not_bytes_refused() -> None:
    with pytest.raises(CAError, match="must be bytes"):
        ca.issue(root_at(), csr_for().decode(), "item", TD, NOW, rng())  # type: ignore[arg-type]


BAD_SERVICES = ["", "Item", "item.prod", "-item", "item-", "a" * 64, "item/../x", "item\n", "it em", "ité", None, 3]


@pytest.mark.parametrize("service", BAD_SERVICES, ids=repr)
def test_bad_service_name_refused(service: object) -> None:
    with pytest.raises(CAError, match="is not a service name"):
        ca.issue(root_at(), csr_for(), service, TD, NOW, rng())  # type: ignore[arg-type]


BAD_TRUST_DOMAINS = [
    "",
    "Meshlet.local",
    "meshlet.local/x",
    "meshlet.local:8443",
    "spiffe://meshlet.local",
    "user@meshlet.local",
    "meshlet local",
    "meshlet.local\n",
    "mesh%6cet",
    "méshlet",
    "a" * 256,
    None,
]


@pytest.mark.parametrize("trust_domain", BAD_TRUST_DOMAINS, ids=repr)
def test_bad_trust_domain_refused(trust_domain: object) -> None:
    with pytest.raises(CAError, match="trust domain"):
        ca.issue(root_at(), csr_for(), "item", trust_domain, NOW, rng())  # type: ignore[arg-type]
    with pytest.raises(CAError, match="trust domain"):
        ca.create_root(trust_domain, NOW, rng())  # type: ignore[arg-type]
    with pytest.raises(CAError, match="trust domain"):
        ca.load_root(root_at().certificate_pem(), root_at().private_key_pem(), trust_domain, NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("trust_domain", ["example.org", "a", "prod_eu-1.corp", "a" * 255, "1.2.3.4"])
def test_good_trust_domains_get_leaves(trust_domain: str) -> None:
    root = ca.create_root(trust_domain, NOW, rng())
    leaf = cert(ca.issue(root, csr_for(), "item", trust_domain, NOW, rng()))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{trust_domain}/service/item"]


def test_no_certificate_names_plaintext_callers() -> None:
    # "unauthenticated" is how the mesh names a caller that proved nothing.
    with pytest.raises(CAError, match="no service may hold it as an identity"):
        ca.issue(root_at(), csr_for(), "unauthenticated", TD, NOW, rng())


def test_trust_domain_must_be_the_roots() -> None:
    with pytest.raises(CAError, match="this CA's trust domain is 'meshlet.local', not 'example.org'"):
        ca.issue(root_at(), csr_for(), "item", "example.org", NOW, rng())


def test_lifetime_is_capped_by_the_roots_expiry(tmp_path: Path) -> None:
    root = ca.create_root(TD, NOW, rng(), validity=10 * HOUR)
    now = NOW + 4 * HOUR  # six hours of the root left: a 24 h leaf gets six
    leaf = leaf_for(root=root, now=now)
    assert cert(leaf).not_valid_after_utc == root.certificate.not_valid_after_utc
    assert_verifies(ca.Authority(root).bundle(now), leaf, now, tmp_path)
    short = leaf_for(root=root, now=now, lifetime=HOUR)
    assert cert(short).not_valid_after_utc == utc(now + HOUR)


def test_leaf_does_not_start_before_its_root() -> None:
    leaf = cert(leaf_for(root=root_at(), now=NOW))  # issued in the root's first second
    assert leaf.not_valid_before_utc == root_at().certificate.not_valid_before_utc


def test_leaf_expires_after_its_lifetime(tmp_path: Path) -> None:
    leaf = leaf_for()
    bundle = ca.Authority(root_at()).bundle(NOW)
    assert_verifies(bundle, leaf, NOW + DAY - 1, tmp_path)  # OpenSSL takes notAfter's second as expired
    assert_refused(bundle, leaf, NOW + DAY + 1, tmp_path)


@pytest.mark.parametrize(
    ("now", "reason"),
    [(NOW - HOUR, "not valid yet"), (NOW + 10 * YEAR + 1, "has expired")],
)
def test_no_issuance_outside_the_roots_validity(now: float, reason: str) -> None:
    with pytest.raises(CAError, match=reason):
        leaf_for(now=now)


@pytest.mark.parametrize("lifetime", [0.0, -1.0, float("nan"), float("inf")])
def test_lifetime_must_be_positive(lifetime: float) -> None:
    with pytest.raises(CAError, match="lifetime must be"):
        leaf_for(lifetime=lifetime)


def test_serials_differ_between_leaves() -> None:
    draws = random.Random(3)
    serials = {cert(ca.issue(root_at(), csr_for(), "item", TD, NOW, draws)).serial_number for _ in range(20)}
    assert len(serials) == 20


# rotation -------------------------------------------------------------------------------------


def test_rotation_keeps_the_old_root_trusted_during_the_overlap_only(tmp_path: Path) -> None:
    authority = ca.Authority(root_at())
    old_leaf = authority.issue(csr_for(), "item", NOW, rng())
    rotated_at = NOW + HOUR
    rotated = authority.rotate(rotated_at, random.Random(2), overlap=2 * HOUR)
    assert rotated.current.certificate != authority.current.certificate
    new_leaf = rotated.issue(csr_for(), "item", rotated_at, rng())
    # Both roots have the same subject: the key identifiers and the signature tell them apart.
    cert(new_leaf).verify_directly_issued_by(rotated.current.certificate)
    new_ski = rotated.current.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert(new_leaf).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == new_ski.digest
    assert not _verifies_with(authority.bundle(rotated_at), new_leaf, rotated_at)

    during = rotated_at + 2 * HOUR
    assert rotated.trusted(during) == (rotated.current.certificate, authority.current.certificate)
    assert_verifies(rotated.bundle(during), old_leaf, during, tmp_path)
    assert_verifies(rotated.bundle(during), new_leaf, during, tmp_path)

    after = during + 1
    assert rotated.trusted(after) == (rotated.current.certificate,)
    assert_refused(rotated.bundle(after), old_leaf, after, tmp_path)
    assert_verifies(rotated.bundle(after), new_leaf, after, tmp_path)


def _verifies_with(bundle: bytes, leaf: bytes, at: float) -> bool:
    try:
        verified_by_cryptography(bundle, leaf, at)
    except verification.VerificationError:
        return False
    return True


def test_rotation_drops_roots_whose_overlap_is_over() -> None:
    first = ca.Authority(root_at())
    second = first.rotate(NOW + HOUR, random.Random(2), overlap=HOUR)
    third = second.rotate(NOW + 3 * HOUR, random.Random(3), overlap=HOUR)
    assert [r.certificate for r in third.retired] == [second.current.certificate]
    fourth = third.rotate(NOW + 3.5 * HOUR, random.Random(4), overlap=HOUR)
    assert [r.certificate for r in fourth.retired] == [third.current.certificate, second.current.certificate]
    later = NOW + 4 * HOUR + 1  # second's overlap (until 4 h) is over, third's (until 4.5 h) is not
    assert fourth.trusted(later) == (fourth.current.certificate, third.current.certificate)
    assert fourth.bundle(later).count(b"BEGIN CERTIFICATE") == 2


def test_a_retired_root_is_never_trusted_past_its_own_expiry() -> None:
    short = ca.Authority(ca.create_root(TD, NOW, rng(), validity=HOUR))
    rotated = short.rotate(NOW + HOUR / 2, random.Random(2), overlap=DAY)
    assert rotated.trusted(NOW + 2 * HOUR) == (rotated.current.certificate,)


def test_the_default_overlap_outlasts_a_leaf_of_the_old_root() -> None:
    assert ca.ROTATION_OVERLAP >= ca.LEAF_LIFETIME
    rotated = ca.Authority(root_at()).rotate(NOW, random.Random(2))
    assert len(rotated.trusted(NOW + ca.LEAF_LIFETIME)) == 2


@pytest.mark.parametrize("overlap", [-1.0, float("nan"), float("inf")])
def test_overlap_must_be_a_duration(overlap: float) -> None:
    with pytest.raises(CAError, match="overlap"):
        ca.Authority(root_at()).rotate(NOW, rng(), overlap=overlap)


def test_bundle_is_empty_once_every_root_has_expired() -> None:
    assert ca.Authority(ca.create_root(TD, NOW, rng(), validity=HOUR)).bundle(NOW + 2 * HOUR) == b""


# operator-provided roots ------------------------------------------------------------------------

_OPERATOR = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example Corp Root")])


def operator_cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    *,
    ca_flag: bool | None = True,
    key_usage: bool | None = True,
    ski: bool = True,
    constraints_critical: bool = True,
    purposes: tuple[x509.ObjectIdentifier, ...] = (),
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    not_before: float = NOW - DAY,
    not_after: float = NOW + YEAR,
) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_OPERATOR)
        .issuer_name(issuer[0] if issuer else _OPERATOR)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc(not_before))
        .not_valid_after(utc(not_after))
    )
    if ca_flag is not None:
        constraints = x509.BasicConstraints(ca=ca_flag, path_length=None)
        builder = builder.add_extension(constraints, critical=constraints_critical)
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, key_usage, True, False, False), critical=True
        )
    if purposes:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(purposes)), critical=False)
    signer = issuer[1] if issuer else key
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm).public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@functools.cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


def _own(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, **kwargs: object
) -> tuple[bytes, bytes]:
    return operator_cert(key, **kwargs), key_pem(key)  # type: ignore[arg-type]


def _mismatched() -> tuple[bytes, bytes]:
    return operator_cert(p256()), key_pem(p256())


def _intermediate() -> tuple[bytes, bytes]:
    key = p256()
    return operator_cert(key, issuer=(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp")]), p256())), key_pem(
        key
    )


def _encrypted() -> tuple[bytes, bytes]:
    key = p256()
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    return operator_cert(key), encrypted


REFUSED_ROOTS = {
    "not a CA (CA:FALSE)": (lambda: _own(p256(), ca_flag=False), "is not a CA certificate (basicConstraints CA:FALSE)"),
    "not a CA (no basicConstraints)": (lambda: _own(p256(), ca_flag=None), "is not a CA certificate (it has no"),
    "a leaf we issued": (lambda: (leaf_for(), key_pem(p256())), "does not match"),
    "no keyCertSign": (lambda: _own(p256(), key_usage=False), "does not allow keyCertSign"),
    "no keyUsage": (lambda: _own(p256(), key_usage=None), "has no keyUsage"),
    "no subjectKeyIdentifier": (lambda: _own(p256(), ski=False), "has no subjectKeyIdentifier"),
    "basicConstraints not critical": (
        lambda: _own(p256(), constraints_critical=False),
        "basicConstraints is not marked critical",
    ),
    "key does not match": (_mismatched, "the CA key does not match the CA certificate"),
    "expired": (lambda: _own(p256(), not_before=NOW - 2 * YEAR, not_after=NOW - 1), "has expired"),
    "not yet valid": (lambda: _own(p256(), not_before=NOW + 1, not_after=NOW + YEAR), "is not valid yet"),
    "EC P-521": (lambda: _own(ec.generate_private_key(ec.SECP521R1())), "is EC secp521r1: a CA key must be"),
    "EC secp256k1": (lambda: _own(ec.generate_private_key(ec.SECP256K1())), "is EC secp256k1: a CA key must be"),
    "RSA 1024": (lambda: _own(rsa_key(1024)), "is RSA 1024 bits: a CA key must be"),
    "Ed25519": (lambda: _own(ed25519.Ed25519PrivateKey.generate()), "is Ed25519: a CA key must be"),
    "root for code signing only": (
        lambda: _own(p256(), purposes=(ExtendedKeyUsageOID.CODE_SIGNING,)),
        "extendedKeyUsage does not allow serverAuth and clientAuth",
    ),
    "root for servers only": (
        lambda: _own(p256(), purposes=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        "extendedKeyUsage does not allow serverAuth and clientAuth",
    ),
    "intermediate": (_intermediate, "is not self-signed (its issuer is another CA)"),
    "encrypted key": (_encrypted, "the CA key is encrypted"),
    "cert not PEM": (lambda: (b"junk", key_pem(p256())), "is not a PEM certificate"),
    "key not PEM": (
        lambda: (operator_cert(p256()), b"-----BEGIN PRIVATE KEY-----\nAAAA\n"),
        "is not a PEM private key",
    ),
    "key is a certificate": (lambda: (operator_cert(p256()), operator_cert(p256())), "is not a PEM private key"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_ROOTS))
def test_load_root_refuses(case: str) -> None:
    make, reason = REFUSED_ROOTS[case]
    cert_pem, key = make()
    with pytest.raises(CAError) as refused:
        ca.load_root(cert_pem, key, TD, NOW)
    assert reason in refused.value.reason


def test_load_root_refuses_a_root_signed_by_another_key() -> None:
    # It names itself as its issuer, but another key made its signature.
    key = p256()
    forged = operator_cert(key, issuer=(_OPERATOR, p256()))
    with pytest.raises(CAError, match="signature does not verify with its own key"):
        ca.load_root(forged, key_pem(key), TD, NOW)


def test_operator_root_restricted_to_tls_is_fine(tmp_path: Path) -> None:
    key = p256()
    tls = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    root = ca.load_root(operator_cert(key, purposes=tls), key_pem(key), TD, NOW)
    assert_verifies(ca.Authority(root).bundle(NOW), leaf_for(root=root), NOW, tmp_path)


OPERATOR_KEYS = {
    "EC P-256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EC P-384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "RSA 2048": lambda: rsa_key(2048),
}


@pytest.mark.parametrize("kind", sorted(OPERATOR_KEYS))
def test_operator_root_loads_and_issues(kind: str, tmp_path: Path) -> None:
    key = OPERATOR_KEYS[kind]()
    root = ca.load_root(operator_cert(key), key_pem(key), TD, NOW)
    leaf = ca.issue(root, csr_for(), "item", TD, NOW, rng())
    assert_verifies(ca.Authority(root).bundle(NOW), leaf, NOW, tmp_path)


def test_leaf_of_an_operator_root_names_the_roots_key() -> None:
    key = p256()
    root = ca.load_root(operator_cert(key), key_pem(key), TD, NOW)
    leaf = cert(ca.issue(root, csr_for(), "item", TD, NOW, rng()))
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert leaf.issuer == _OPERATOR


def test_a_refusal_never_quotes_the_key() -> None:
    body = b"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRETSECRETSECRET"
    garbage = b"-----BEGIN PRIVATE KEY-----\n" + body + b"\n-----END PRIVATE KEY-----\n"
    with pytest.raises(CAError) as refused:
        ca.load_root(operator_cert(p256()), garbage, TD, NOW)
    assert "SECRET" not in str(refused.value)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_own_root_loads_back() -> None:
    root = root_at()
    loaded = ca.load_root(root.certificate_pem(), root.private_key_pem(), TD, NOW)
    assert loaded.certificate == root.certificate


# files ----------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_root_keeps_the_key_0600(tmp_path: Path) -> None:
    directory = tmp_path / "cp"
    ca.write_root(directory, root_at())
    assert mode(directory / ca.KEY_FILE) == 0o600
    assert mode(directory / ca.CERT_FILE) == 0o644
    assert mode(directory) == 0o700
    assert sorted(os.listdir(directory)) == [ca.CERT_FILE, ca.KEY_FILE]  # no temporary file left
    assert ca.read_root(directory, TD, NOW).certificate == root_at().certificate


def test_the_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        ca.write_private_file(tmp_path / "key", b"secret")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "key") == 0o600


def test_rewriting_a_key_file_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "key"
    ca.write_private_file(path, b"one")
    ca.write_private_file(path, b"two")
    assert ca.read_private_file(path) == b"two"
    assert os.listdir(tmp_path) == ["key"]


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o777])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, loose: int) -> None:
    ca.write_root(tmp_path, root_at())
    key_path = tmp_path / ca.KEY_FILE
    key_path.chmod(loose)
    for read in (lambda: ca.read_root(tmp_path, TD, NOW), lambda: ca.read_operator_key(key_path)):
        with pytest.raises(CAError, match=f"chmod 600 {key_path}") as refused:
            read()
        assert f"is open to group or others (mode {loose:04o})" in refused.value.reason


def test_a_read_only_key_file_is_fine(tmp_path: Path) -> None:
    ca.write_root(tmp_path, root_at())
    (tmp_path / ca.KEY_FILE).chmod(0o400)
    assert ca.read_root(tmp_path, TD, NOW).certificate == root_at().certificate


def test_a_key_path_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key").mkdir(mode=0o700)
    with pytest.raises(CAError, match="not a regular file"):
        ca.read_private_file(tmp_path / "key")
    with pytest.raises(CAError, match="not a regular file"):
        ca.read_operator_key(tmp_path / "key")


def test_a_symlink_in_the_data_directory_is_refused_but_an_operators_is_followed(tmp_path: Path) -> None:
    ca.write_private_file(tmp_path / "elsewhere", b"key")
    (tmp_path / "key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CAError, match="cannot open the key file"):
        ca.read_private_file(tmp_path / "key")
    assert ca.read_operator_key(tmp_path / "key") == b"key"  # as Kubernetes mounts a secret


def test_an_operators_root_is_read_through_symlinks(tmp_path: Path) -> None:
    key = p256()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "tls.crt").write_bytes(operator_cert(key))
    ca.write_private_file(tmp_path / "secret" / "tls.key", key_pem(key))
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).symlink_to(tmp_path / "secret" / name)
    root = ca.read_operator_root(tmp_path / "tls.crt", tmp_path / "tls.key", TD, NOW)
    assert root.certificate.subject == _OPERATOR
    (tmp_path / "secret" / "tls.key").chmod(0o644)  # Kubernetes' default mode for a secret
    with pytest.raises(CAError, match="chmod 600"):
        ca.read_operator_root(tmp_path / "tls.crt", tmp_path / "tls.key", TD, NOW)


def test_a_key_file_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca.write_private_file(tmp_path / "key", b"key")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path / "key").st_uid + 1)
    with pytest.raises(CAError, match="belongs to another user"):
        ca.read_private_file(tmp_path / "key")
    assert ca.read_operator_key(tmp_path / "key") == b"key"


def test_a_missing_key_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ca.read_private_file(tmp_path / "key")


def test_an_oversized_key_file_is_refused(tmp_path: Path) -> None:
    ca.write_private_file(tmp_path / "key", b"x" * (ca.MAX_PEM_BYTES + 1))
    with pytest.raises(CAError, match="larger than"):
        ca.read_private_file(tmp_path / "key")


def test_open_root_creates_once_then_loads(tmp_path: Path) -> None:
    created = ca.open_root(tmp_path / "cp", TD, NOW, rng())
    assert mode(tmp_path / "cp" / ca.KEY_FILE) == 0o600
    again = ca.open_root(tmp_path / "cp", TD, NOW + HOUR, random.Random(99))
    assert again.certificate == created.certificate


@pytest.mark.parametrize("lost", [ca.KEY_FILE, ca.CERT_FILE])
def test_open_root_refuses_half_a_ca(tmp_path: Path, lost: str) -> None:
    ca.write_root(tmp_path, root_at())
    (tmp_path / lost).unlink()
    with pytest.raises(CAError, match=f"but not {lost}: restore it"):
        ca.open_root(tmp_path, TD, NOW, rng())
    assert not (tmp_path / lost).exists()  # nothing was replaced


def test_a_stale_pair_is_refused(tmp_path: Path) -> None:
    ca.write_root(tmp_path, root_at())
    other = ca.create_root(TD, NOW, random.Random(8))
    ca.write_private_file(tmp_path / ca.KEY_FILE, other.private_key_pem())  # a crash before the cert
    with pytest.raises(CAError, match="does not match"):
        ca.open_root(tmp_path, TD, NOW, rng())
