"""/v1/explain: what the mesh would do with a request (control_plane/explain.py), from the
applied policy and the registry's ready endpoints."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..explain import explain
from ..server import PushServer
from .replies import bad


class ExplainView:
    def __init__(self, push: PushServer) -> None:
        self.push = push

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
        return JSONResponse(
            explain(
                url,
                documents,
                endpoints,
                method=query.get("method", "GET").upper(),
                headers=headers,
                source=query.get("from"),
            )
        )
