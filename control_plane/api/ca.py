"""The certificate authority: ``GET /v1/ca`` (the roots, their fingerprints and until when they
are trusted; never a key; readable as any read, guard.py) and ``POST /v1/ca/rotate`` (start a
rotation; needs the write token). The order of a rotation is control_plane/ca_rotation.py's."""

from __future__ import annotations

import logging
import math

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..ca import CAError
from ..ca_rotation import PROPAGATION, Rotation, RotationRefused
from .guard import ApiGuard
from .replies import bad, json_body

log = logging.getLogger("meshlet.cp.api")


class CAApi:
    def __init__(self, rotation: Rotation | None, guard: ApiGuard, token: str | None) -> None:
        self.rotation = rotation
        self.guard = guard
        self.token = token

    async def status(self, request: Request) -> Response:
        if self.rotation is None:
            return _no_ca()
        return JSONResponse(self.rotation.status())

    async def rotate(self, request: Request) -> Response:
        if self.rotation is None:
            return _no_ca()
        if self.token is None:  # rotating is never open, even when writes are
            return JSONResponse({"problems": ["rotating the CA needs the control plane's token"]}, 401)
        if (denied := self.guard.write_refused(request)) is not None:
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
