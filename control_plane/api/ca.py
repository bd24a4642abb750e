"""/v1/ca: the certificate authority as a reader may see it: the root that signs now (its
SHA-256 fingerprint, subject and validity), the trust domain, and every root of the trust
bundle sidecars verify peers with. Certificates are public: no key, nor anything derived
from one, is in the answer. `meshlet check` judges the CA's expiry from it, with the control
plane's clock (``now``), which is the one that issues and the one sidecars are told of."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..joins import Joins
from .replies import JSON


class CaView:
    """``joins``: who holds the CA (None: this control plane has none, 404). ``wall``: the clock."""

    def __init__(self, joins: Joins | None, wall: Callable[[], float] = time.time) -> None:
        self.joins = joins
        self.wall = wall

    async def get(self, request: Request) -> Response:
        if self.joins is None:
            return JSONResponse({"problems": ["this control plane has no certificate authority"]}, status_code=404)
        return JSONResponse(ca_json(self.joins, self.wall()))


def ca_json(joins: Joins, now: float) -> JSON:
    authority = joins.authority
    return {
        "trust_domain": authority.current.trust_domain,
        "root": root_json(authority.current.certificate),
        "bundle": [root_json(certificate) for certificate in authority.trusted(now)],
        "now": now,
    }


def root_json(certificate: x509.Certificate) -> JSON:
    return {
        "fingerprint_sha256": hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "subject": certificate.subject.rfc4514_string(),
        "not_before": certificate.not_valid_before_utc.timestamp(),
        "not_after": certificate.not_valid_after_utc.timestamp(),
    }


__all__ = ["CaView", "ca_json", "root_json"]
