"""Policies a sidecar received from the control plane, checked again here. Pure.

The control plane validated them, but a sidecar must never run what it cannot read: each
resource is validated with the same schema (meshlet/schema.py, loaded by meshlet/policy.py); a bad one is
rejected (NACKed, docs/protocol.md) and the sidecar keeps the version it had. What it holds
becomes part of its snapshot: ``Service`` documents as services with static endpoints,
enforcing ``Route`` documents as route tables by host, ``AccessPolicy`` documents as access
tables by service.

The schema (pydantic) is imported when the first policy arrives, not before: its import
takes a noticeable share of the sidecar's start time and memory, which a sidecar that
receives no policy should not pay.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from meshlet import wire
from meshlet.access import AccessTable
from meshlet.addresses import parse_address
from meshlet.routes import RouteTable

from .cardinality import MetricsSettings
from .destination import Settings, settings
from .services import Endpoint, ServiceConfig
from .spans import TracingSettings

if TYPE_CHECKING:
    from meshlet.schema import Document

log = logging.getLogger("meshlet.policies")


class PolicyCache:
    """ "Kind/name" → (version, body, document)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, Any, Document]] = {}

    def apply(self, push: wire.Push) -> dict[str, str]:
        """Apply what is valid; return the names refused, each with why (empty: all applied)."""
        refused: dict[str, str] = {}
        for resource in push.resources:
            if resource.missing:
                self.held.pop(resource.name, None)
                continue
            document, why = _read(resource.name, resource.body)
            if document is None:
                refused[resource.name] = why
                continue
            self.held[resource.name] = (resource.version, resource.body, document)
        for name in push.removed:
            self.held.pop(name, None)
        return refused

    def versions(self) -> dict[str, str]:
        return {name: version for name, (version, _, _) in self.held.items()}

    def version(self) -> str:
        return wire.type_version(self.versions())

    def services(self) -> dict[str, ServiceConfig]:
        """Services without a sidecar, from ``Service`` documents."""
        out: dict[str, ServiceConfig] = {}
        for _, _, document in self.held.values():
            if document.kind == "Service":
                if not document.endpoints and document.connect_timeout is None and document.timeout is None:
                    continue  # only an mTLS mode: the service's endpoints still come from its sidecars
                endpoints = tuple(
                    Endpoint(*parse_address(e.address), labels=dict(e.labels), weight=e.weight)
                    for e in document.endpoints
                )
                config = ServiceConfig(document.name, endpoints)
                if document.connect_timeout is not None:
                    config = ServiceConfig(config.name, endpoints, document.connect_timeout, config.timeout)
                if document.timeout is not None:
                    config = ServiceConfig(config.name, endpoints, config.connect_timeout, document.timeout)
                out[document.name] = config
        return out

    def routes(self, mode: str = "enforce") -> dict[str, RouteTable]:
        """Routes by host: the enforcing ones, or (``mode="shadow"``) those only counted."""
        out: dict[str, RouteTable] = {}
        for name, document in self._by_name():
            if document.kind == "Route" and document.mode == mode and _uncovered(out, name, "host", document.host):
                out[document.host] = RouteTable(document)
        return out

    def access(self, mode: str = "enforce") -> dict[str, AccessTable]:
        """Access tables by service: the enforcing ones, or (``mode="shadow"``) those only counted."""
        out: dict[str, AccessTable] = {}
        for name, document in self._by_name():
            if (
                document.kind == "AccessPolicy"
                and document.mode == mode
                and _uncovered(out, name, "service", document.service)
            ):
                out[document.service] = AccessTable(document)
        return out

    def _by_name(self) -> Iterator[tuple[str, Document]]:
        """The documents held, sorted by name: where two compete, the first wins."""
        for name in sorted(self.held):
            yield name, self.held[name][2]

    def destinations(self, mode: str = "enforce") -> dict[tuple[str, str | None], Settings]:
        """DestinationPolicy settings by (service, ROUTE/RULE or None)."""
        out: dict[tuple[str, str | None], Settings] = {}
        for _, document in self._by_name():
            if document.kind == "DestinationPolicy" and document.mode == mode:
                out.setdefault((document.service, document.rule), settings(document))
        return out

    def tracing(self) -> TracingSettings | None:
        """MeshConfig's tracing settings; None without a MeshConfig (the sidecar's flags and
        the defaults apply)."""
        for _, _, document in self.held.values():
            if document.kind == "MeshConfig":
                tracing = document.tracing
                return TracingSettings(tracing.sampling, tuple(tracing.formats), tracing.collector)
        return None

    def metrics(self) -> MetricsSettings | None:
        """MeshConfig's metrics bounds; None without a MeshConfig (the defaults apply)."""
        for _, _, document in self.held.values():
            if document.kind == "MeshConfig":
                metrics = document.metrics
                return MetricsSettings(
                    ("direction", *metrics.labels), metrics.max_label_values, metrics.max_series, metrics.idle_expiry
                )
        return None

    def mtls_modes(self) -> tuple[str | None, dict[str, str]]:
        """MeshConfig's mTLS mode (None without a MeshConfig: the default), and the services
        whose Service document sets their own."""
        mesh = None
        services: dict[str, str] = {}
        for _, _, document in self.held.values():
            if document.kind == "MeshConfig":
                mesh = str(document.mtls.mode)
            elif document.kind == "Service" and document.mtls is not None:
                services[document.name] = str(document.mtls.mode)
        return mesh, services

    def protocols(self) -> dict[str, str]:
        """The services whose Service document declares their protocol."""
        return {
            document.name: str(document.protocol)
            for _, _, document in self.held.values()
            if document.kind == "Service" and document.protocol is not None
        }

    def outbound_traffic_policy(self) -> str | None:
        """MeshConfig's ALLOW_ANY / REGISTRY_ONLY; None without a MeshConfig (ALLOW_ANY)."""
        for _, _, document in self.held.values():
            if document.kind == "MeshConfig":
                return str(document.outbound_traffic_policy)
        return None

    def to_json(self) -> dict[str, Any]:
        return {name: {"ver": version, "body": body} for name, (version, body, _) in self.held.items()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PolicyCache:
        cache = cls()
        for name, item in dict(raw).items():
            document, why = _read(str(name), item.get("body"))
            if document is None:
                log.warning("persisted policy %s ignored: %s", name, why)
                continue
            cache.held[str(name)] = (str(item["ver"]), item["body"], document)
        return cache


def _uncovered(out: Mapping[str, RouteTable | AccessTable], name: str, key: str, value: str) -> bool:
    """Whether no document covers ``value`` yet. One per key: the control plane refuses
    two, and here the first by name wins, deterministically."""
    if value in out:
        log.warning("%s ignored: %s already covers %s %s", name, out[value].name, key, value)
        return False
    return True


def _read(name: str, body: Any) -> tuple[Document | None, str]:
    from meshlet.policy import validate  # the first policy pays for the schema (see above)

    document, problems = validate(body, lambda path: name)
    if document is None:
        return None, "; ".join(p.split(": ", 1)[1] for p in problems)
    if f"{document.kind}/{document.name}" != name:
        return None, f"the document is {document.kind}/{document.name}, not {name}"
    return document, ""


__all__ = ["PolicyCache"]
