"""The policy schema: pydantic models of the five kinds of policy document.

docs/policy.md. Five kinds, each a document with ``kind`` and a ``name`` unique per kind:
``Service`` (static endpoints for services without a sidecar), ``Route`` (per host:
ordered rules, their matches and actions, embedded tests), ``DestinationPolicy`` (the
resilience knobs), ``AccessPolicy`` and ``MeshConfig``. docs/policy.md shows every field
with an example. Pure: no I/O. Loading a text into these, with every problem reported as
``file:line: path: what``, is meshlet/policy.py's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .addresses import check_address
from .durations import parse_duration
from .endpoints import DEFAULT_WEIGHT, check_endpoint_list, check_labels, check_weight, endpoint_mapping
from .names import check_header_name, check_policy_name, check_service_name
from .problems import shown

# Headers the sidecar writes itself: framing and connection management (what a policy adding
# one would desynchronise), and Host (routing's, as Envoy keeps it out of headers_to_add).
SET_BY_THE_SIDECAR = frozenset(
    {
        "connection",
        "content-length",
        "expect",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
RETRY_ON = (
    "connect-failure",
    "reset",
    "refused",
    "unavailable",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    # gRPC statuses of a Trailers-Only answer ("unavailable" is UNAVAILABLE as well as 503)
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
)


# --- field types -------------------------------------------------------------------------


# The rules of names, durations, addresses and endpoints are the contract's own modules
# (meshlet/names.py, durations.py, addresses.py, endpoints.py): the sidecar's static file
# checks the same fields with the same functions, without pydantic.


def _added_header_name(value: Any) -> str:
    name = check_header_name(value)
    if name in SET_BY_THE_SIDECAR:
        raise ValueError(
            f"{name!r} is set by the sidecar (framing, connection and Host headers cannot be added by a policy)"
        )
    return name


# Every policy string that the sidecar writes into a message is checked here, character by
# character: a CR, LF or NUL there would end a header line early (a header of the policy
# author's choosing, a split response, a second request smuggled upstream).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")  # RFC 9110 field-value, without obs-text
_VISIBLE = re.compile(r"[\x21-\x7e]*")  # a request target, a Location, a URL: no space either
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_CHAR_NAMES = {"\r": "a CR", "\n": "a LF", "\0": "a NUL", "\t": "a TAB", " ": "a space"}


def _only(pattern: re.Pattern[str], what: str) -> Any:
    def check(value: str) -> str:
        match = pattern.match(value)
        end = match.end() if match else 0
        if end < len(value):
            char = value[end]
            name = _CHAR_NAMES.get(char) or (
                f"U+{ord(char):04X}" if ord(char) > 0x7E else f"control character {char!r}"
            )
            raise ValueError(f"{shown(value)} has {name} at position {end}; {what}")
        return value

    return AfterValidator(check)


def _regex(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a regular expression")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{value!r} is not a path (it starts with '/')")
    return value


_TARGET_TEXT = "holds only visible ASCII (percent-encode the rest)"


def _normal_path(value: str) -> str:
    """A path matched against requests: the sidecar compares normalised paths
    (meshlet/paths.py), so one written otherwise could never match."""
    from meshlet.paths import BadPath, normalise_path

    try:
        normal = normalise_path(value.encode("ascii")).decode("ascii")
    except BadPath as exc:
        raise ValueError(f"{value!r} can match no request: the sidecar refuses a path with {exc}") from None
    if normal != value:
        raise ValueError(f"{value!r} is not a normalised path (requests are compared normalised: write {normal!r})")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
ServiceName = Annotated[str, BeforeValidator(check_service_name)]
PolicyName = Annotated[str, BeforeValidator(check_policy_name)]
HeaderName = Annotated[str, BeforeValidator(check_header_name)]
Address = Annotated[str, BeforeValidator(check_address)]
Regex = Annotated[str, BeforeValidator(_regex)]
Path = Annotated[str, BeforeValidator(_path), _only(_VISIBLE, f"a path {_TARGET_TEXT}")]
NormalPath = Annotated[Path, AfterValidator(_normal_path)]
AddedHeaderName = Annotated[str, BeforeValidator(_added_header_name)]
HeaderValue = Annotated[str, _only(_FIELD_VALUE, "a header value holds only visible ASCII, space and tab")]
Location = Annotated[str, Field(min_length=1), _only(_VISIBLE, f"a location {_TARGET_TEXT}")]
Url = Annotated[str, _only(_VISIBLE, f"a URL {_TARGET_TEXT}")]
RuleName = Annotated[
    str, Field(min_length=1, max_length=128), _only(_PRINTABLE, "a rule's name holds only visible ASCII and space")
]
Percent = Annotated[float, Field(ge=0, le=100)]
Status = Annotated[int, Field(ge=200, le=599)]
Labels = Annotated[dict[str, str], BeforeValidator(check_labels)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, str_strip_whitespace=False)


def _one_of(model: BaseModel, fields: Iterable[str], *, required: bool = True) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    names = ", ".join(fields)
    if len(given) > 1:
        raise ValueError(f"give only one of {names} (got {', '.join(given)})")
    if required and not given:
        raise ValueError(f"give one of {names}")


# --- Service -------------------------------------------------------------------------------


class EndpointSpec(_Model):
    address: Address
    labels: Labels = {}
    weight: Annotated[int, BeforeValidator(check_weight)] = DEFAULT_WEIGHT

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return endpoint_mapping(value)


def _yaml_off(value: Any) -> Any:
    """``mode: off`` unquoted is YAML 1.1's false: the word was meant."""
    return "off" if value is False else value


