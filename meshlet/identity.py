"""Who a peer is: the mesh's SPIFFE IDs. Pure.

A service's identity is ``spiffe://<trust domain>/service/<name>``: the one URI SAN of its
certificate, and the caller name an AccessPolicy matches. Both sides use these rules: the
control plane writes the ID into the certificates it issues, a sidecar reads it from the
certificate its peer proves. The text comes from a peer, so ``parse_spiffe_id`` accepts
exactly the shape ``spiffe_id`` writes and refuses everything else, saying why, rather than
normalising (a decoded ``%2F`` or a dropped ``.`` segment would make two spellings of one
identity, and a policy check that compares text would see two callers).
"""

from __future__ import annotations

import re

from meshlet.names import is_service_name

# The caller name of a peer that proved nothing (plaintext to an inbound port in permissive
# mode), so an AccessPolicy can allow it by name. It is a valid DNS label, so no certificate
# may name it: spiffe_id and parse_spiffe_id refuse it, and a verified caller can never pass
# for a plaintext one or the other way round.
UNAUTHENTICATED = "unauthenticated"

SCHEME = "spiffe://"
PATH_PREFIX = "/service/"
# The SPIFFE-ID specification's limits: a SPIFFE ID of at most 2048 bytes, a trust domain
# of at most 255.
MAX_SPIFFE_ID = 2048
MAX_TRUST_DOMAIN = 255
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")  # fullmatched: "$" would let a newline through
_SHOWN = 80  # of a refused value, in a reason: enough to recognise it, never a page of it


class IdentityError(ValueError):
    """A SPIFFE ID or a trust domain that the mesh does not accept; the message says why."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 3]}..."


def check_trust_domain(text: object) -> str:
    """A trust domain: 1 to 255 of lowercase ``a-z``, ``0-9``, ``.``, ``-`` and ``_``."""
    if not isinstance(text, str):
        raise IdentityError(f"a trust domain must be a string, not {type(text).__name__}")
    if not text:
        raise IdentityError("the trust domain is empty")
    if len(text) > MAX_TRUST_DOMAIN:
        raise IdentityError(f"trust domain {_shown(text)} is longer than {MAX_TRUST_DOMAIN} characters")
    if not _TRUST_DOMAIN.fullmatch(text):
        raise IdentityError(f"{_shown(text)} is not a trust domain (lowercase a-z, 0-9, '.', '-', '_')")
    return text


def spiffe_id(trust_domain: str, service: str) -> str:
    """The SPIFFE ID of ``service`` in ``trust_domain``: ``spiffe://<td>/service/<name>``."""
    check_trust_domain(trust_domain)
    if not is_service_name(service):
        raise IdentityError(f"{_shown(service)} is not a service name (a DNS label: a-z, 0-9, '-', at most 63)")
    if service == UNAUTHENTICATED:
        raise IdentityError(f"{UNAUTHENTICATED!r} names plaintext callers: no service may hold it as an identity")
    return f"{SCHEME}{trust_domain}{PATH_PREFIX}{service}"


def parse_spiffe_id(uri: object, trust_domain: str) -> str:
    """The service that ``uri`` names, if it is exactly ``spiffe_id(trust_domain, service)``.

    Refused, with IdentityError saying why: anything but a string; over 2048 bytes; another
    scheme or a scheme spelled in capitals; userinfo, a port, a query or a fragment;
    percent-encoding; another trust domain; a path other than ``/service/<name>`` (empty,
    ``.`` or ``..`` segments included); a name that is not a service name, or is
    ``UNAUTHENTICATED``.
    """
    check_trust_domain(trust_domain)
    if not isinstance(uri, str):
        raise IdentityError(f"a SPIFFE ID must be a string, not {type(uri).__name__}")
    if not uri.isascii():
        raise IdentityError(f"SPIFFE ID {_shown(uri)} is not ASCII")
    if len(uri) > MAX_SPIFFE_ID:  # ASCII: one byte a character
        raise IdentityError(f"SPIFFE ID {_shown(uri)} is longer than {MAX_SPIFFE_ID} bytes")
    if not uri.startswith(SCHEME):
        # Case-sensitive on purpose: the specification says "spiffe", and the mesh writes it so.
        raise IdentityError(f"{_shown(uri)} is not a SPIFFE ID (it must start with {SCHEME!r})")
    authority, slash, path = uri[len(SCHEME) :].partition("/")
    path = slash + path
    for character, what in (("%", "percent-encoding"), ("?", "a query"), ("#", "a fragment")):
        if character in uri:
            raise IdentityError(f"SPIFFE ID {_shown(uri)} has {what}")
    if "@" in authority:
        raise IdentityError(f"SPIFFE ID {_shown(uri)} has userinfo")
    if ":" in authority:
        raise IdentityError(f"SPIFFE ID {_shown(uri)} has a port")
    try:
        check_trust_domain(authority)
    except IdentityError as error:
        raise IdentityError(f"SPIFFE ID {_shown(uri)}: {error}") from None
    if authority != trust_domain:
        raise IdentityError(f"SPIFFE ID {_shown(uri)} is from trust domain {authority!r}, not {trust_domain!r}")
    return _service_from_path(uri, path)


def _service_from_path(uri: str, path: str) -> str:
    segments = path.split("/")[1:]  # path is "" or starts with "/"
    if not path or "" in segments:
        raise IdentityError(f"SPIFFE ID {_shown(uri)} has an empty path segment")
    if "." in segments or ".." in segments:
        raise IdentityError(f"SPIFFE ID {_shown(uri)} has a '.' or '..' path segment")
    if len(segments) != 2 or segments[0] != "service":
        raise IdentityError(f"SPIFFE ID {_shown(uri)} is not a service's (its path must be /service/<name>)")
    service = segments[1]
    if not is_service_name(service):
        raise IdentityError(
            f"SPIFFE ID {_shown(uri)} names {_shown(service)}, not a service name (a DNS label: a-z, 0-9, '-')"
        )
    if service == UNAUTHENTICATED:
        raise IdentityError(f"SPIFFE ID {_shown(uri)} names {UNAUTHENTICATED!r}, the name of plaintext callers")
    return service
