"""What a sidecar learned from the control plane's pushes, and the snapshot it makes. Pure.

Two resource types arrive (docs/protocol.md): ``endpoints``, one resource per service (the
instances registered for it, whole or as a delta against the version held), and
``policies`` (sidecar/core/policies.py). A push is applied resource by resource: what is
valid is kept, what is not is refused with why (the session NACKs it) and the version held
before stays. The services a sidecar watches, those the control plane said do not exist and
those whose last version was refused answer its on-demand lookups.

The snapshot served is made of the static services, then the ``Service`` documents, then
the registered instances (each wins over the one before for the same name), with the
compiled policies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshlet import wire
from meshlet.addresses import parse_address
from meshlet.endpoints import check_protocol, check_weight
from meshlet.names import is_service_name

from . import errors
from .config import MeshSnapshot, make_snapshot
from .errors import MeshError
from .policies import PolicyCache
from .services import Endpoint, ServiceConfig

EndpointList = list[dict[str, Any]]  # an endpoints resource body, as it travels (wire.endpoint)


class DiscoveredState:
    """Endpoints received from the control plane: name → (version, body); the services
    this sidecar watches (subscribed to on first use) and those the control plane said
    do not exist."""

    def __init__(self) -> None:
        self.endpoints: dict[str, tuple[str, EndpointList]] = {}
        self.watched: set[str] = set()
        self.missing: set[str] = set()
        self.rejected: dict[str, str] = {}  # name → why its last pushed version was refused

    def apply(self, push: wire.Push) -> dict[str, str]:
        """Apply what is valid; return the names refused, each with why (empty: all applied)."""
        refused: dict[str, str] = {}
        staged = dict(self.endpoints)
        for resource in push.resources:
            if resource.missing:  # a watched service that does not exist (now)
                staged.pop(resource.name, None)
                self.missing.add(resource.name)
                continue
            self.missing.discard(resource.name)
            try:
                staged[resource.name] = (resource.version, _body(staged, resource))
                self.rejected.pop(resource.name, None)
            except (wire.WireError, ValueError) as exc:
                refused[resource.name] = self.rejected[resource.name] = str(exc)
                if resource.name not in self.endpoints:
                    staged.pop(resource.name, None)
        for name in push.removed:
            staged.pop(name, None)
            if name in self.watched:
                self.missing.add(name)
        self.endpoints = staged
        return refused

    def versions(self) -> dict[str, str]:
        return {name: version for name, (version, _) in self.endpoints.items()}

    def services(self) -> dict[str, ServiceConfig]:
        out = {}
        for name, (_, body) in self.endpoints.items():
            endpoints = tuple(
                Endpoint(
                    *parse_address(e["address"]),
                    labels=dict(e.get("labels", {})),
                    weight=check_weight(e.get("weight")),
                    app_port=e.get("app_port", 0),
                    mtls=e.get("mtls") is True,
                    protocol=e.get("protocol", ""),
                )
                for e in body
            )
            out[name] = ServiceConfig(name, endpoints)
        return out

    # on-demand lookups ----------------------------------------------------------------
    def has_answered(self, service: str) -> bool:
        """Whether a lookup of ``service`` has its answer: its endpoints, that it does not
        exist, or that its configuration was refused."""
        return service in self.endpoints or service in self.missing or service in self.rejected

    def refusal(self, service: str) -> MeshError | None:
        """Why a lookup of ``service`` fails from what is known (404 no-route): not a
        service name, the control plane said it does not exist, or its configuration was
        refused. None: it may still be found."""
        if not is_service_name(service) or service in self.missing:
            return MeshError(errors.NO_ROUTE, f"no service named {service!r} in the mesh")
        if service in self.rejected:
            return MeshError(
                errors.NO_ROUTE, f"service {service!r}: its configuration was rejected: {self.rejected[service]}"
            )
        return None

    def can_watch(self, service: str) -> bool:
        """Whether ``service`` is watched already or may be (a sidecar watches at most
        ``wire.MAX_WATCHED`` services: the control plane refuses more)."""
        return service in self.watched or len(self.watched) < wire.MAX_WATCHED

    # persisted form ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "endpoints": {name: {"ver": v, "body": b} for name, (v, b) in self.endpoints.items()},
            "watched": sorted(self.watched),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DiscoveredState:
        state = cls()
        for name, item in dict(raw.get("endpoints", {})).items():
            state.endpoints[str(name)] = (str(item["ver"]), list(item["body"]))
        # A restarted sidecar watches again what its app called before.
        state.watched = {str(name) for name in raw.get("watched", [])} | set(state.endpoints)
        return state


def _body(staged: Mapping[str, tuple[str, EndpointList]], resource: wire.Resource) -> EndpointList:
    """The endpoint list ``resource`` makes (a delta applies to the version held); an
    error when it does not apply or an endpoint is malformed."""
    if resource.is_delta:
        have = staged.get(resource.name)
        if have is None or have[0] != resource.base:
            raise wire.WireError(
                "delta-base", f"have {have[0] if have else 'nothing'}, delta is against {resource.base}"
            )
        body = wire.apply_endpoint_delta(have[1], resource)
    else:
        if not isinstance(resource.body, list):
            raise ValueError("an endpoints body must be a list")
        body = resource.body
    for item in body:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError("each endpoint needs an id")
        parse_address(str(item.get("address")))
        try:
            check_weight(item.get("weight"))  # the rule of a Service's endpoints and the static file's
        except ValueError as exc:
            raise ValueError(f"endpoint {item['id']}: {exc}") from None
        app_port = item.get("app_port", 0)
        if not isinstance(app_port, int) or isinstance(app_port, bool) or not 0 <= app_port <= 65535:
            raise ValueError(f"endpoint {item['id']}: app_port must be 0..65535")
        if not isinstance(item.get("mtls", False), bool):
            raise ValueError(f"endpoint {item['id']}: mtls must be a boolean")
        if "protocol" in item:  # as its sidecar registered it; a value this build does not know is refused
            try:
                check_protocol(item["protocol"])
            except ValueError as exc:
                raise ValueError(f"endpoint {item['id']}: protocol {exc}") from None
    return body


class PushedConfig:
    """Everything the control plane pushed: the endpoints and the policies, and the id of the
    store the policies came from ("": none yet, or persisted by a build before store ids;
    sidecar/core/store_conflict.py)."""

    def __init__(
        self, discovered: DiscoveredState | None = None, policies: PolicyCache | None = None, store: str = ""
    ) -> None:
        self.discovered = discovered or DiscoveredState()
        self.policies = policies or PolicyCache()
        self.store = store

    def apply(self, push: wire.Push) -> dict[str, str] | None:
        """Apply what is valid of ``push``; return the names refused, each with why (empty:
        all applied). None: a type this build does not know, so nothing to apply."""
        if push.type == wire.ENDPOINTS:
            return self.discovered.apply(push)
        if push.type == wire.POLICIES:
            return self.policies.apply(push)
        return None

    def versions(self) -> dict[str, dict[str, str]]:
        """Type → name → the version held: what a hello says this sidecar has."""
        return {wire.ENDPOINTS: self.discovered.versions(), wire.POLICIES: self.policies.versions()}

    def snapshot(self, static: Mapping[str, ServiceConfig], source: str) -> MeshSnapshot:
        """The snapshot to serve, with the ``static`` services under what was pushed."""
        policies = self.policies
        mtls_mode, mtls_modes = policies.mtls_modes()
        services = dict(static)
        services.update(policies.services())  # Service documents: services without a sidecar
        services.update(self.discovered.services())  # registered instances win over a document of the same name
        # Declared protocols win over what instances report: the static file's, then Service documents'.
        protocols = {name: service.protocol for name, service in static.items() if service.protocol}
        protocols.update(policies.protocols())
        return make_snapshot(
            services,
            source,
            policy_version=policies.version(),
            routes=policies.routes(),
            shadow_routes=policies.routes("shadow"),
            access=policies.access(),
            shadow_access=policies.access("shadow"),
            destinations=policies.destinations(),
            shadow_destinations=policies.destinations("shadow"),
            tracing=policies.tracing(),
            metrics=policies.metrics(),
            outbound_traffic_policy=policies.outbound_traffic_policy(),
            mtls_mode=mtls_mode,
            mtls_modes=mtls_modes,
            protocols=protocols,
        )

    def to_json(self) -> dict[str, Any]:
        return {**self.discovered.to_json(), "policies": self.policies.to_json(), "store": self.store}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PushedConfig:
        store = raw.get("store", "")
        if store != "" and not (isinstance(store, str) and wire.STORE_ID.fullmatch(store)):
            raise ValueError(f"store {store!r} is not a store id")
        return cls(DiscoveredState.from_json(raw), PolicyCache.from_json(raw.get("policies", {})), store)


__all__ = ["DiscoveredState", "EndpointList", "PushedConfig"]
