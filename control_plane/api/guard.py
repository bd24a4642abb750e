"""Who may read and write the API, and what a reader sees.

Two tokens, each presented as ``Authorization: Bearer TOKEN`` and compared in constant time:

* the write token (``api-token`` in the data directory): applies and rollbacks need it, and a
  reader that presents it sees the policy whole;
* the read token (``--api-read-token``), optional: once set, every request under ``/v1/``
  and every read of Zipkin's API (``GET /api/v2/...``) needs it or the write token.
  ``/``, ``/live``, ``/ready``, ``/metrics`` and ``POST /api/v2/spans`` stay open: probes,
  the page itself (it asks for the token), counters, and the sidecars' spans.

A refusal is a 401 that says which token and where it is, counted by what was missing
(``meshlet_cp_api_refused_total``); the first of each kind is logged as a warning. Neither
token is ever logged or put in an answer.
"""

from __future__ import annotations

import hmac
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("meshlet.cp.api")

READ_TOKEN = "read-token"  # what a refused request lacked: the metric's label
WRITE_TOKEN = "write-token"

_WRITE_HINT = (
    "writing needs the control plane's token (Authorization: Bearer ...); it is in its data "
    "directory, file api-token (meshlet apply --token-file PATH, or MESHLET_TOKEN)"
)
_READ_HINT = (
    "reading needs a token (Authorization: Bearer ...): the control plane's --api-read-token, or its write "
    "token (file api-token in its data directory); meshlet commands take --token or MESHLET_TOKEN"
)


def _bearer(authorization: bytes | str, token: str) -> bool:
    given = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
    return hmac.compare_digest(given, f"Bearer {token}".encode())


class ApiGuard:
    """``write_token`` None: nothing is refused nor redacted (a test's API); ``read_token``
    None: reads are open to all (the policy still redacted for them)."""

    def __init__(self, write_token: str | None, read_token: str | None = None) -> None:
        self._write = write_token
        self._read = read_token
        self.refused: dict[str, int] = {READ_TOKEN: 0, WRITE_TOKEN: 0}

    def __repr__(self) -> str:  # never the tokens
        return f"<ApiGuard write-token={self._write is not None} read-token={self._read is not None}>"

    def may_write(self, request: Request) -> bool:
        return self._write is None or _bearer(request.headers.get("authorization", ""), self._write)

    def sees_secrets(self, request: Request) -> bool:
        """Is the policy shown to this reader whole (it presented the write token)?"""
        return self.may_write(request)

    def write_refused(self, request: Request) -> Response | None:
        """None if ``request`` may write, else the 401 that says where the token is."""
        if self.may_write(request):
            return None
        return self._refuse(WRITE_TOKEN, _WRITE_HINT, request.client)

    def write_refused_always_guarded(self, request: Request, what: str) -> Response | None:
        """As :meth:`write_refused`, for a write that is never open, even where writes are
        (no write token set): minting join tokens, rotating the CA. ``what``: the write, said
        in the refusal."""
        if self._write is None:
            return JSONResponse({"problems": [f"{what} needs the control plane's token"]}, status_code=401)
        return self.write_refused(request)

    def may_read(self, authorization: bytes) -> bool:
        if self._read is None:
            return True
        return _bearer(authorization, self._read) or (self._write is not None and _bearer(authorization, self._write))

    def _refuse(self, need: str, hint: str, client: object) -> Response:
        self.refused[need] += 1
        if self.refused[need] == 1:
            log.warning(
                "refused a request without the %s (from %s); more are counted in meshlet_cp_api_refused_total",
                need,
                _peer(client),
            )
        return JSONResponse({"problems": [hint]}, status_code=401, headers={"www-authenticate": "Bearer"})

    def gate(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind the read token (when one is set)."""
        if self._read is None:
            return app

        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and _needs_read_token(scope["method"], scope["path"]):
                authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
                if not self.may_read(authorization):
                    response = self._refuse(READ_TOKEN, _READ_HINT, scope.get("client"))
                    await response(scope, receive, send)
                    return
            await app(scope, receive, send)

        return gated


def _needs_read_token(method: str, path: str) -> bool:
    return path.startswith("/v1/") or (path.startswith("/api/v2/") and method in ("GET", "HEAD"))


def _peer(client: object) -> str:
    if isinstance(client, tuple | list) and len(client) == 2:
        return f"{client[0]}:{client[1]}"
    host = getattr(client, "host", None)
    return f"{host}:{getattr(client, 'port', '')}" if host else "unknown"


__all__ = ["READ_TOKEN", "WRITE_TOKEN", "ApiGuard"]
