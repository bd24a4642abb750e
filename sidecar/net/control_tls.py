"""The push channel over TLS, the sidecar's end: it verifies the control plane and presents
its own certificate once it holds one.

The control plane must prove ``spiffe://<trust domain>/control-plane`` with a certificate a
root of the sidecar's bundle signed: the bundle of its current credentials (persisted across
restarts), else the roots of ``--control-plane-ca``. A sidecar that has neither (its very
first join, without the flag) cannot verify anything: it trusts the control plane on first
use, says so at WARNING with the certificate's SHA-256 fingerprint, and checks, once the
control plane has issued its certificate, that both come from the same CA. Pass
``--control-plane-ca <data dir>/ca/ca.crt`` to avoid that first blind step.

The client certificate is presented while it is valid; an expired one is not (the control
plane would refuse the handshake), and the join token decides instead.

This is the control channel, not the request path: trio's SSLStream is fine here.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import tempfile
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshlet import identity, wire

from .certificates import uri_names
from .identity import SidecarIdentity

log = logging.getLogger("meshlet.control")


class ControlPlaneTLS:
    def __init__(self, me: SidecarIdentity, pinned: bytes | None = None) -> None:
        self.me = me
        self.pinned = pinned  # --control-plane-ca: roots to verify the control plane with
        self._context: tuple[tuple[int, bool], ssl.SSLContext] | None = None
        self.control_plane_certificate: x509.Certificate | None = None  # the last one seen
        self._trusted_on_first_use: set[str] = set()  # fingerprints already warned about

    def context(self) -> ssl.SSLContext:
        """Made again when the credentials change (or the certificate expires)."""
        current = self.me.holder.current
        presents = current is not None and self.me.state() in ("valid", "renew")
        key = (self.me.holder.generation, presents)
        if self._context is not None and self._context[0] == key:
            return self._context[1]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # the SPIFFE ID is checked instead (verified below)
        roots = current.bundle if current is not None else self.pinned
        if roots:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=roots.decode("ascii", errors="replace"))
        else:
            context.verify_mode = ssl.CERT_NONE  # first use: nothing to verify with (see above)
        if presents and current is not None:
            with tempfile.TemporaryDirectory(prefix="meshlet-cp-tls-") as directory:  # 0700; gone at once
                cert, key_file = Path(directory) / "cert.pem", Path(directory) / "key.pem"
                cert.write_bytes(current.cert_chain)
                key_file.touch(mode=0o600)
                key_file.write_bytes(current.key)
                context.load_cert_chain(cert, key_file)
        self._context = (key, context)
        return context

    async def wrap(self, stream: trio.SocketStream) -> trio.SSLStream[trio.SocketStream]:
        """``stream`` under TLS, the control plane verified (WireError saying why not)."""
        context = self.context()
        tls = trio.SSLStream(stream, context)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            why = exc.__cause__ or exc
            raise wire.WireError(
                "tls",
                f"TLS with the control plane failed: {why} (if its CA changed, this sidecar no longer trusts it: "
                f"remove {self.me.service}.bundle.pem and .crt from its data dir, or pass --control-plane-ca)",
            ) from None
        der = tls.getpeercert(binary_form=True)
        if not der:
            raise wire.WireError("tls", "the control plane presented no certificate")
        certificate = x509.load_der_x509_certificate(der)
        self.control_plane_certificate = certificate
        if context.verify_mode == ssl.CERT_NONE:
            self._warn_first_use(certificate)
        else:
            self._check_name(certificate)
        return tls

    def _check_name(self, certificate: x509.Certificate) -> None:
        """The verified certificate must be the control plane's of our trust domain."""
        current = self.me.holder.current
        uris = uri_names(certificate)
        if current is not None:
            expected = f"{identity.SCHEME}{current.trust_domain}/control-plane"
            if uris != [expected]:
                raise wire.WireError("tls", f"the control plane's certificate names {uris}, not {expected}")
        elif len(uris) != 1 or not uris[0].startswith(identity.SCHEME) or not uris[0].endswith("/control-plane"):
            raise wire.WireError("tls", f"the control plane's certificate names {uris}, not a control plane")

    def _warn_first_use(self, certificate: x509.Certificate) -> None:
        fingerprint = hashlib.sha256(certificate.public_bytes(_DER)).hexdigest()
        if fingerprint in self._trusted_on_first_use:
            return
        self._trusted_on_first_use.add(fingerprint)
        log.warning(
            "trusting the control plane on first use: no trust bundle yet to verify it with; its certificate's "
            "SHA-256 fingerprint is %s (names %s). Pass --control-plane-ca with its CA certificate "
            "(DATA_DIR/ca/ca.crt) to verify it from the first connection",
            fingerprint,
            uri_names(certificate),
        )

    def check_issuer(self) -> None:
        """After a first join on trust: the control plane's certificate must come from the CA
        that just issued ours (else it was not the control plane we joined)."""
        current, seen = self.me.holder.current, self.control_plane_certificate
        if current is None or seen is None:
            return
        for root in x509.load_pem_x509_certificates(current.bundle):
            try:
                seen.verify_directly_issued_by(root)
                return
            except (ValueError, TypeError, InvalidSignature):
                continue
        raise wire.WireError("tls", "the control plane's certificate is not from the CA that issued ours")


_DER = serialization.Encoding.DER