class Mtls(_Model):
    """mTLS between sidecars (docs/security.md). permissive: mesh traffic is mTLS, and a
    plaintext caller is still served, as ``unauthenticated``; strict: plaintext to an inbound
    port is refused; off: plaintext both ways, every caller unauthenticated (benchmarks, migrations)."""

    mode: Annotated[Literal["off", "permissive", "strict"], BeforeValidator(_yaml_off)] = "permissive"


class Service(_Model):
    """Static endpoints for a service without a sidecar (a database, a third-party API),
    and per-service defaults; ``mtls`` overrides MeshConfig's mode for this service's
    sidecars (their inbound listeners, and the calls made to them); ``protocol`` declares
    what its port speaks (wins over what its instances report; unset: detected)."""

    kind: Literal["Service"]
    name: ServiceName
    endpoints: Annotated[list[EndpointSpec], BeforeValidator(check_endpoint_list)] = []
    connect_timeout: Duration | None = None
    timeout: Duration | None = None
    mtls: Mtls | None = None
    protocol: Literal["http1", "http2", "grpc", "tcp"] | None = None  # meshlet/endpoints.py PROTOCOLS


# --- Route ---------------------------------------------------------------------------------


class StringMatch(_Model):
    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> StringMatch:
        _one_of(self, ("exact", "prefix", "regex", "present"))
        return self


class PathMatch(_Model):
    exact: NormalPath | None = None
    prefix: NormalPath | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _one(self) -> PathMatch:
        _one_of(self, ("exact", "prefix", "regex"))
        return self


class Match(_Model):
    path: PathMatch | None = None
    methods: list[Literal[METHODS]] | None = None  # type: ignore[valid-type]
    headers: dict[HeaderName, StringMatch] = {}
    query: dict[Annotated[str, Field(min_length=1)], StringMatch] = {}


class Destination(_Model):
    service: ServiceName
    subset: Labels = {}  # endpoints whose labels include all of these
    weight: int = Field(default=1, ge=0, le=10_000)


class HeaderChanges(_Model):
    add: dict[AddedHeaderName, HeaderValue] = {}  # set (replacing what is there)
    remove: list[HeaderName] = []


class HeaderActions(_Model):
    request: HeaderChanges = HeaderChanges()
    response: HeaderChanges = HeaderChanges()


class Rewrite(_Model):
    prefix: Path | None = None  # replaces the matched path prefix (needs match.path.prefix)
    path: Path | None = None  # replaces the whole path

    @model_validator(mode="after")
    def _one(self) -> Rewrite:
        _one_of(self, ("prefix", "path"))
        return self


class Redirect(_Model):
    location: Location
    status: Literal[301, 302, 303, 307, 308] = 302


class DirectResponse(_Model):
    status: Status
    headers: dict[AddedHeaderName, HeaderValue] = {}
    body: str = ""


class Delay(_Model):
    percent: Percent
    duration: Duration


class Abort(_Model):
    percent: Percent
    status: Status = 503


class Fault(_Model):
    delay: Delay | None = None
    abort: Abort | None = None

    @model_validator(mode="after")
    def _some(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("give delay, abort or both")
        return self


class Mirror(_Model):
    service: ServiceName
    percent: Percent = 100.0


class Rule(_Model):
    name: RuleName
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)  # higher first; ties keep file order
    match: Match = Match()
    destinations: list[Destination] | None = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    headers: HeaderActions = HeaderActions()
    rewrite: Rewrite | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    timeout: Duration | None = None

    @model_validator(mode="after")
    def _action(self) -> Rule:
        _one_of(self, ("destinations", "redirect", "direct_response"))
        if self.destinations is not None:
            if not self.destinations:
                raise ValueError("destinations: give at least one")
            if sum(d.weight for d in self.destinations) == 0:
                raise ValueError("destinations: the weights add up to 0")
        if self.rewrite is not None and self.rewrite.prefix is not None:
            if self.match.path is None or self.match.path.prefix is None:
                raise ValueError("rewrite.prefix needs match.path.prefix (the part it replaces)")
        return self


