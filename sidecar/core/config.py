"""The sidecar's configuration snapshot, and the static file that can provide one.

A :class:`MeshSnapshot` is immutable. It comes from a source (the static file now, the
control plane's push channel later); the request path is built once per snapshot and
reads it without locks. Everything here is pure: text in, snapshot or errors out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from meshlet.addresses import check_address, parse_address
from meshlet.durations import parse_duration
from meshlet.endpoints import (
    ENDPOINT_KEYS,
    SERVICE_KEYS,
    check_endpoint_list,
    check_labels,
    check_protocol,
    check_weight,
    endpoint_mapping,
)
from meshlet.names import check_service_name

from .services import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Endpoint, ServiceConfig

if TYPE_CHECKING:  # types only: the snapshot holds them, built elsewhere (policies.py); no import at start
    from meshlet.access import AccessTable
    from meshlet.routes import RouteTable
    from meshlet.yamlfile import LineMap

    from .cardinality import MetricsSettings
    from .destination import Settings
    from .spans import TracingSettings


class ConfigError(Exception):
    """Every problem found in a config source, each as ``file:line: field: what``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    services: Mapping[str, ServiceConfig]
    source: str
    version: str
    routes: Mapping[str, RouteTable] = field(default_factory=lambda: MappingProxyType({}))  # by host
    policy_version: str = ""  # of the policies behind ``routes`` (and Service documents)
    shadow_routes: Mapping[str, RouteTable] = field(default_factory=lambda: MappingProxyType({}))  # counted only
    access: Mapping[str, AccessTable] = field(default_factory=lambda: MappingProxyType({}))  # by service
    shadow_access: Mapping[str, AccessTable] = field(default_factory=lambda: MappingProxyType({}))  # counted only
    # (service, ROUTE/RULE or None) → destination Settings
    destinations: Mapping[tuple[str, str | None], Settings] = field(default_factory=lambda: MappingProxyType({}))
    shadow_destinations: Mapping[tuple[str, str | None], Settings] = field(default_factory=lambda: MappingProxyType({}))
    tracing: TracingSettings | None = None  # None: the defaults
    metrics: MetricsSettings | None = None  # None: the defaults
    outbound_traffic_policy: str = "ALLOW_ANY"  # transparent mode, unknown destinations (MeshConfig)
    mtls_mode: str = "permissive"  # MeshConfig mtls.mode
    mtls_modes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # Services' own
    # Service → the protocol a Service document or the static file declares (with_protocols)
    protocols: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "policy_version": self.policy_version,
            "outbound_traffic_policy": self.outbound_traffic_policy,
            "mtls": {"mode": self.mtls_mode, "services": dict(sorted(self.mtls_modes.items()))},
            "routes": {host: table.name for host, table in sorted(self.routes.items())},
            "shadow_routes": {host: table.name for host, table in sorted(self.shadow_routes.items())},
            "access": {service: table.name for service, table in sorted(self.access.items())},
            "shadow_access": {service: table.name for service, table in sorted(self.shadow_access.items())},
            "destination_policies": {
                (service if rule is None else f"{service} {rule}"): settings.name
                for (service, rule), settings in sorted(
                    self.destinations.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
                )
            },
            "shadow_destination_policies": {
                (service if rule is None else f"{service} {rule}"): settings.name
                for (service, rule), settings in sorted(
                    self.shadow_destinations.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
                )
            },
            "services": {
                name: {
                    "endpoints": [
                        {
                            "address": e.address,
                            "labels": dict(e.labels),
                            "weight": e.weight,
                            **({"app_port": e.app_port} if e.app_port else {}),
                            **({"mtls": True} if e.mtls else {}),
                            **({"protocol": e.protocol} if e.protocol else {}),
                        }
                        for e in svc.endpoints
                    ],
                    "connect_timeout": svc.connect_timeout,
                    "timeout": svc.timeout,
                    **({"protocol": svc.protocol} if svc.protocol else {}),
                }
                for name, svc in sorted(self.services.items())
            },
        }


def empty_snapshot(source: str = "none") -> MeshSnapshot:
    return make_snapshot({}, source)


