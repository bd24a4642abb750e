"""A service and its endpoints, as every source of configuration describes them (the
static file, the control plane's pushes, Service policies): what the balancers, the
connection pools and the outlier detector key on. Pure data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_CONNECT_TIMEOUT = 1.0  # docs/policy.md
DEFAULT_REQUEST_TIMEOUT = 15.0  # docs/policy.md: covers the whole exchange


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
    # Registered by a sidecar (the control plane says so): dialled with mTLS unless the
    # destination's mode is off. Static and Service-document endpoints are plain.
    mtls: bool = field(default=False, compare=False)
    # What the app behind this endpoint speaks: "http1", "http2", "grpc" or "tcp" where
    # declared (the sidecar's --app-protocol, a Service document, a static file); "": not
    # declared, so an HTTP request goes on in the version it came in.
    protocol: str = field(default="", compare=False)
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
    # What the service speaks: declared (a Service document, the static file), else what
    # all its endpoints report alike; "": undeclared (config.py with_protocols).
    protocol: str = ""
