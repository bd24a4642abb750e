"""The sidecar's configuration snapshot, and the static file that can provide one.

A :class:`MeshSnapshot` is immutable. It comes from a source (the static file now, the
control plane's push channel later); the request path is built once per snapshot and
reads it without locks. Everything here is pure: text in, snapshot or errors out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # types only: destination.py imports this module
    from meshlet.access import AccessTable
    from meshlet.routes import RouteTable

    from .cardinality import MetricsSettings
    from .destination import Settings
    from .spans import TracingSettings

DEFAULT_CONNECT_TIMEOUT = 1.0  # docs/policy.md
DEFAULT_REQUEST_TIMEOUT = 15.0  # docs/policy.md: covers the whole exchange

_SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # fullmatch: "$" passes a trailing "\n"
_HOST = re.compile(r"[\x21-\x7e]+")  # visible ASCII: no CR, LF, NUL or space in a host
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


def is_service_name(name: str) -> bool:
    """A service name is a DNS label (lower case): what the registry accepts too."""
    return _SERVICE_NAME.fullmatch(name) is not None


class ConfigError(Exception):
    """Every problem found in a config source, each as ``file:line: field: what``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    # An endpoint is its address: labels and weight do not change which one it is.
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    weight: int = field(default=1, compare=False)
    # The app's port on ``host``, where a sidecar fronts it (0: none, or not told): what an
    # app in transparent mode dials (sidecar/core/interception.py AddressMap).
    app_port: int = field(default=0, compare=False)
    # Endpoints key the pools, balancers and outlier state: hashed several times a
    # request, so the hash is computed once (the generated one hashes a new tuple each time).
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.host, self.port)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    timeout: float = DEFAULT_REQUEST_TIMEOUT


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

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "policy_version": self.policy_version,
            "outbound_traffic_policy": self.outbound_traffic_policy,
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
                        }
                        for e in svc.endpoints
                    ],
                    "connect_timeout": svc.connect_timeout,
                    "timeout": svc.timeout,
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
) -> MeshSnapshot:
    """A snapshot of ``services`` from ``source`` and the compiled policies given (none:
    no routes, no access tables, the default destination, tracing and metrics settings).
    Its version covers its services and the version of the policies behind its routes and
    access tables, not its source."""
    snap = MeshSnapshot(
        MappingProxyType(dict(services)),
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
    )
    body = json.dumps([snap.to_json()["services"], policy_version], sort_keys=True).encode()
    version = hashlib.sha256(body).hexdigest()[:12]
    return dataclasses.replace(snap, version=version)


def parse_address(text: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); ValueError says what is wrong.

    ``allow_zero``: for listeners, port 0 asks the kernel for a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not _HOST.fullmatch(host):
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    low = 0 if allow_zero else 1
    if not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError(f"{text!r} has no valid port ({low}-65535)")
    return host, int(port)


