"""The sidecar's identity: its key, the certificate the control plane issued for it and the
trust bundle, installed into the :class:`CredentialHolder` the TLS layer reads.

The key is made here (EC P-256) and never leaves the process or the data directory: with
``--data-dir`` it is kept in ``<service>.key`` (0600) so a restart keeps it, with the last
certificate (``<service>.crt``) and bundle (``<service>.bundle.pem``) beside it, so a sidecar
restarted while the control plane is away still proves who it is until the certificate
expires. Without a data directory everything lives in memory only.

What the control plane sends is checked before it is used: the leaf must be for our key,
name exactly ``spiffe://<trust domain>/service/<our service>`` and be signed by a root of the
bundle that came with it. A persisted certificate is checked the same way at start.

Renewal (:meth:`SidecarIdentity.renew`) runs on the live session: at ``renewal.renew_at`` (2/3
of the lifetime, less jitter) a ``csr`` message, then the ``cert`` answer; a renewal without an
answer is retried after ``renewal.retry_delay``. Every hello carries a CSR too, so a reconnect
also brings a fresh certificate.
"""

from __future__ import annotations

import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlet import identity, wire
from meshlet.private_files import PrivateFileError, read_private, write_new, write_replacing

from ..core import renewal
from ..core.credentials import CredentialHolder, Credentials
from .certificates import uri_names

log = logging.getLogger("meshlet.identity")

RENEW_ANSWER_TIMEOUT = 30.0  # a csr not answered by then counts as a failed renewal
_MAX_FILE = 64 * 1024  # a key, a chain or a bundle file; more is not one


class IdentityError(Exception):
    """A key file, certificate or bundle this sidecar refuses; the message says why (never key material)."""


