"""/v1/explain: what the mesh would do with a request (control_plane/explain.py), from the
applied policy and the registry's ready endpoints. The policy's secrets in the answer (the
header values a rule adds, what it matches a credential with) are redacted for a reader
without the write token: the question is answered with the policy whole."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..explain import explain
from ..redaction import redact_direct_response, redact_header_actions, redact_match
from ..server import PushServer
from .guard import ApiGuard
from .replies import JSON, bad


class ExplainView:
    def __init__(self, push: PushServer, guard: ApiGuard) -> None:
        self.push = push
        self.guard = guard

    async def explain(self, request: Request) -> Response:
        query = request.query_params
        url = query.get("url")
        if not url:
            return bad("give url, e.g. /v1/explain?url=http://item/items/1 (and method, header=k:v, from)")
        headers = []
        for item in query.getlist("header"):
            name, sep, value = item.partition(":")
            if not sep or not name.strip():
                return bad(f"header {item!r}: expected NAME:VALUE")
            headers.append((name.strip(), value.strip()))
        registry = self.push.registry
        endpoints = {
            name: [
                {"id": i.instance_id, "address": i.address, "labels": dict(i.labels)} for i in registry.endpoints(name)
            ]
            for name in registry.services()
        }
        documents = self.push.policies.documents if self.push.policies is not None else []
        answer = explain(
            url,
            documents,
            endpoints,
            method=query.get("method", "GET").upper(),
            headers=headers,
            source=query.get("from"),
        )
        return JSONResponse(answer if self.guard.sees_secrets(request) else redacted(answer))


def redacted(answer: JSON) -> JSON:
    """An explanation without the policy's secrets (control_plane/explain.py's shape)."""
    out = dict(answer)
    if isinstance(out.get("rule"), dict):
        out["rule"] = {**out["rule"], "match": redact_match(out["rule"].get("match"))}
    decision = out.get("decision")
    if isinstance(decision, dict):
        decision = dict(decision)
        if "headers" in decision:
            decision["headers"] = redact_header_actions(decision["headers"])
        if "direct_response" in decision:
            decision["direct_response"] = redact_direct_response(decision["direct_response"])
        out["decision"] = decision
    return out
