"""The certificate authority: ``GET /v1/ca`` and ``POST /v1/ca/rotate``.

``GET /v1/ca`` shows the CA as a reader may see it (readable as any read, guard.py): the root
that signs now (its SHA-256 fingerprint, subject and validity), the trust domain, every root of
the trust bundle sidecars verify peers with, and a rotation's state (the staged root, the
retired roots and until when they are trusted). Certificates are public: no key, nor anything
derived from one, is in the answer. `meshlet check` judges the CA's expiry from it, with the
control plane's clock (``now``), which is the one that issues and the one sidecars are told of.

``POST /v1/ca/rotate`` starts a rotation (needs the write token); its order is
control_plane/ca_rotation.py's."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..ca import CAError
from ..ca_rotation import PROPAGATION, Rotation, RotationRefused
from ..joins import Joins
from .guard import ApiGuard
from .replies import JSON, bad, json_body

log = logging.getLogger("meshlet.cp.api")


class CAApi:
    """``joins``: who holds the CA (None: this control plane has none, 404); ``rotation``: what
    rotates it (None: reads only). ``wall``: the clock."""

    def __init__(
        self,
        joins: Joins | None,
        rotation: Rotation | None,
        guard: ApiGuard,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.joins = joins
        self.rotation = rotation
        self.guard = guard
        self.wall = wall

    async def status(self, request: Request) -> Response:
        if self.joins is None:
            return _no_ca()
        body = ca_json(self.joins, self.wall())
        if self.rotation is not None:
            body.update(self.rotation.status())
        return JSONResponse(body)

    async def rotate(self, request: Request) -> Response:
        if self.rotation is None:
            return _no_ca()
        if (denied := self.guard.write_refused_always_guarded(request, "rotating the CA")) is not None:
            return denied
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        overlap, propagation = body.get("overlap"), body.get("propagation", PROPAGATION)
        if overlap is not None and not _seconds(overlap):
            return bad('"overlap" must be a number of seconds, or null for the default')
        if not _seconds(propagation):
            return bad('"propagation" must be a number of seconds')
        try:
            status = self.rotation.rotate(None if overlap is None else float(overlap), float(propagation))
        except RotationRefused as exc:
            return JSONResponse({"problems": [str(exc)]}, status_code=409)
        except (CAError, OSError) as exc:  # the new root could not be written: nothing changed
            log.error("CA rotation failed: %s", exc)
            return JSONResponse({"problems": [f"the rotation failed, nothing changed: {exc}"]}, status_code=500)
        return JSONResponse(status, status_code=201)


def _seconds(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= 0


def _no_ca() -> Response:
    return JSONResponse({"problems": ["this control plane has no certificate authority"]}, status_code=404)


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


__all__ = ["CAApi", "ca_json", "root_json"]
