"""/v1/status: every sidecar the control plane talks to (or still holds a lease for), and the
registry's and the push hub's counts. /live and /ready: the process answers."""

from __future__ import annotations

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..ownership import admin_refusal
from ..push import Session
from ..server import PushServer
from .replies import JSON


class StatusView:
    def __init__(self, push: PushServer) -> None:
        self.push = push

    async def status(self, request: Request) -> Response:
        push = self.push
        stats = push.registry.stats()
        return JSONResponse(
            {
                "sidecars": sessions_json(push, trio.current_time()),
                "registry": {
                    "instances": stats.instances,
                    "ready": stats.ready,
                    "services": stats.services,
                    "connected": stats.connected,
                    "self_preservation": stats.self_preservation,
                    "self_preservation_reason": stats.self_preservation_reason,
                    "expired_total": stats.expired_total,
                    "restored_total": stats.restored_total,
                },
                "pushes_total": push.hub.pushes_total,
                "nacks_total": push.hub.nacks_total,
                "store": push.store_id,  # this control plane's store: sidecars holding another's keep its policies
                "store_conflicts": push.store_conflicts(),
            }
        )


async def live(request: Request) -> Response:
    return PlainTextResponse("live\n")


def sessions_json(push: PushServer, now: float) -> list[JSON]:
    """The sidecars, by node (also the dashboard's "sidecars")."""
    registry = push.registry
    return sorted(
        ({**s.to_json(now, registered=registry.get(s.instance_id) is not None), **_admin(s)} for s in _sessions(push)),
        key=lambda s: s["node"],
    )


def _admin(session: Session) -> JSON:
    """Its admin address, and why the control plane does not fetch it (None: it does)."""
    instance = session.instance
    if instance is None:
        return {}
    return {"admin": instance.admin, "admin_refused": admin_refusal(instance.admin, instance.owner)}


def _sessions(push: PushServer) -> list[Session]:
    """Connected sidecars, and those whose channel closed while their lease still holds
    (a sidecar that bye'd or expired is forgotten here)."""
    departed = push.hub.departed
    for node, session in list(departed.items()):
        if push.registry.get(session.instance_id) is None:
            del departed[node]
    return [*push.hub.sessions.values(), *departed.values()]
