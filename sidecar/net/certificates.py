"""What a sidecar reads out of an X.509 certificate: its URI names (where a SPIFFE ID is)."""

from __future__ import annotations

from cryptography import x509


def uri_names(certificate: x509.Certificate) -> list[str]:
    """The certificate's URI subjectAltNames, in order; [] when it has no subjectAltName."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(names.get_values_for_type(x509.UniformResourceIdentifier))
