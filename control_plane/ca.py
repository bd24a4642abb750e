"""The control plane's certificate authority: a root, the certificates it signs for sidecars,
and the trust bundle across a root rotation. Pure, but for the file functions at the end.

Theory of operation. A :class:`Root` is a self-signed CA certificate and its key: one this module
creates (:func:`create_root`, ECDSA P-256) or one an operator provides (:func:`load_root`, which
refuses anything that cannot serve as a root). :func:`issue` turns a sidecar's certificate signing
request into a leaf certificate for one service. The CSR is untrusted: its signature must verify
(the sidecar holds the key it names) and its key must be EC P-256, and that is all it contributes.
Its subject and extensions are ignored; the leaf's one name, the URI SAN
``spiffe://<trust domain>/service/<service>`` (meshlet.identity's rules), comes from the service the
caller has authenticated, never from the request.

An :class:`Authority` is the current root plus the roots it replaced, each trusted until the end of
its overlap, and a root staged to sign next: :meth:`Authority.stage` adds a new root to the bundle
that signs only from a later time, :meth:`Authority.advance` carries out what is due (the staged
root signs, the old one retires and cross-signs it, roots whose overlap is over leave), and
:meth:`Authority.bundle` is the PEM of every root trusted at a given time, so a leaf signed by the
previous root keeps verifying until its overlap ends. The order is control_plane/ca_rotation.py's.

The files: the root's key and certificate in the control plane's data directory (the key 0600,
written atomically, refused when a symlink, another user's or open to others), a staged root's
beside them, the retired roots' certificates in an index (:func:`write_authority`), and an
operator's key file, which only has to be closed to others.

Time is a float of seconds since the epoch, passed in; certificates hold whole seconds, so times are
rounded down. ``rng`` draws serial numbers only (pass ``random.SystemRandom()`` outside tests):
keys always come from the operating system's CSPRNG, through ``cryptography``.
"""

from __future__ import annotations

import datetime
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlet import identity
from meshlet.private_files import PrivateFileError, read_private, write_replacing

ROOT_VALIDITY = 10 * 365 * 24 * 3600.0  # a root outlives many rotations of the leaves it signs
LEAF_LIFETIME = 24 * 3600.0  # short-lived identities: a stolen key is worth a day at most
# Every leaf the old root signed expires within one leaf lifetime; twice that leaves sidecars a
# full lifetime to renew from the new root while the control plane is away.
ROTATION_OVERLAP = 2 * LEAF_LIFETIME
CLOCK_SKEW = 60.0  # a leaf is valid from this long before it is issued: peers' clocks differ
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is ~500 bytes of PEM: anything this large is not one
MAX_PEM_BYTES = 64 * 1024  # a certificate or key file an operator provides; bounds what we parse
_COMMON_NAME_LIMIT = 64  # X.509's upper bound on a CN
_CROSS_SERIALS = random.SystemRandom()  # a cross certificate's serial (Authority.advance takes no rng)

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_ROOT_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048
_TLS_PURPOSES = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # mTLS: both ends


class CAError(Exception):
    """A request, certificate, key or file the CA refuses; ``reason`` says why, in words an
    operator can act on. It never contains key material."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# names ----------------------------------------------------------------------------------------


def _checked_trust_domain(trust_domain: object) -> str:
    try:
        return identity.check_trust_domain(trust_domain)
    except identity.IdentityError as error:
        raise CAError(str(error)) from None


def _spiffe_id(trust_domain: str, service: str) -> str:
    try:
        return identity.spiffe_id(trust_domain, service)
    except identity.IdentityError as error:
        raise CAError(str(error)) from None


# roots ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Root:
    """A CA certificate and its key, for one trust domain."""

    certificate: x509.Certificate
    key: CAKey = field(repr=False)
    trust_domain: str

    @property
    def not_before(self) -> float:
        return self.certificate.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    def is_valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.not_after

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        """The key, unencrypted PKCS #8: for a 0600 file (:func:`write_root`) and nowhere else."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def create_root(trust_domain: str, now: float, rng: random.Random, validity: float = ROOT_VALIDITY) -> Root:
    """A new self-signed ECDSA P-256 root, valid from ``now`` (less the clock skew) for ``validity``
    seconds. It signs leaves only (pathlen 0)."""
    _checked_trust_domain(trust_domain)
    _check_positive("validity", validity)
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = f"meshlet root {trust_domain}"
    if len(common_name) > _COMMON_NAME_LIMIT:  # a label for people: the trust domain is in each leaf
        common_name = "meshlet root"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial_number(rng))
        .not_valid_before(_utc(now - CLOCK_SKEW))
        .not_valid_after(_utc(now + validity))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Root(certificate, key, trust_domain)