def parse_duration(value: Any) -> float:
    """``250ms``, ``2s``, ``1m`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration like 250ms, 2s or 1m")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("must be greater than 0")
        try:
            seconds = float(value)
        except OverflowError:  # an int past the largest float
            seconds = math.inf
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration (allowed: 250ms, 2s, 1m)")
        number = float(match.group(1))
        seconds = number * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
        if seconds <= 0:
            raise ValueError("must be greater than 0")
    if not math.isfinite(seconds):  # .nan, .inf, 1e400: no deadline can be made of them
        raise ValueError(f"{value!r} is not a duration (allowed: 250ms, 2s, 1m)")
    return seconds


class _Lines:
    """Maps a path in a YAML document (``services.item.endpoints[0]``) to its line."""

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        self._walked: set[int] = set()
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return
        if node is not None:
            self._walk(node, "")

    def _walk(self, node: yaml.Node, path: str) -> None:
        self.lines[path] = node.start_mark.line + 1
        if id(node) in self._walked:  # an alias: walked where its anchor is (it may contain itself)
            return
        self._walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                self.lines[sub] = key.start_mark.line + 1
                self._walk(value, sub)
                self.lines[sub] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, f"{path}[{i}]")

    def alias(self, path: str, same_as: str) -> None:
        """``path`` and what is under it are at the lines of ``same_as`` (a rewritten shape)."""
        for known, line in list(self.lines.items()):
            if known == same_as or known.startswith(same_as + "["):
                self.lines[path + known[len(same_as) :]] = line

    def at(self, path: str) -> int:
        while path and path not in self.lines:
            path = path.rpartition(".")[0]
        return self.lines.get(path, 1)


_TOP_KEYS = {"services", "defaults", "version"}
_SERVICE_KEYS = {"endpoints", "connect_timeout", "timeout"}
_ENDPOINT_KEYS = {"address", "labels", "weight"}


def load_static(text: str, filename: str) -> MeshSnapshot:
    """Parse a static config file; raise ConfigError listing every problem at once."""
    lines = _Lines(text)
    problems: list[str] = []

    def problem(path: str, what: str) -> None:
        problems.append(f"{filename}:{lines.at(path)}: {path or '(top)'}: {what}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    except ValueError as exc:  # a scalar YAML accepts but Python cannot build: 2001-02-30, a 5000-digit int
        raise ConfigError([f"{filename}:1: not valid YAML: {exc}"]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{filename}:1: (top): must be a mapping with a 'services' key"])
    for key in doc:
        if key not in _TOP_KEYS:
            problem(str(key), f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")

    defaults = {"connect_timeout": DEFAULT_CONNECT_TIMEOUT, "timeout": DEFAULT_REQUEST_TIMEOUT}
    raw_defaults = doc.get("defaults") or {}
    if not isinstance(raw_defaults, dict):
        problem("defaults", "must be a mapping (allowed: connect_timeout, timeout)")
        raw_defaults = {}
    for key, value in raw_defaults.items():
        if key not in defaults:
            problem(f"defaults.{key}", "unknown key (allowed: connect_timeout, timeout)")
            continue
        try:
            defaults[key] = parse_duration(value)
        except ValueError as exc:
            problem(f"defaults.{key}", str(exc))

    services: dict[str, ServiceConfig] = {}
    raw_services = doc.get("services") or {}
    if not isinstance(raw_services, dict):
        problem("services", "must be a mapping of service name to its endpoints")
        raw_services = {}
    for name, raw in raw_services.items():
        path = f"services.{name}"
        if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
            problem(path, "service names are DNS labels (a-z, 0-9, '-', at most 63)")
            continue
        if isinstance(raw, list):
            raw = {"endpoints": raw}
            lines.alias(f"{path}.endpoints", path)
        if not isinstance(raw, dict):
            problem(path, "must be a mapping (allowed: endpoints, connect_timeout, timeout)")
            continue
        for key in raw:
            if key not in _SERVICE_KEYS:
                problem(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(_SERVICE_KEYS))})")
        timeouts = dict(defaults)
        for key in ("connect_timeout", "timeout"):
            if key in raw:
                try:
                    timeouts[key] = parse_duration(raw[key])
                except ValueError as exc:
                    problem(f"{path}.{key}", str(exc))
        endpoints: list[Endpoint] = []
        raw_endpoints = raw.get("endpoints") or []
        if not isinstance(raw_endpoints, list):
            problem(f"{path}.endpoints", "must be a list of HOST:PORT or {address, labels, weight}")
            raw_endpoints = []
        for i, item in enumerate(raw_endpoints):
            epath = f"{path}.endpoints[{i}]"
            if isinstance(item, str):
                item = {"address": item}
            if not isinstance(item, dict) or "address" not in item:
                problem(epath, "an endpoint is HOST:PORT or a mapping with 'address'")
                continue
            for key in item:
                if key not in _ENDPOINT_KEYS:
                    problem(f"{epath}.{key}", f"unknown key (allowed: {', '.join(sorted(_ENDPOINT_KEYS))})")
            try:
                host, port = parse_address(str(item["address"]))
            except ValueError as exc:
                problem(f"{epath}.address", str(exc))
                continue
            weight = item.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
                problem(f"{epath}.weight", "an integer from 1 to 1000")
                continue
            labels = item.get("labels") or {}
            if not isinstance(labels, dict):
                problem(f"{epath}.labels", "a mapping of label to value")
                continue
            endpoints.append(
                Endpoint(host, port, MappingProxyType({str(k): str(v) for k, v in labels.items()}), weight)
            )
        services[name] = ServiceConfig(name, tuple(endpoints), timeouts["connect_timeout"], timeouts["timeout"])
    if problems:
        raise ConfigError(problems)
    return make_snapshot(services, f"static:{filename}")