def make_snapshot(
    services: Mapping[str, ServiceConfig],
    source: str,
    *,
    policy_version: str = "",
    routes: Mapping[str, RouteTable] | None = None,
    shadow_routes: Mapping[str, RouteTable] | None = None,
    access: Mapping[str, AccessTable] | None = None,
    shadow_access: Mapping[str, AccessTable] | None = None,
    destinations: Mapping[tuple[str, str | None], Settings] | None = None,
    shadow_destinations: Mapping[tuple[str, str | None], Settings] | None = None,
    tracing: TracingSettings | None = None,
    metrics: MetricsSettings | None = None,
    outbound_traffic_policy: str | None = None,
    mtls_mode: str | None = None,
    mtls_modes: Mapping[str, str] | None = None,
    protocols: Mapping[str, str] | None = None,
) -> MeshSnapshot:
    """A snapshot of ``services`` from ``source`` and the compiled policies given (none:
    no routes, no access tables, the default destination, tracing and metrics settings).
    Its version covers its services and the version of the policies behind its routes and
    access tables, not its source. ``protocols`` (declared) win over what endpoints report."""
    protocols = dict(protocols or {})
    snap = MeshSnapshot(
        MappingProxyType({name: with_protocol(svc, protocols.get(name, "")) for name, svc in services.items()}),
        source,
        "",
        routes=MappingProxyType(dict(routes or {})),
        policy_version=policy_version,
        shadow_routes=MappingProxyType(dict(shadow_routes or {})),
        access=MappingProxyType(dict(access or {})),
        shadow_access=MappingProxyType(dict(shadow_access or {})),
        destinations=MappingProxyType(dict(destinations or {})),
        shadow_destinations=MappingProxyType(dict(shadow_destinations or {})),
        tracing=tracing,
        metrics=metrics,
        outbound_traffic_policy=outbound_traffic_policy or "ALLOW_ANY",
        mtls_mode=mtls_mode or "permissive",
        mtls_modes=MappingProxyType(dict(mtls_modes or {})),
        protocols=MappingProxyType(protocols),
    )
    body = json.dumps([snap.to_json()["services"], policy_version], sort_keys=True).encode()
    version = hashlib.sha256(body).hexdigest()[:12]
    return dataclasses.replace(snap, version=version)


def with_protocol(service: ServiceConfig, declared: str) -> ServiceConfig:
    """``service`` with its protocol: ``declared`` (a Service document's, the static file's)
    on the service and on every endpoint, else the one all its endpoints report (registered
    by their sidecars' --app-protocol), else "" (undeclared, or endpoints that disagree)."""
    if declared:
        endpoints = tuple(
            e if e.protocol == declared else dataclasses.replace(e, protocol=declared) for e in service.endpoints
        )
        return dataclasses.replace(service, endpoints=endpoints, protocol=declared)
    reported = {e.protocol for e in service.endpoints}
    protocol = reported.pop() if len(reported) == 1 else ""
    return service if protocol == service.protocol else dataclasses.replace(service, protocol=protocol)


_TOP_KEYS = ("defaults", "services", "version")
_TIMEOUT_KEYS = ("connect_timeout", "timeout")