class TestRequest(_Model):
    method: Literal[METHODS] = "GET"  # type: ignore[valid-type]
    path: Path = "/"
    headers: dict[HeaderName, str] = {}


class TestExpect(_Model):
    rule: str | None = None  # the rule that matches
    service: ServiceName | None = None  # a destination the rule may send it to
    status: Status | None = None  # 404 when no rule matches, or a redirect / direct response

    @model_validator(mode="after")
    def _some(self) -> TestExpect:
        if self.rule is None and self.service is None and self.status is None:
            raise ValueError("give rule, service or status (or several)")
        return self


class RouteTest(_Model):
    request: TestRequest
    expect: TestExpect


class Route(_Model):
    """Per host: ordered rules; the first that matches (by priority, then order) decides."""

    kind: Literal["Route"]
    name: PolicyName
    host: ServiceName
    mode: Literal["enforce", "shadow"] = "enforce"
    rules: list[Rule] = Field(min_length=1)
    tests: list[RouteTest] = []

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}")
            seen.add(rule.name)
        return rules


# --- DestinationPolicy ---------------------------------------------------------------------


class Backoff(_Model):
    base: Duration = 0.025
    max: Duration = 0.25


class Budget(_Model):
    ratio: float = Field(default=0.2, ge=0, le=10)
    min_per_second: float = Field(default=10, ge=0, le=100_000)
    window: Duration = 10.0


class Retries(_Model):
    attempts: int = Field(default=2, ge=0, le=10)  # retries after the first try
    retry_on: list[Literal[RETRY_ON]] = ["connect-failure", "reset", "refused", "unavailable"]  # type: ignore[valid-type]
    retriable_status_codes: list[Status] = []
    non_idempotent: bool = False  # retry POST/PATCH too
    buffer_bytes: int = Field(default=64 * 1024, ge=0, le=16 * 1024 * 1024)  # a larger body is never retried
    backoff: Backoff = Backoff()
    budget: Budget = Budget()


class SlowCall(_Model):
    threshold: Duration
    ratio: float = Field(default=1.0, gt=0, le=1)


class CircuitBreaker(_Model):
    window: Duration = 10.0
    min_requests: int = Field(default=20, ge=1, le=1_000_000)
    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    open_for: Duration = 5.0
    half_open_requests: int = Field(default=1, ge=1, le=1000)
    slow_call: SlowCall | None = None
    force: Literal["open", "closed"] | None = None


class OutlierDetection(_Model):
    consecutive_failures: int = Field(default=5, ge=1, le=1000)
    base_ejection: Duration = 30.0
    max_ejection: Duration = 300.0
    max_ejected_percent: Percent = 50.0


class Limits(_Model):
    max_inflight: int = Field(default=1024, ge=1, le=1_000_000)
    max_pending: int = Field(default=1024, ge=0, le=1_000_000)


class Fallback(_Model):
    status: Status | None = None
    headers: dict[AddedHeaderName, HeaderValue] = {}
    body: str = ""
    service: ServiceName | None = None

    @model_validator(mode="after")
    def _one(self) -> Fallback:
        _one_of(self, ("status", "service"))
        return self


def _hedge_delay(value: Any) -> float | str:
    if isinstance(value, str) and value in PERCENTILES:
        return value
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a percentile of observed latency nor a duration "
            f"(allowed: {', '.join(PERCENTILES)}, 250ms, 2s)"
        ) from None


PERCENTILES = ("p50", "p75", "p90", "p95", "p99")


class Hedging(_Model):
    """Opt-in: a second attempt to another endpoint when the first is slow to answer."""

    delay: Annotated[float | str, BeforeValidator(_hedge_delay)] = "p95"  # of observed latency, or fixed
    min_delay: Duration = 0.005  # never sooner than this


class RateLimit(_Model):
    requests_per_second: float = Field(gt=0, le=1_000_000)
    burst: int = Field(default=1, ge=1, le=1_000_000)