def load_root(cert_pem: bytes, key_pem: bytes, trust_domain: str, now: float) -> Root:
    """An operator's root (``--ca-cert``/``--ca-key``), or CAError saying why it cannot be one:
    not a self-signed CA certificate, a key that is not its key, not valid at ``now``, or a key
    that is not EC P-256/P-384 or RSA of at least 2048 bits."""
    _checked_trust_domain(trust_domain)
    certificate = _parse_certificate(cert_pem)
    key = _parse_ca_key(key_pem)
    if _public_der(certificate.public_key()) != _public_der(key.public_key()):
        raise CAError("the CA key does not match the CA certificate (its public key is another one)")
    _check_is_root(certificate)
    root = Root(certificate, key, trust_domain)
    _check_valid_at(root, now)
    return root


def _parse_certificate(pem: bytes) -> x509.Certificate:
    if len(pem) > MAX_PEM_BYTES:
        raise CAError(f"the CA certificate is {len(pem)} bytes: more than {MAX_PEM_BYTES} is not one certificate")
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CAError("the CA certificate is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def _parse_ca_key(pem: bytes) -> CAKey:
    if len(pem) > MAX_PEM_BYTES:
        raise CAError(f"the CA key is {len(pem)} bytes: more than {MAX_PEM_BYTES} is not one key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise CAError("the CA key is encrypted: give it unencrypted, in a file only its owner can read") from None
    except (ValueError, UnsupportedAlgorithm):
        # from None: the parser's message may quote the key's bytes
        raise CAError("the CA key is not a PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _ROOT_CURVES):
        return key
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= _MIN_RSA_BITS:
        return key
    raise CAError(
        f"the CA key is {_describe_key(key)}: a CA key must be EC P-256 or P-384, or RSA of 2048 bits or more"
    )


def _check_is_root(certificate: x509.Certificate) -> None:
    """A CA certificate that signs certificates and is its own issuer. Intermediates are refused:
    sidecars get the root as their whole trust bundle, and a TLS stack that is given a
    non-self-signed anchor verifies nothing against it unless told to accept partial chains."""
    if certificate.version is not x509.Version.v3:
        raise CAError("the CA certificate is not an X.509 v3 certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise CAError("the CA certificate is not a CA certificate (it has no basicConstraints CA:TRUE)") from None
    if not constraints.value.ca:
        raise CAError("the CA certificate is not a CA certificate (basicConstraints CA:FALSE)")
    # What RFC 5280 requires of a CA certificate and strict verifiers (OpenSSL's x509_strict,
    # Python's default TLS context since 3.13) enforce: without it, no chain to this root verifies.
    if not constraints.critical:
        raise CAError("the CA certificate's basicConstraints is not marked critical, as RFC 5280 requires")
    try:
        certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise CAError(
            "the CA certificate has no subjectKeyIdentifier, which RFC 5280 requires of a CA "
            "(strict TLS verifiers refuse chains to it)"
        ) from None
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CAError("the CA certificate has no keyUsage: a CA certificate needs keyCertSign") from None
    if not usage.key_cert_sign:
        raise CAError("the CA certificate's keyUsage does not allow keyCertSign (signing certificates)")
    try:
        purposes = set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        purposes = {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    # A CA's extendedKeyUsage limits what the certificates under it may do, to OpenSSL at least.
    if ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in purposes and not _TLS_PURPOSES <= purposes:
        raise CAError("the CA certificate's extendedKeyUsage does not allow serverAuth and clientAuth (TLS)")
    if certificate.issuer != certificate.subject:
        raise CAError(
            "the CA certificate is not self-signed (its issuer is another CA): give a root, "
            "intermediate CAs are not supported"
        )
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise CAError(
            "the CA certificate is not self-signed (its signature does not verify with its own key)"
        ) from None


def _check_valid_at(root: Root, now: float) -> None:
    if now < root.not_before:
        raise CAError(f"the CA certificate is not valid yet (from {_iso(root.not_before)}, now {_iso(now)})")
    if now > root.not_after:
        raise CAError(f"the CA certificate has expired (on {_iso(root.not_after)}, now {_iso(now)})")


# issuance -------------------------------------------------------------------------------------


def issue(
    root: Root,
    csr_pem: bytes,
    service: str,
    trust_domain: str,
    now: float,
    rng: random.Random,
    lifetime: float = LEAF_LIFETIME,
) -> bytes:
    """A leaf certificate (PEM) for ``service``, for the key in ``csr_pem``, signed by ``root``.

    ``service`` is the one the caller's credential names. The leaf's only name is its SPIFFE ID;
    it is valid from ``now`` less the clock skew until ``now + lifetime`` or the root's expiry,
    whichever is first. CAError says why a request is refused."""
    spiffe_id = _spiffe_id(trust_domain, service)
    if trust_domain != root.trust_domain:
        raise CAError(f"this CA's trust domain is {root.trust_domain!r}, not {trust_domain!r}")
    _check_positive("lifetime", lifetime)
    _check_valid_at(root, now)
    public_key = _requested_key(csr_pem)
    not_before = max(now - CLOCK_SKEW, root.not_before)
    not_after = min(now + lifetime, root.not_after)
    certificate = (
        x509.CertificateBuilder()
        # An empty subject, so nothing but the SAN names the leaf (RFC 5280 then wants the SAN critical).
        .subject_name(x509.Name([]))
        .issuer_name(root.certificate.subject)
        .public_key(public_key)
        .serial_number(_serial_number(rng))
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(root.certificate), critical=False)
        .sign(root.key, _signature_hash(root.key))
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def _requested_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of an untrusted CSR, once its signature shows the sender holds the key.
    Nothing else is read from it."""
    if not isinstance(csr_pem, bytes):
        raise CAError(f"the CSR must be bytes, not {type(csr_pem).__name__}")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CAError(f"the CSR is {len(csr_pem)} bytes: more than {MAX_CSR_BYTES} is not one CSR")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        raise CAError("the CSR is not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----)") from None
    if not signed:
        raise CAError("the CSR's signature does not verify: it was altered, or not signed by the key it names")
    if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
        raise CAError(f"the CSR's key is {_describe_key(public_key)}: a sidecar's key must be EC P-256")
    return public_key


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value  # load_root checked it
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _signature_hash(key: CAKey) -> hashes.SHA256 | hashes.SHA384:
    # The hash matched to the curve's strength, as TLS's signature schemes pair them.
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


# trust bundle and rotation --------------------------------------------------------------------


@dataclass(frozen=True)
class Retired:
    """A root that no longer signs, still trusted until ``trusted_until``. Only its certificate is
    kept: nothing is signed with its key again."""

    certificate: x509.Certificate
    trusted_until: float

    def is_trusted_at(self, now: float) -> bool:
        expires = self.certificate.not_valid_after_utc.timestamp()
        return now <= min(self.trusted_until, expires)


@dataclass(frozen=True)
class Staged:
    """A new root that peers are told to trust now and that signs from ``signs_from`` on (once
    the bundle naming it has reached them); the root it replaces is then trusted ``overlap``
    seconds more."""

    root: Root
    signs_from: float
    overlap: float


@dataclass(frozen=True)
class Authority:
    """The root that signs now, the root staged to sign next (a rotation under way) and the
    roots it replaced that are still trusted. Immutable: :meth:`stage`, :meth:`advance` and
    :meth:`rotate` return the next Authority."""

    current: Root
    retired: tuple[Retired, ...] = ()
    next: Staged | None = None
    # The current root's certificate signed by the root it replaced, while that one is trusted:
    # the control plane sends it with its own certificate, so that a sidecar that missed the
    # rotation (its bundle has only the old root) still verifies the control plane, and is
    # given the new bundle (cross_certificate).
    cross: x509.Certificate | None = None

    def stage(
        self,
        now: float,
        rng: random.Random,
        overlap: float = ROTATION_OVERLAP,
        propagation: float = 0.0,
        validity: float = ROOT_VALIDITY,
    ) -> Authority:
        """Begin a rotation: a new root joins the bundle at once and signs from
        ``now + propagation``; the current root is trusted ``overlap`` seconds past that.
        CAError if a rotation is already under way."""
        _check_duration("overlap", overlap)
        _check_duration("propagation", propagation)
        if self.next is not None:
            raise CAError(
                f"a rotation is already under way: its new root signs from {_iso(self.next.signs_from)}; "
                "rotate again after that"
            )
        root = create_root(self.current.trust_domain, now, rng, validity)
        return Authority(self.current, self.retired, Staged(root, now + propagation, overlap), self.cross)

    def advance(self, now: float) -> Authority:
        """The authority at ``now``: the staged root signs once its time has come (the current
        one retired until ``signs_from + overlap``), roots whose overlap is over are dropped.
        ``self`` when nothing changed."""
        current, retired, staged, cross = self.current, self.retired, self.next, self.cross
        if staged is not None and now >= staged.signs_from:
            until = staged.signs_from + staged.overlap
            retired = (Retired(current.certificate, until), *retired)
            cross = cross_certificate(staged.root, current, now, until, _CROSS_SERIALS)
            current, staged = staged.root, None
        kept = tuple(r for r in retired if r.is_trusted_at(now))
        if cross is not None and now > cross.not_valid_after_utc.timestamp():
            cross = None  # the old root's overlap is over
        if current is self.current and kept == self.retired and cross is self.cross:
            return self
        return Authority(current, kept, staged, cross)

    def rotate(
        self, now: float, rng: random.Random, overlap: float = ROTATION_OVERLAP, validity: float = ROOT_VALIDITY
    ) -> Authority:
        """A new root signs from ``now``; the current one stays trusted until ``now + overlap``
        (or its own expiry). Roots whose overlap is over are dropped."""
        return self.stage(now, rng, overlap, 0.0, validity).advance(now)

    def next_change(self) -> float | None:
        """When :meth:`advance` will next change something: the staged root's start, or the
        end of a retired root's trust (None: never, short of another rotation)."""
        times = [min(r.trusted_until, r.certificate.not_valid_after_utc.timestamp()) for r in self.retired]
        if self.next is not None:
            times.append(self.next.signs_from)
        return min(times) if times else None

    def issue(
        self, csr_pem: bytes, service: str, now: float, rng: random.Random, lifetime: float = LEAF_LIFETIME
    ) -> bytes:
        """:func:`issue` with the current root, for its trust domain."""
        return issue(self.current, csr_pem, service, self.current.trust_domain, now, rng, lifetime)

    def trusted(self, now: float) -> tuple[x509.Certificate, ...]:
        """The roots a peer should trust at ``now``: the current one first (the one that
        signs: a sidecar whose certificate another root signed renews early), then the staged
        one, then those still in their overlap, newest first."""
        current = (self.current.certificate,) if self.current.is_valid_at(now) else ()
        staged = (self.next.root.certificate,) if self.next is not None else ()
        return current + staged + tuple(r.certificate for r in self.retired if r.is_trusted_at(now))

    def bundle(self, now: float) -> bytes:
        """:meth:`trusted` as one PEM file, as TLS stacks read a CA file."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.trusted(now))


def cross_certificate(new: Root, old: Root, now: float, until: float, rng: random.Random) -> x509.Certificate:
    """``new``'s key and name in a CA certificate that ``old`` signs, valid until ``until``: a
    verifier that trusts ``old`` only builds leaf → this → ``old``; one that trusts ``new`` stops
    at ``new``. Both roots of a rotation have the same name, so this certificate is self-issued
    (RFC 5280): it does not count against ``old``'s path length of 0."""
    ski = new.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(new.certificate.subject)
        .issuer_name(old.certificate.subject)
        .public_key(new.key.public_key())
        .serial_number(_serial_number(rng))
        .not_valid_before(_utc(max(now - CLOCK_SKEW, old.not_before)))
        .not_valid_after(_utc(min(until, old.not_after, new.not_after)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(_authority_key_identifier(old.certificate), critical=False)
        .sign(old.key, _signature_hash(old.key))
    )


# files ----------------------------------------------------------------------------------------

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"


def open_root(directory: Path, trust_domain: str, now: float, rng: random.Random) -> Root:
    """The root kept in ``directory``, or a new one written there when it holds none (a first
    start). A directory with only one of the two files is refused: replacing a CA that sidecars
    trust would cut every one of them off."""
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    present = [p.name for p in (key_path, cert_path) if p.exists()]
    if len(present) == 1:
        missing = KEY_FILE if present == [CERT_FILE] else CERT_FILE
        raise CAError(f"{directory} holds {present[0]} but not {missing}: restore it, or remove both for a new CA")
    if present:
        return read_root(directory, trust_domain, now)
    root = create_root(trust_domain, now, rng)
    write_root(directory, root)
    return root


def write_root(directory: Path, root: Root) -> None:
    """The root's key (mode 0600) and certificate in ``directory``, which is created 0700 if
    missing. The key is written first: after a crash between the two, loading refuses a key that
    does not match the certificate, rather than using a stale pair."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(directory / KEY_FILE, root.private_key_pem())
    write_replacing(directory / CERT_FILE, root.certificate_pem(), 0o644)


def read_root(directory: Path, trust_domain: str, now: float) -> Root:
    cert_pem = _read_file(directory / CERT_FILE)
    return load_root(cert_pem, read_private_file(directory / KEY_FILE), trust_domain, now)


AUTHORITY_FILE = "authority.json"  # the retired roots (certificates only) and a staged rotation
NEXT_KEY_FILE = "next.key"  # the staged root, until it signs
NEXT_CERT_FILE = "next.crt"
MAX_AUTHORITY_FILE = 1024 * 1024  # a few roots' PEM; more is not ours
_AUTHORITY_VERSION = 1


def open_authority(directory: Path, trust_domain: str, now: float, rng: random.Random) -> Authority:
    """The authority kept in ``directory``: its root (:func:`open_root`), the retired roots still
    in their overlap and a staged rotation, advanced to ``now`` (and written back if that
    changed anything). CAError says why a file cannot be used."""
    root = open_root(directory, trust_domain, now, rng)
    retired, staged, cross = _read_state(directory, root, trust_domain, now)
    authority = Authority(root, retired, staged, cross)
    advanced = authority.advance(now)
    if advanced is not authority:
        write_authority(directory, advanced)
    return advanced


def write_authority(directory: Path, authority: Authority) -> None:
    """``authority`` in ``directory``. The index first, then the root that signs, then the staged
    root's files go: a crash between two steps leaves a state :func:`open_authority` reads as
    the old or the new authority (an index naming the current root as retired is ignored, and
    a staged root that already signs is no longer staged)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged, cross = authority.next, authority.cross
    if staged is not None:
        write_private_file(directory / NEXT_KEY_FILE, staged.root.private_key_pem())
        write_replacing(directory / NEXT_CERT_FILE, staged.root.certificate_pem(), 0o644)
    index = {
        "version": _AUTHORITY_VERSION,
        "retired": [
            {"certificate": r.certificate.public_bytes(serialization.Encoding.PEM).decode(), "until": r.trusted_until}
            for r in authority.retired
        ],
        "next": None if staged is None else {"signs_from": staged.signs_from, "overlap": staged.overlap},
        "cross": None if cross is None else cross.public_bytes(serialization.Encoding.PEM).decode(),
    }
    write_replacing(directory / AUTHORITY_FILE, json.dumps(index, indent=1).encode(), 0o644)
    try:
        on_disk = _parse_certificate(_read_file(directory / CERT_FILE))
    except (OSError, CAError):
        on_disk = None
    if on_disk != authority.current.certificate:
        write_root(directory, authority.current)
    if staged is None:
        for name in (NEXT_KEY_FILE, NEXT_CERT_FILE):
            (directory / name).unlink(missing_ok=True)


def _read_state(
    directory: Path, root: Root, trust_domain: str, now: float
) -> tuple[tuple[Retired, ...], Staged | None, x509.Certificate | None]:
    path = directory / AUTHORITY_FILE
    try:
        raw = _read_file(path, MAX_AUTHORITY_FILE)
    except FileNotFoundError:
        return (), None, None
    try:
        index = json.loads(raw)
        if index.get("version") != _AUTHORITY_VERSION:
            raise CAError(f"{path}: version {index.get('version')!r}, this control plane reads version 1")
        retired = tuple(
            Retired(_parse_certificate(entry["certificate"].encode()), _seconds(entry["until"]))
            for entry in index["retired"]
        )
        plan = index["next"]
        signs_from, overlap = (None, 0.0) if plan is None else (_seconds(plan["signs_from"]), plan["overlap"])
        cross_pem = index.get("cross")
        cross = None if cross_pem is None else _parse_certificate(cross_pem.encode())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CAError(f"{path} is not this control plane's authority index ({type(error).__name__})") from None
    retired = tuple(r for r in retired if r.certificate != root.certificate)  # a crash mid-promotion
    staged = None
    if signs_from is not None:
        next_root = load_root(
            _read_file(directory / NEXT_CERT_FILE), read_private_file(directory / NEXT_KEY_FILE), trust_domain, now
        )
        if next_root.certificate != root.certificate:  # else it signs already: a crash mid-promotion
            staged = Staged(next_root, signs_from, _seconds(overlap))
    if cross is not None and _public_der(cross.public_key()) != _public_der(root.certificate.public_key()):
        cross = None  # not the current root's: a crash mid-promotion
    return retired, staged, cross


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("not a time")
    return float(value)


def read_operator_root(cert_path: Path, key_path: Path, trust_domain: str, now: float) -> Root:
    """The root an operator provides (``--ca-cert``/``--ca-key``), read and checked by :func:`load_root`."""
    return load_root(_read_file(cert_path), read_operator_key(key_path), trust_domain, now)


def write_private_file(path: Path, data: bytes) -> None:
    """``data`` in a file only its owner can read (0600), replacing ``path`` atomically."""
    write_replacing(path, data, 0o600)


def read_private_file(path: Path) -> bytes:
    """A key file in the control plane's data directory. Refused unless it is a regular file (a
    symlink planted there must not choose the key we trust), this process's user's, and closed
    to group and others (a leaked CA key lets its holder be any service until the CA changes)."""
    return _bounded(_private(path, in_data_dir=True), path)


def read_operator_key(path: Path) -> bytes:
    """A key file an operator names (``--ca-key``): it may be a symlink (as Kubernetes mounts
    secrets) and another user's, but it must be closed to group and others."""
    return _bounded(_private(path, in_data_dir=False), path)


def _private(path: Path, *, in_data_dir: bool) -> bytes:
    try:
        return read_private(path, MAX_PEM_BYTES, what="key file", in_data_dir=in_data_dir)
    except PrivateFileError as error:
        raise CAError(str(error)) from None


def _read_file(path: Path, limit: int = MAX_PEM_BYTES) -> bytes:
    with open(path, "rb") as file:
        return _bounded(file.read(limit + 1), path, limit)


def _bounded(data: bytes, path: Path, limit: int = MAX_PEM_BYTES) -> bytes:
    if len(data) > limit:
        raise CAError(f"{path} is larger than {limit} bytes: not a certificate or key")
    return data


# helpers --------------------------------------------------------------------------------------


def _serial_number(rng: random.Random) -> int:
    # Positive and at most 20 octets (RFC 5280 §4.1.2.2): 159 random bits, never 0.
    return rng.getrandbits(159) or 1


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""  # another kind of key: matches no CA key
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "") or "unknown"


def _check_duration(what: str, seconds: float) -> None:
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
        raise CAError(f"{what} must be a number of seconds, 0 or more, not {seconds!r}")


def _check_positive(what: str, seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise CAError(f"{what} must be a number of seconds greater than 0, not {seconds!r}")


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(math.floor(seconds), tz=datetime.UTC)


def iso(seconds: float) -> str:
    """``seconds`` since the epoch as an ISO 8601 UTC time, to the second."""
    return _utc(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


_iso = iso