class SidecarIdentity:
    def __init__(
        self,
        service: str,
        holder: CredentialHolder,
        *,
        join_token: str | None = None,
        join_token_file: Path | None = None,
        directory: Path | None = None,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.holder = holder
        self._join_token = join_token or ""
        self.join_token_file = join_token_file  # read at each connection: a file mounted later is picked up
        self.directory = directory
        self.rng = rng or random.Random()
        self.wall = wall
        self._key = self._open_key()
        self._key_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._public = _public_der(self._key.public_key())
        self._csr: bytes | None = None
        self.renew_at: float | None = None
        self.renewals = 0  # certificates installed from the control plane
        self._installed = trio.Event()
        self._rescheduled = trio.Event()  # renew_at moved earlier: the renewal task wakes

    def __repr__(self) -> str:  # neither the token nor the key may reach a log
        return f"SidecarIdentity(service={self.service!r}, directory={self.directory!r})"

    @property
    def join_token(self) -> str:
        """The join token to present ("" for none): the value given, or the file's content now."""
        if self.join_token_file is None:
            return self._join_token
        try:
            return read_token_file(self.join_token_file)
        except ValueError as exc:
            log.error("--join-token @%s: %s; joining without a token", self.join_token_file, exc)
            return ""

    # files ----------------------------------------------------------------------------------
    def _path(self, suffix: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{self.service}{suffix}"

    def _open_key(self) -> ec.EllipticCurvePrivateKey:
        path = self._path(".key")
        if path is None:
            return ec.generate_private_key(ec.SECP256R1())
        try:
            return _parse_key(_read_private(path), path)
        except FileNotFoundError:
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            write_new(path, pem)
        except FileExistsError:  # another instance of this service made it first: theirs is ours
            return _parse_key(_read_private(path), path)
        log.info("made a new key in %s", path)
        return key

    def load_persisted(self) -> bool:
        """Install the certificate and bundle kept beside the key, if they are still ours;
        a restart while the control plane is away then still proves who we are."""
        cert_path, bundle_path = self._path(".crt"), self._path(".bundle.pem")
        if cert_path is None or bundle_path is None:
            return False
        try:
            chain, bundle = _read_private(cert_path), _read_private(bundle_path)
        except FileNotFoundError:
            return False
        except IdentityError as exc:
            log.error("not using the persisted certificate: %s", exc)
            return False
        try:
            credentials = self._verified(chain, bundle)
        except IdentityError as exc:
            log.warning("not using the persisted certificate %s: %s", cert_path, exc)
            return False
        self._install(credentials)
        state = renewal.state(self.wall(), credentials.not_before, credentials.not_after, self.renew_at or 0.0)
        log.info("using the persisted certificate %s (%s, until %s)", cert_path, state, _iso(credentials.not_after))
        return True

    def _persist(self, credentials: Credentials) -> None:
        cert_path, bundle_path = self._path(".crt"), self._path(".bundle.pem")
        if cert_path is None or bundle_path is None:
            return
        try:
            write_replacing(bundle_path, credentials.bundle)
            write_replacing(cert_path, credentials.cert_chain)
        except OSError as exc:  # the running identity is unaffected
            log.warning("could not persist the certificate to %s: %s", cert_path, exc)

    # what the control plane sends ------------------------------------------------------------
    def csr(self) -> bytes:
        """A certificate signing request for our key (PEM). It names nothing: the control plane
        issues for the service the session proved, whatever a request asks for."""
        if self._csr is None:
            request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            self._csr = request.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        return self._csr

    def install(self, issued: wire.Issued) -> Credentials:
        """Check and install a certificate the control plane issued; IdentityError if it is
        not for our key and service, or not signed by a root of its bundle."""
        credentials = self._verified(issued.chain, issued.bundle)
        # Its lifetime counts from now, not from not_before: the CA dates that back by a clock
        # skew (a minute), which would make a short-lived certificate due for renewal at once.
        self._install(credentials, start=max(credentials.not_before, self.wall()))
        self.renewals += 1
        self._persist(credentials)
        log.info(
            "certificate for spiffe://%s/service/%s installed, valid until %s (renewal at %s)",
            credentials.trust_domain,
            credentials.service,
            _iso(credentials.not_after),
            _iso(self.renew_at or credentials.not_after),
        )
        return credentials

    def install_bundle(self, bundle: bytes) -> None:
        """A new trust bundle (a CA rotation) for the certificate we hold."""
        current = self.holder.current
        if current is None:
            return  # the next certificate brings its bundle
        roots = _parse_bundle(bundle)
        leaf = x509.load_pem_x509_certificate(current.cert_chain)
        if not any(_signed_by(leaf, root) for root in roots):
            # Our own certificate must stay verifiable by peers trusting this bundle: it is the
            # next renewal's job to move us to the new root, not a bundle's to strand us.
            log.warning("a trust bundle without the root of our certificate: kept until the next renewal")
        self.holder.install(_replace(current, bundle=bundle))
        current = self.holder.current
        assert current is not None
        self._persist(current)
        log.info("trust bundle updated: %d root(s)", len(roots))
        if roots and not _signed_by(leaf, roots[0]):
            self._renew_for_rotation(current)

    def _renew_for_rotation(self, current: Credentials) -> None:
        """The bundle names first the root that signs now, and it did not sign ours (a root
        rotation): renew soon, at a random moment of a short window (core/renewal.py)."""
        soon = renewal.renew_after_rotation(self.wall(), current.not_before, current.not_after, self.rng)
        if self.renew_at is None or soon < self.renew_at:
            self.renew_at = soon
            self._rescheduled.set()
            self._rescheduled = trio.Event()
            log.info("the CA's root changed: renewing the certificate at %s", _iso(soon))

    def _verified(self, chain: bytes, bundle: bytes) -> Credentials:
        try:
            certificates = x509.load_pem_x509_certificates(chain)
        except ValueError:
            raise IdentityError("the certificate is not PEM") from None
        leaf = certificates[0]
        if _public_der(leaf.public_key()) != self._public:
            raise IdentityError("the certificate is for another key than this sidecar's")
        trust_domain, service = _spiffe_identity(leaf)
        if service != self.service:
            raise IdentityError(f"the certificate is {service!r}'s, not {self.service!r}'s")
        if not any(_signed_by(leaf, root) for root in _parse_bundle(bundle)):
            raise IdentityError("the certificate is not signed by a root of its trust bundle")
        return Credentials(
            cert_chain=chain,
            key=self._key_pem,
            bundle=bundle,
            trust_domain=trust_domain,
            service=service,
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
        )

    def _install(self, credentials: Credentials, start: float | None = None) -> None:
        self.holder.install(credentials)
        begin = credentials.not_before if start is None else min(start, credentials.not_after - 1.0)
        self.renew_at = renewal.renew_at(begin, credentials.not_after, self.rng)
        self._installed.set()
        self._installed = trio.Event()

    # state ------------------------------------------------------------------------------------
    def state(self) -> str:
        """``none`` (no certificate yet), ``valid``, ``renew`` (due) or ``expired``."""
        current = self.holder.current
        if current is None or self.renew_at is None:
            return "none"
        return renewal.state(self.wall(), current.not_before, current.not_after, self.renew_at)

    def not_ready(self) -> str:
        """Why the sidecar is not ready for lack of a certificate ("" when it holds a valid one)."""
        state = self.state()
        if state == "none":
            return "no certificate yet (the control plane has not issued one)"
        if state == "expired":
            return "its certificate expired (peers refuse it) and the control plane has not renewed it"
        return ""

    def expires_in(self) -> float | None:
        current = self.holder.current
        return None if current is None else current.not_after - self.wall()

    def describe(self) -> dict[str, Any]:
        """For config_dump: who we are and until when; never the key or the token."""
        current = self.holder.current
        if current is None:
            return {"state": "none", "renewals": self.renewals}
        return {
            "spiffe_id": f"spiffe://{current.trust_domain}/service/{current.service}",
            "state": self.state(),
            "not_after": _iso(current.not_after),
            "renew_at": _iso(self.renew_at or current.not_after),
            "renewals": self.renewals,
            "issuer_fingerprint": _issuer_fingerprint(current),
        }

    # tasks ------------------------------------------------------------------------------------
    async def renew(self, request: Callable[[bytes], Awaitable[None]]) -> None:
        """While a session is up (its nursery runs this): ask for a new certificate at
        ``renew_at`` by ``request(csr)``; the answer arrives through :meth:`install`. A request
        not answered within ``RENEW_ANSWER_TIMEOUT`` is retried after ``renewal.retry_delay``."""
        attempt = 0
        while True:
            current = self.holder.current
            if current is None or self.renew_at is None:
                await self._installed.wait()
                continue
            if attempt == 0:
                rescheduled = self._rescheduled
                with trio.move_on_after(max(0.0, self.renew_at - self.wall())):
                    await rescheduled.wait()
                if rescheduled.is_set():
                    continue  # renew_at moved (a root rotation): sleep until the new time
            generation = self.holder.generation
            if renewal.state(self.wall(), current.not_before, current.not_after, self.renew_at) == "valid":
                attempt = 0
                continue  # a newer certificate arrived meanwhile (a reconnect's hello)
            await request(self.csr())
            with trio.move_on_after(RENEW_ANSWER_TIMEOUT):
                while self.holder.generation == generation:
                    await self._installed.wait()
            if self.holder.generation != generation:
                attempt = 0
                continue
            attempt += 1
            delay = renewal.retry_delay(attempt, self.wall(), current.not_after, self.rng)
            log.warning("certificate renewal got no answer (attempt %d): retrying in %.1f s", attempt, delay)
            await trio.sleep(delay)

    async def watch_expiry(self) -> None:
        """Log at ERROR, once per certificate, when the one we hold expires."""
        while True:
            current = self.holder.current
            if current is None:
                await self._installed.wait()
                continue
            generation = self.holder.generation
            with trio.move_on_after(max(0.0, current.not_after - self.wall())):
                await self._installed.wait()
            if self.holder.generation == generation and self.wall() >= current.not_after:
                log.error(
                    "the certificate of spiffe://%s/service/%s expired at %s: peers refuse it and this sidecar "
                    "reports not ready until the control plane issues a new one (is it reachable?)",
                    current.trust_domain,
                    current.service,
                    _iso(current.not_after),
                )
                await self._installed.wait()


# helpers -----------------------------------------------------------------------------------

_MAX_TOKEN_FILE = 4096  # a join token is 60 characters; a file this large is not one


def read_token_file(path: Path) -> str:
    """The join token in ``path`` (surrounding whitespace dropped); ValueError saying why not,
    never quoting the content."""
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror})") from None
    if len(data) > _MAX_TOKEN_FILE:
        raise ValueError(f"larger than {_MAX_TOKEN_FILE} bytes: not a join token file")
    token = data.decode("ascii", errors="replace").strip()
    if not token:
        raise ValueError("it is empty")
    return token