class _Problems:
    """The problems found so far, each as ``file:line: path: what``."""

    def __init__(self, filename: str, lines: LineMap) -> None:
        self.filename = filename
        self.lines = lines
        self.found: list[tuple[int, str]] = []  # (line, problem)

    def __call__(self, path: str, what: str) -> None:
        line = self.lines.at(path)
        self.found.append((line, f"{self.filename}:{line}: {path or '(top)'}: {what}"))

    def in_line_order(self) -> list[str]:
        return [problem for _, problem in sorted(self.found, key=lambda found: found[0])]

    def unknown_keys(self, raw: Mapping[Any, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in raw:
            if key not in allowed:
                self(f"{path}.{key}" if path else str(key), f"unknown key (allowed: {', '.join(allowed)})")


def load_static(text: str, filename: str) -> MeshSnapshot:
    """Parse a static config file; raise ConfigError listing every problem at once.

    A service here is what a ``Service`` policy says, checked by the same rules
    (meshlet/endpoints.py); the file adds ``defaults`` and a short form, ``item: [a:1]``
    for ``item: {endpoints: [a:1]}``."""
    # Imported here: PyYAML is read by a sidecar with a --static file only (~1 MiB of memory).
    from meshlet.yamlfile import YamlError, load_one

    try:
        doc, lines = load_one(text, filename)
    except YamlError as exc:
        raise ConfigError([exc.problem]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{filename}:1: (top): must be a mapping with a 'services' key"])
    problem = _Problems(filename, lines)
    problem.unknown_keys(doc, "", _TOP_KEYS)
    defaults = _defaults(doc.get("defaults"), problem)
    raw_services = doc.get("services") or {}
    if not isinstance(raw_services, dict):
        problem("services", "must be a mapping of service name to its endpoints")
        raw_services = {}
    services: dict[str, ServiceConfig] = {}
    modes: dict[str, str] = {}
    protocols: dict[str, str] = {}
    for name, raw in raw_services.items():
        path = f"services.{name}"
        try:
            check_service_name(name)
        except ValueError as exc:
            problem(path, str(exc))
            continue
        if isinstance(raw, list):
            raw = {"endpoints": raw}
            lines.alias(f"{path}.endpoints", path)
        service = _service(name, raw, path, defaults, problem)
        mode = _mtls_mode(raw, path, problem) if isinstance(raw, dict) else None
        protocol = _protocol(raw, path, problem) if isinstance(raw, dict) else ""
        if service is not None:
            if protocol:
                protocols[name] = protocol
            if mode is not None:
                modes[name] = mode
                if mode != "off":  # a service given a mode is one of sidecars: dialled with mTLS
                    endpoints = tuple(dataclasses.replace(e, mtls=True) for e in service.endpoints)
                    service = dataclasses.replace(service, endpoints=endpoints)
            services[name] = service
    if problem.found:
        raise ConfigError(problem.in_line_order())
    return make_snapshot(services, f"static:{filename}", mtls_modes=modes, protocols=protocols)


def _protocol(raw: Mapping[Any, Any], path: str, problem: _Problems) -> str:
    """A service's ``protocol: http1|http2|grpc|tcp``; "" when not given (or wrong: reported)."""
    try:
        return check_protocol(raw.get("protocol"))
    except ValueError as exc:
        problem(f"{path}.protocol", str(exc))
        return ""


MTLS_MODES = ("off", "permissive", "strict")


def _mtls_mode(raw: Mapping[Any, Any], path: str, problem: _Problems) -> str | None:
    """A service's ``mtls: {mode: off|permissive|strict}``; None when not given (or wrong: reported)."""
    value = raw.get("mtls")
    if value is None:
        return None
    if not isinstance(value, dict):
        problem(f"{path}.mtls", "must be a mapping with a 'mode' key")
        return None
    problem.unknown_keys(value, f"{path}.mtls", ("mode",))
    mode = value.get("mode", "permissive")
    if mode is False:
        mode = "off"  # unquoted, YAML 1.1 reads it as false
    if mode not in MTLS_MODES:
        problem(f"{path}.mtls.mode", f"{mode!r} is not one of {', '.join(MTLS_MODES)}")
        return None
    return str(mode)


def _timeouts(raw: Mapping[Any, Any], path: str, into: dict[str, float], problem: _Problems) -> None:
    for key in _TIMEOUT_KEYS:
        if raw.get(key) is not None:  # written with nothing after it: not given
            try:
                into[key] = parse_duration(raw[key])
            except ValueError as exc:
                problem(f"{path}.{key}", str(exc))


def _defaults(raw: object, problem: _Problems) -> dict[str, float]:
    defaults = {"connect_timeout": DEFAULT_CONNECT_TIMEOUT, "timeout": DEFAULT_REQUEST_TIMEOUT}
    if raw is None:
        return defaults
    if not isinstance(raw, dict):
        problem("defaults", f"must be a mapping (allowed: {', '.join(_TIMEOUT_KEYS)})")
        return defaults
    problem.unknown_keys(raw, "defaults", _TIMEOUT_KEYS)
    _timeouts(raw, "defaults", defaults, problem)
    return defaults


def _service(name: str, raw: object, path: str, defaults: dict[str, float], problem: _Problems) -> ServiceConfig | None:
    """One service's mapping (a ``Service`` without kind and name) → its config; None
    when it has a problem (reported)."""
    if not isinstance(raw, dict):  # None too: "item:" alone is more likely a slip than a service with nothing
        problem(path, f"must be a mapping (allowed: {', '.join(SERVICE_KEYS)})")
        return None
    before = len(problem.found)
    problem.unknown_keys(raw, path, SERVICE_KEYS)
    timeouts = dict(defaults)
    _timeouts(raw, path, timeouts, problem)
    try:
        items = check_endpoint_list(raw.get("endpoints"))
    except ValueError as exc:
        problem(f"{path}.endpoints", str(exc))
        items = []
    endpoints = [_endpoint(item, f"{path}.endpoints[{i}]", problem) for i, item in enumerate(items)]
    if len(problem.found) > before:
        return None
    return ServiceConfig(
        name, tuple(e for e in endpoints if e is not None), timeouts["connect_timeout"], timeouts["timeout"]
    )


def _endpoint(item: object, path: str, problem: _Problems) -> Endpoint | None:
    """One endpoint, every field checked (each problem reported); None when one is wrong."""
    try:
        raw = endpoint_mapping(item)
    except ValueError as exc:
        problem(path, str(exc))
        return None
    problem.unknown_keys(raw, path, ENDPOINT_KEYS)
    fields: dict[str, Any] = {}
    for key, check in _ENDPOINT_FIELDS:
        try:
            fields[key] = check(raw.get(key))
        except ValueError as exc:
            problem(f"{path}.{key}", str(exc))
    if len(fields) < len(_ENDPOINT_FIELDS):
        return None
    host, port = fields["address"]
    return Endpoint(host, port, MappingProxyType(fields["labels"]), fields["weight"])


def _host_port(value: object) -> tuple[str, int]:
    return parse_address(check_address(value))


_ENDPOINT_FIELDS: tuple[tuple[str, Callable[[object], Any]], ...] = (
    ("address", _host_port),
    ("labels", check_labels),
    ("weight", check_weight),
)
