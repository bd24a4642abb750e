"""Static TLS credentials from files: ``--tls-cert``, ``--tls-key`` and ``--trust-bundle``,
for a mesh without a control plane (or before it issues a certificate).

Checked before the sidecar starts, each failure saying what to do: the key file must be
closed to others (0600; ``chmod 600``), the certificate's one URI SAN must be the SPIFFE ID
of ``--service`` (its trust domain is the mesh's), it must be valid now, and the key must be
the certificate's.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography import x509

from meshlet.identity import SCHEME, IdentityError, parse_spiffe_id
from meshlet.private_files import PrivateFileError, read_private

from ..core.credentials import Credentials
from .certificates import uri_names

MAX_FILE_BYTES = 64 * 1024  # a certificate chain, a key or a bundle: anything larger is not one


class CredentialFileError(Exception):
    """A credential file that cannot be used; the message says why and what to do."""


def load_credentials(cert_path: Path, key_path: Path, bundle_path: Path, service: str) -> Credentials:
    key = _read(key_path, private=True)
    chain = _read(cert_path)
    bundle = _read(bundle_path)
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
        x509.load_pem_x509_certificates(bundle)
    except ValueError as exc:
        raise CredentialFileError(f"{cert_path} or {bundle_path}: not PEM certificates ({exc})") from None
    uris = uri_names(leaf)
    if len(uris) != 1:
        raise CredentialFileError(f"{cert_path}: the certificate has {len(uris)} URI SANs, not one SPIFFE ID")
    trust_domain = uris[0][len(SCHEME) :].partition("/")[0] if uris[0].startswith(SCHEME) else ""
    try:
        named = parse_spiffe_id(uris[0], trust_domain)
    except IdentityError as exc:
        raise CredentialFileError(f"{cert_path}: {exc}") from None
    if named != service:
        raise CredentialFileError(f"{cert_path}: the certificate is {named!r}'s, not --service {service!r}'s")
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    now = time.time()
    if not not_before <= now <= not_after:
        raise CredentialFileError(f"{cert_path}: the certificate is not valid now (expired, or not valid yet)")
    credentials = Credentials(chain, key, bundle, trust_domain, service, not_before, not_after)
    from .tls import build_context  # the ssl contexts the sidecar will build: the key must fit the certificate

    try:
        build_context(credentials, server_side=True)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise CredentialFileError(f"{key_path}: not the key of {cert_path}, or not a key ({exc})") from None
    return credentials


def _read(path: Path, *, private: bool = False) -> bytes:
    """A credential file, bounded; ``private``: the key, which must be closed to group and
    others (meshlet/private_files.py; an operator's file may be a symlink or another user's,
    as Kubernetes mounts secrets)."""
    try:
        if private:
            data = read_private(path, MAX_FILE_BYTES, what="private key", in_data_dir=False)
        else:
            with open(path, "rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)
    except PrivateFileError as exc:
        raise CredentialFileError(str(exc)) from None
    except OSError as exc:
        raise CredentialFileError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CredentialFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes: not a certificate or a key")
    return data