class DestinationPolicy(_Model):
    """How calls to ``service`` are made (docs/policy.md); optionally for one route's rule."""

    kind: Literal["DestinationPolicy"]
    name: PolicyName
    service: ServiceName
    rule: str | None = None  # ROUTE_NAME/RULE_NAME: only requests that rule matched
    mode: Literal["enforce", "shadow"] = "enforce"
    load_balancer: Literal["ewma", "round_robin", "random", "least_request"] = "ewma"
    connect_timeout: Duration = 1.0
    timeout: Duration = 15.0
    per_try_timeout: Duration | None = None
    retries: Retries = Retries()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    outlier_detection: OutlierDetection = OutlierDetection()
    limits: Limits = Limits()
    fallback: Fallback | None = None
    rate_limit: RateLimit | None = None
    hedging: Hedging | None = None

    @field_validator("rule")
    @classmethod
    def _rule_ref(cls, value: str | None) -> str | None:
        if value is not None and value.count("/") != 1:
            raise ValueError(f"{value!r} is not ROUTE/RULE (a Route's name, '/', one of its rules)")
        return value


# --- AccessPolicy, MeshConfig ----------------------------------------------------------------


class AccessRule(_Model):
    sources: list[Annotated[str, BeforeValidator(lambda v: "*" if v == "*" else check_service_name(v))]] = Field(
        min_length=1
    )
    paths: list[NormalPath] = []  # prefixes; empty: every path
    methods: list[Literal[METHODS]] = []  # type: ignore[valid-type]  # empty: every method


class AccessPolicy(_Model):
    """Which services may call ``service`` (and on which paths and methods)."""

    kind: Literal["AccessPolicy"]
    name: PolicyName
    service: ServiceName
    mode: Literal["enforce", "shadow"] = "enforce"
    default: Literal["deny", "allow"] = "deny"  # for callers no rule names
    rules: list[AccessRule] = []


def _collector_url(value: str) -> str:
    """An http(s) URL with a host: every sidecar POSTs its spans there, so nothing else (a
    file:// or gopher:// URL, a bare host) is accepted."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port  # reads it: a port that is not a number is refused here
    except ValueError as exc:
        raise ValueError(f"not a URL the sidecars can send spans to ({exc})") from None
    if parts.scheme not in ("http", "https"):
        scheme = f"its scheme is {parts.scheme!r}" if parts.scheme else "it has no scheme"
        raise ValueError(
            f"must be an http:// or https:// URL, a Zipkin v2 endpoint such as http://zipkin:9411/api/v2/spans "
            f"({scheme})"
        )
    if not parts.hostname or port == 0:
        raise ValueError("must name a host (and a port above 0), e.g. http://zipkin:9411/api/v2/spans")
    return value


CollectorUrl = Annotated[Url, AfterValidator(_collector_url)]


class Tracing(_Model):
    sampling: float = Field(default=1.0, ge=0, le=1)  # docs/tracing.md: 1.0 by default (the demo); 0.01 in production
    formats: list[Literal["b3", "w3c", "b3single"]] = ["w3c", "b3"]  # b3: the multi headers
    collector: CollectorUrl | None = None  # a Zipkin-compatible HTTP endpoint


class Metrics(_Model):
    """Bounds on the sidecars' metrics (docs/observability.md; sidecar/core/cardinality.py)."""

    # The per-hop labels kept; one left out is written empty. direction is always kept.
    labels: list[Literal["source", "destination", "route", "code", "reason", "grpc_status"]] = [
        "source",
        "destination",
        "route",
        "code",
        "reason",
        "grpc_status",
    ]
    max_label_values: int = Field(default=200, ge=1, le=100_000)  # per label; past it: "other"
    max_series: int = Field(default=10_000, ge=100, le=10_000_000)  # per metric; past it every capped label: "other"
    idle_expiry: Duration = 600.0  # a series that has not moved for this long is removed


class MeshConfig(_Model):
    """Mesh-wide settings; one document, named ``mesh``."""

    kind: Literal["MeshConfig"]
    name: Literal["mesh"]
    tracing: Tracing = Tracing()
    metrics: Metrics = Metrics()
    mtls: Mtls = Mtls()
    # Transparent mode (meshlet init-iptables): a connection to an address no service has.
    # ALLOW_ANY: passed through, as plain TCP, to where the app was going; REGISTRY_ONLY: refused.
    outbound_traffic_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"


Document = Union[Service, Route, DestinationPolicy, AccessPolicy, MeshConfig]  # noqa: UP007
KINDS: dict[str, type[BaseModel]] = {
    m.__name__: m for m in (Service, Route, DestinationPolicy, AccessPolicy, MeshConfig)
}
