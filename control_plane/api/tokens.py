"""POST /v1/tokens: mint a join token (needs the write token). The record (the secret's hash,
its scope and expiry) goes to the store; the token's text is in the answer and nowhere else:
not in the store, the log or any later answer."""

from __future__ import annotations

import logging
import math
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meshlet.names import is_service_name

from ..store import StoreError
from ..token_records import TokenBook
from .guard import ApiGuard
from .replies import bad, json_body, store_failed

log = logging.getLogger("meshlet.cp.api")

DEFAULT_TTL = 24 * 3600.0  # a minted token expires; only the bootstrap token never does


class TokenApi:
    def __init__(self, book: TokenBook | None, guard: ApiGuard) -> None:
        self.book = book
        self.guard = guard

    async def create(self, request: Request) -> Response:
        if self.book is None:
            return JSONResponse({"problems": ["this control plane does not mint join tokens"]}, status_code=404)
        if (denied := self.guard.write_refused_always_guarded(request, "minting join tokens")) is not None:
            return denied
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        service, ttl = body.get("service"), body.get("ttl", DEFAULT_TTL)
        if service is not None and not is_service_name(service):
            return bad("\"service\" must be a service name (a DNS label: a-z, 0-9, '-') or null for any service")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (math.isfinite(ttl) and ttl > 0):
            return bad('"ttl" must be a number of seconds greater than 0')
        try:
            text, record = await self.book.mint(service, float(ttl), time.time())
        except StoreError as exc:
            return store_failed(exc)
        log.info(
            "join token %s minted for %s, valid %gs",
            record.id,
            f"service {service!r}" if service else "any service",
            ttl,
        )
        return JSONResponse(
            {"token": text, "id": record.id, "service": record.service, "expires": record.expires}, status_code=201
        )