def _replace(credentials: Credentials, *, bundle: bytes) -> Credentials:
    return Credentials(
        credentials.cert_chain,
        credentials.key,
        bundle,
        credentials.trust_domain,
        credentials.service,
        credentials.not_before,
        credentials.not_after,
    )


def _issuer_fingerprint(credentials: Credentials) -> str:
    """SHA-256 of the root of the bundle that signed our certificate ("" if none did): which
    root we are on, during and after a CA rotation (``meshlet ca status`` shows the same)."""
    leaf = x509.load_pem_x509_certificate(credentials.cert_chain)
    for root in _parse_bundle(credentials.bundle):
        if _signed_by(leaf, root):
            return bytes(root.fingerprint(hashes.SHA256())).hex()
    return ""


def _spiffe_identity(leaf: x509.Certificate) -> tuple[str, str]:
    """(trust domain, service) of the leaf's one URI SAN."""
    uris = uri_names(leaf)  # none without a subjectAltName
    if len(uris) != 1:
        raise IdentityError(f"the certificate has {len(uris)} URI names, not one SPIFFE ID")
    uri = uris[0]
    trust_domain = uri.removeprefix(identity.SCHEME).partition("/")[0]
    try:
        return trust_domain, identity.parse_spiffe_id(uri, trust_domain)
    except identity.IdentityError as exc:
        raise IdentityError(str(exc)) from None


def _parse_bundle(bundle: bytes) -> list[x509.Certificate]:
    try:
        roots = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        raise IdentityError("the trust bundle is not PEM certificates") from None
    return roots


def _signed_by(leaf: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _parse_key(pem: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"{path} is not an unencrypted PEM private key: remove it to have a new one made") from None
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)):
        raise IdentityError(f"{path} is not an EC P-256 key: remove it to have a new one made")
    return key


def _read_private(path: Path) -> bytes:
    """A file only we may read (meshlet/private_files.py: a regular file, not a symlink, ours,
    closed to group and others; checked on the open file). FileNotFoundError passes through."""
    try:
        data = read_private(path, _MAX_FILE, what="identity file")
    except PrivateFileError as exc:
        raise IdentityError(str(exc)) from None
    if len(data) > _MAX_FILE:
        raise IdentityError(f"{path} is larger than {_MAX_FILE} bytes")
    return data


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
