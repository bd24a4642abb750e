"""/v1/status: every sidecar the control plane talks to (or still holds a lease for), the
registry's and the push hub's counts, this control plane's version and the policy's mTLS modes
(what `meshlet check` judges each sidecar by); with replicas on etcd, ``cluster``: the replicas,
the leader and etcd's members (each replica lists its own sessions: the CLI asks every replica). /live and /ready: the process answers."""

from __future__ import annotations

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from meshlet import __version__
from meshlet.schema import Document

from ..ownership import admin_refusal
from ..push import Session
from ..replicas.engine import Replica
from ..server import PushServer
from .replies import JSON

MEMBERS_TIMEOUT = 2.0  # etcd members that have not answered by then are shown as not answering


class StatusView:
    def __init__(self, push: PushServer, replica: Replica | None = None) -> None:
        self.push = push
        self.replica = replica

    async def status(self, request: Request) -> Response:
        push = self.push
        stats = push.registry.stats()
        return JSONResponse(
            {
                "version": __version__,
                "mtls": mtls_modes(push.policies.documents if push.policies is not None else []),
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
                **({} if self.replica is None else {"cluster": await cluster_json(self.replica)}),
            }
        )


async def cluster_json(replica: Replica) -> JSON:
    """The replicas, the leader, and each etcd member as it answers."""
    members: list[JSON] = []
    with trio.move_on_after(MEMBERS_TIMEOUT):
        members = await replica.members()
    return {**replica.status(), "members": members}


def mtls_modes(documents: list[Document]) -> JSON:
    """The mesh's mTLS mode (MeshConfig ``mtls.mode``, permissive when none is applied) and the
    services whose Service document overrides it, as the sidecars apply them."""
    mode, services = "permissive", {}
    for document in documents:
        if document.kind == "MeshConfig":
            mode = document.mtls.mode
        elif document.kind == "Service" and document.mtls is not None:
            services[document.name] = document.mtls.mode
    return {"mode": mode, "services": dict(sorted(services.items()))}


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
