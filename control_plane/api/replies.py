"""The answers every part of the API shares: the 400, the store's failure, a JSON body read
within its limit. (The 401 of a request without its token is guard.py's.)"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..bodies import read_body
from ..store import StoreError, StoreFull

log = logging.getLogger("meshlet.cp.api")

MAX_API_BODY = 4 * 1024 * 1024  # a PUT of policy files or a rollback; read with a running count

JSON = dict[str, Any]


def bad(message: str) -> Response:
    return JSONResponse({"problems": [message]}, status_code=400)


def no_metrics() -> Response:
    """What /v1/stat and /v1/stream answer when the control plane was started without a scraper."""
    return JSONResponse({"problems": ["this control plane does not read sidecar metrics"]}, status_code=404)


def store_failed(exc: StoreError) -> Response:
    """The store could not be read or written: say which file and what to do, never a traceback.
    A full disk is 507 Insufficient Storage (WebDAV's, as etcd and S3 gateways answer it)."""
    log.error("%s", exc)
    return JSONResponse({"problems": [str(exc)]}, status_code=507 if isinstance(exc, StoreFull) else 500)


async def json_body(request: Request) -> JSON | Response:
    """The body as a JSON object, or the 400/413 that says why not."""
    raw = await read_body(request, MAX_API_BODY)
    if isinstance(raw, Response):
        return raw
    try:
        body = json.loads(raw)
    except ValueError:
        return bad("the body must be JSON")
    if not isinstance(body, dict):
        return bad("the body must be a JSON object")
    return body
