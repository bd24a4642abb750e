"""/v1/policies: the running policy (GET), applying files (PUT, a dry run too), its history and
rollback. Writes carry the token; one apply runs at a time. A reader without the write token
gets the policy's texts redacted (control_plane/redaction.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meshlet import wire
from meshlet.policy import PolicyError
from meshlet.wire import POLICIES

from ..policies import ApplyResult, PolicyStore, Version
from ..redaction import redact_policy_text
from ..server import PushServer
from ..store import StoreError
from .guard import ApiGuard
from .replies import JSON, bad, json_body, store_failed

log = logging.getLogger("meshlet.cp.api")


class PolicyApi:
    def __init__(self, push: PushServer, guard: ApiGuard) -> None:
        self.push = push
        self.guard = guard
        self.apply_lock = trio.Lock()  # one apply at a time: each diffs against what the last one left

    @property
    def store(self) -> PolicyStore:
        assert self.push.policies is not None  # the app always gives the push server a policy store
        return self.push.policies

    async def policies(self, request: Request) -> Response:
        """GET and PUT /v1/policies (one route, so a wrong method's 405 names both)."""
        return await (self.put(request) if request.method == "PUT" else self.get(request))

    async def get(self, request: Request) -> Response:
        store, current = self.store, self.store.current
        return JSONResponse(
            {
                "version": store.version,
                # What a sidecar's ACK of the policies type names once it holds this version
                # (meshlet apply waits for it).
                "push_version": policies_push_version(self.push),
                "applied": None if current is None else applied_json(current, whole=self.guard.sees_secrets(request)),
                "documents": [
                    {"kind": name.split("/", 1)[0], "name": name.split("/", 1)[1], "version": version}
                    for name, (version, _) in sorted(self.push.wanted(POLICIES).items())
                ],
            }
        )

    async def put(self, request: Request) -> Response:
        store = self.store
        if (denied := self.guard.write_refused(request)) is not None:
            return denied
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        files = body.get("files")
        if not isinstance(files, list) or not all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f) for f in files
        ):
            return bad('"files" must be a list of [name, text] pairs')
        return await self._apply(
            lambda: store.apply(
                [(name, text) for name, text in files],
                source=str(body.get("source", "PUT /v1/policies")),
                now=time.time(),
                dry_run=bool(body.get("dry_run", False)),
            )
        )

    async def history(self, request: Request) -> Response:
        try:
            versions = await self.store.history()
        except StoreError as exc:
            return store_failed(exc)
        return JSONResponse({"history": [v.to_json() for v in versions]})

    async def rollback(self, request: Request) -> Response:
        store = self.store
        if (denied := self.guard.write_refused(request)) is not None:
            return denied
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        version = body.get("version")
        if not isinstance(version, str) or not version:
            return bad('"version" must be a version string (meshlet get policies --history)')
        return await self._apply(lambda: store.rollback(version, now=time.time()))

    async def _apply(self, run: Callable[[], Awaitable[ApplyResult]]) -> Response:
        """Run an apply or a rollback; push what changed to the sidecars."""
        async with self.apply_lock:
            before = dict(self.push.wanted(POLICIES))
            try:
                result = await run()
            except PolicyError as exc:
                return JSONResponse({"problems": exc.problems}, status_code=422)
            except StoreError as exc:
                return store_failed(exc)
            if result.applied:
                self.push.policies_changed(before)
                log.info("policy version %s applied (%d changes)", result.version, len(result.changes))
            return JSONResponse(result.to_json())


def applied_json(version: Version, *, whole: bool) -> JSON:
    """The running version with its files' texts: as applied, or (``whole`` False: a reader
    without the write token) redacted."""
    out = version.to_json(with_files=True)
    if not whole:
        out["texts"] = {name: redact_policy_text(text) for name, text in out["texts"].items()}
        out["redacted"] = True
    return out


def policies_push_version(push: PushServer) -> str:
    """The policy as the sidecars name it in their ACKs: the version of the policies type."""
    return wire.type_version({name: version for name, (version, _) in push.wanted(POLICIES).items()})
