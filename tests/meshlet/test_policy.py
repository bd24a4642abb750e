"""Policy documents: a full valid example of every kind, one test per kind of error
with its exact message, and random documents that never crash the validator."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.policy import PolicyError, load_documents
from meshlet.schema import AccessPolicy, DestinationPolicy, MeshConfig, Route, Service

EVERYTHING = textwrap.dedent(
    """\
    kind: Service
    name: billing
    endpoints:
      - 10.0.0.7:8443
      - {address: 10.0.0.8:8443, labels: {zone: b}, weight: 2}
    connect_timeout: 500ms
    timeout: 5s
    ---
    kind: Route
    name: item-canary
    host: item
    rules:
      - name: beta-users
        priority: 100
        match:
          path: {prefix: /items}
          methods: [GET, HEAD]
          headers: {X-User-Group: {exact: beta}}
          query: {debug: {present: true}}
        destinations:
          - {service: item, subset: {version: v2}, weight: 10}
          - {service: item, subset: {version: v1}, weight: 90}
        headers:
          request: {add: {x-canary: "1"}, remove: [x-debug]}
          response: {add: {x-served-by: canary}}
        rewrite: {prefix: /v2/items}
        fault: {delay: {percent: 10, duration: 2s}, abort: {percent: 1, status: 503}}
        mirror: {service: item-shadow, percent: 5}
        timeout: 2s
      - name: old-api
        match: {path: {regex: "^/v0/.*"}}
        redirect: {location: /items, status: 301}
      - name: maintenance
        match: {path: {exact: /admin}}
        direct_response: {status: 503, body: down for maintenance}
    tests:
      - request: {path: "/items/1?debug=1", headers: {x-user-group: beta}}
        expect: {rule: beta-users, service: item}
      - request: {method: POST, path: /nowhere}
        expect: {status: 404}
    ---
    kind: DestinationPolicy
    name: item
    service: item
    load_balancer: least_request
    timeout: 3s
    per_try_timeout: 1s
    retries: {attempts: 3, retry_on: [connect-failure, 5xx], backoff: {base: 10ms, max: 1s}}
    circuit_breaker: {min_requests: 10, failure_ratio: 0.25, slow_call: {threshold: 800ms}}
    outlier_detection: {consecutive_failures: 3}
    limits: {max_inflight: 100, max_pending: 10}
    fallback: {status: 200, body: '{"items": []}', headers: {content-type: application/json}}
    rate_limit: {requests_per_second: 50, burst: 100}
    mode: shadow
    ---
    kind: AccessPolicy
    name: item-callers
    service: item
    rules:
      - {sources: [user, gateway], paths: [/items], methods: [GET]}
    ---
    kind: MeshConfig
    name: mesh
    tracing: {sampling: 0.1, formats: [b3], collector: "http://127.0.0.1:9411/api/v2/spans"}
    mtls: {mode: permissive}
    """
)


def _problems(text: str, filename: str = "p.yaml") -> list[str]:
    try:
        load_documents([(filename, textwrap.dedent(text))])
    except PolicyError as exc:
        return exc.problems
    return []


def test_a_document_of_every_kind_loads_with_its_values_and_defaults() -> None:
    service, route, destination, access, mesh = load_documents([("all.yaml", EVERYTHING)])
    assert isinstance(service, Service) and service.endpoints[1].weight == 2 and service.connect_timeout == 0.5
    assert service.endpoints[0].address == "10.0.0.7:8443" and service.endpoints[0].weight == 1
    assert isinstance(route, Route) and [r.name for r in route.rules] == ["beta-users", "old-api", "maintenance"]
    beta = route.rules[0]
    assert beta.match.headers["x-user-group"].exact == "beta"  # header names are case-insensitive
    assert [d.weight for d in beta.destinations or []] == [10, 90]
    assert beta.fault is not None and beta.fault.delay is not None and beta.fault.delay.duration == 2.0
    assert isinstance(destination, DestinationPolicy) and destination.retries.backoff.max == 1.0
    assert destination.retries.budget.ratio == 0.2 and destination.circuit_breaker.open_for == 5.0  # defaults
    assert isinstance(access, AccessPolicy) and access.default == "deny"
    assert isinstance(mesh, MeshConfig) and mesh.mtls.mode == "permissive" and mesh.metrics.max_series == 10_000
    assert mesh.outbound_traffic_policy == "ALLOW_ANY"


def test_json_documents_load_too() -> None:
    doc = {"kind": "Service", "name": "billing", "endpoints": ["10.0.0.7:8443"]}
    (service,) = load_documents([("billing.json", json.dumps(doc))])
    assert isinstance(service, Service)


def test_an_empty_document_is_left_out() -> None:
    """A trailing ``---`` (or two in a row), as kubectl reads a stream: it was a problem."""
    text = "---\nkind: Service\nname: a\n---\n---\nkind: Service\nname: b\n---\n"
    assert [doc.name for doc in load_documents([("p.yaml", text)])] == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules:\n  - name: a\n    destinations: [{service: item}]\n    colour: red\n",
            "p.yaml:7: rules[0].colour: unknown key (allowed: name, priority, match, destinations, redirect, "
            "direct_response, headers, rewrite, fault, mirror, timeout)",
            id="unknown-key",
        ),
        pytest.param(
            "kind: Route\nname: r\nrules:\n  - name: a\n    destinations: [{service: item}]\n",
            "p.yaml:1: host: required",
            id="missing",
        ),
        pytest.param(
            "kind: DestinationPolicy\nname: d\nservice: item\nload_balancer: fastest\n",
            "p.yaml:4: load_balancer: 'fastest' is not allowed (allowed: ewma, round_robin, random, least_request)",
            id="not-allowed",
        ),
        pytest.param(
            "kind: DestinationPolicy\nname: d\nservice: item\nretries: {attempts: 20}\n",
            "p.yaml:4: retries.attempts: 20 is out of range (must be ≤ 10)",
            id="out-of-range",
        ),
        pytest.param(
            "kind: Service\nname: billing\ntimeout: soon\n",
            "p.yaml:3: timeout: 'soon' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
            id="bad-duration",
        ),
        pytest.param(
            "kind: Service\nname: billing\nprotocol: udp\n",
            "p.yaml:3: protocol: 'udp' is not allowed (allowed: http1, http2, grpc, tcp)",
            id="bad-protocol",
        ),
        pytest.param(
            "kind: Service\nname: Billing\n",
            "p.yaml:2: name: 'Billing' is not a service name (a DNS label: a-z, 0-9, '-', at most 63)",
            id="bad-service-name",
        ),
        pytest.param(
            "kind: Service\nname: billing\nendpoints: [nohost]\n",
            "p.yaml:3: endpoints[0].address: 'nohost' is not HOST:PORT",
            id="bad-address",
        ),
        pytest.param(
            "kind: MeshConfig\nname: mesh\nmtls: strict\n",
            "p.yaml:3: mtls: must be a mapping, not 'strict'",
            id="wrong-type",
        ),
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules:\n  - name: a\n    match: {path: {exact: /a, prefix: /b}}\n"
            "    destinations: [{service: item}]\n",
            "p.yaml:6: rules[0].match.path: give only one of exact, prefix, regex (got exact, prefix)",
            id="one-of",
        ),
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules:\n  - name: a\n    match: {path: {regex: '(unclosed'}}\n"
            "    destinations: [{service: item}]\n",
            "p.yaml:6: rules[0].match.path.regex: '(unclosed' is not a valid regular expression: "
            "missing ), unterminated subpattern at position 0",
            id="bad-regex",
        ),
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules:\n  - name: a\n",
            "p.yaml:5: rules[0]: give one of destinations, redirect, direct_response",
            id="no-action",
        ),
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules:\n  - name: a\n    destinations: [{service: item, weight: 0}]\n",
            "p.yaml:5: rules[0]: destinations: the weights add up to 0",
            id="zero-weights",
        ),
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules:\n  - name: a\n    rewrite: {prefix: /v2}\n"
            "    destinations: [{service: item}]\n",
            "p.yaml:5: rules[0]: rewrite.prefix needs match.path.prefix (the part it replaces)",
            id="rewrite-without-prefix",
        ),
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules:\n  - {name: a, destinations: [{service: item}]}\n"
            "  - {name: a, destinations: [{service: item}]}\n",
            "p.yaml:4: rules: two rules are named 'a'",
            id="duplicate-rule",
        ),
        pytest.param(
            "kind: Route\nname: r\nhost: item\nrules: []\n",
            "p.yaml:4: rules: the list should have at least 1 item after validation, not 0",
            id="empty-rules",
        ),
        pytest.param(
            "kind: DestinationPolicy\nname: d\nservice: item\nrule: just-a-rule\n",
            "p.yaml:4: rule: 'just-a-rule' is not ROUTE/RULE (a Route's name, '/', one of its rules)",
            id="bad-rule-reference",
        ),
        pytest.param(
            "kind: Gateway\nname: g\n",
            "p.yaml:1: kind: 'Gateway' is not a kind "
            "(allowed: Service, Route, DestinationPolicy, AccessPolicy, MeshConfig)",
            id="unknown-kind",
        ),
        pytest.param(
            "name: g\n",
            "p.yaml:1: kind: missing (allowed: Service, Route, DestinationPolicy, AccessPolicy, MeshConfig)",
            id="no-kind",
        ),
        pytest.param("- a\n- b\n", "p.yaml:1: (document): must be a mapping with 'kind' and 'name'", id="not-a-map"),
        pytest.param(
            "kind: [unclosed\n", "p.yaml:2: not valid YAML: expected ',' or ']', but got '<stream end>'", id="bad-yaml"
        ),
        pytest.param(
            "kind: Service\nname: billing\n---\nkind: Service\nname: billing\n",
            "p.yaml:5: name: Service 'billing' is defined twice (first at p.yaml:2)",
            id="duplicate-name",
        ),
        pytest.param(
            "kind: Route\nname: a\nhost: item\nrules: [{name: r, destinations: [{service: item}]}]\n---\n"
            "kind: Route\nname: b\nhost: item\nrules: [{name: r, destinations: [{service: item}]}]\n",
            "p.yaml:8: host: 'item' is already covered by Route 'a' (at p.yaml:3); one Route per host",
            id="two-routes-one-host",
        ),
        pytest.param(
            "kind: Route\nname: item\nhost: item\nrules: [{name: r, destinations: [{service: item}]}]\n",
            None,
            id="a-route-named-like-its-host-is-fine",
        ),
        pytest.param(
            "kind: AccessPolicy\nname: a\nservice: item\n---\nkind: AccessPolicy\nname: b\nservice: item\n",
            "p.yaml:7: service: 'item' is already covered by AccessPolicy 'a' (at p.yaml:3); one AccessPolicy per service",
            id="two-access-policies-one-service",
        ),
        pytest.param(
            "kind: DestinationPolicy\nname: a\nservice: item\n---\n"
            "kind: DestinationPolicy\nname: b\nservice: item\n---\n"
            "kind: DestinationPolicy\nname: c\nservice: item\nrule: r/x\n---\n"
            "kind: DestinationPolicy\nname: d\nservice: item\nrule: r/x\n",
            "p.yaml:7: service: 'item' is already covered by DestinationPolicy 'a' (at p.yaml:3); "
            "one DestinationPolicy per service (and per rule)\n"
            "p.yaml:17: rule: 'r/x' is already covered by DestinationPolicy 'c' (at p.yaml:12); "
            "one DestinationPolicy per service and rule",
            id="two-destination-policies-one-scope",
        ),
        pytest.param(
            "kind: DestinationPolicy\nname: a\nservice: item\nhedging: {delay: p42}\n",
            "p.yaml:4: hedging.delay: 'p42' is neither a percentile of observed latency nor a duration "
            "(allowed: p50, p75, p90, p95, p99, 250ms, 2s)",
            id="hedging-delay",
        ),
        pytest.param(
            "kind: MeshConfig\nname: global\n",
            "p.yaml:2: name: 'global' is not allowed (allowed: mesh)",
            id="mesh-config-name",
        ),
        pytest.param(
            "kind: MeshConfig\nname: mesh\noutbound_traffic_policy: registry-only\n",
            "p.yaml:3: outbound_traffic_policy: 'registry-only' is not allowed (allowed: ALLOW_ANY, REGISTRY_ONLY)",
            id="outbound-traffic-policy",
        ),
    ],
)
def test_each_kind_of_error_has_its_message(text: str, expected: str | None) -> None:
    assert _problems(text) == ([] if expected is None else expected.split("\n"))


def test_every_problem_of_every_file_is_reported_at_once() -> None:
    with pytest.raises(PolicyError) as info:
        load_documents(
            [
                ("a.yaml", "kind: Service\nname: billing\ntimeout: soon\nendpoints: [nohost]\n"),
                ("b.yaml", "kind: Service\nname: ok\n---\nkind: Nope\n"),
            ]
        )
    assert info.value.problems == [
        "a.yaml:3: timeout: 'soon' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        "a.yaml:4: endpoints[0].address: 'nohost' is not HOST:PORT",
        "b.yaml:4: kind: 'Nope' is not a kind (allowed: Service, Route, DestinationPolicy, AccessPolicy, MeshConfig)",
    ]


_scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
_keys = st.sampled_from(
    [
        "kind",
        "name",
        "host",
        "rules",
        "match",
        "path",
        "prefix",
        "destinations",
        "service",
        "weight",
        "retries",
        "attempts",
        "timeout",
        "endpoints",
        "mode",
        "tests",
        "request",
        "expect",
        "x",
    ]
)
_values = st.recursive(
    _scalars | st.sampled_from(["Route", "Service", "DestinationPolicy", "AccessPolicy", "MeshConfig", "item", "2s"]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_keys, kids, max_size=5),
    max_leaves=25,
)


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_random_documents_never_crash_the_validator(doc: dict[str, object]) -> None:
    text = yaml.safe_dump(doc)
    try:
        load_documents([("r.yaml", text)])
    except PolicyError as exc:
        assert exc.problems and all(p.startswith("r.yaml:") for p in exc.problems)


def test_every_example_in_docs_policy_md_is_valid() -> None:
    text = (Path(__file__).parents[2] / "docs" / "policy.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert len(blocks) == 7
    docs = load_documents([(f"docs/policy.md#{i}", block) for i, block in enumerate(blocks)])
    kinds = ["Service", "Service", "Service", "Route", "DestinationPolicy", "AccessPolicy", "MeshConfig"]
    assert [d.kind for d in docs] == kinds


_ROUTE = "kind: Route\nname: r\nhost: item\nrules:\n  - name: a\n    match: {path: {prefix: /v1}}\n"
_TO_ITEM = "    destinations: [{service: item}]\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            _ROUTE + _TO_ITEM + '    headers: {request: {add: {x-a: "1\\r\\nX-Injected: 1"}}}\n',
            "p.yaml:8: rules[0].headers.request.add.x-a: '1\\r\\nX-Injected: 1' has a CR at position 1; "
            "a header value holds only visible ASCII, space and tab",
            id="request-header-value",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + '    headers: {response: {add: {x-a: "1\\nSet-Cookie: s=1"}}}\n',
            "p.yaml:8: rules[0].headers.response.add.x-a: '1\\nSet-Cookie: s=1' has a LF at position 1; "
            "a header value holds only visible ASCII, space and tab",
            id="response-header-value",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + '    headers: {response: {add: {x-a: "caf\\u00e9"}}}\n',
            "p.yaml:8: rules[0].headers.response.add.x-a: 'café' has U+00E9 at position 3; "
            "a header value holds only visible ASCII, space and tab",
            id="non-ascii-header-value",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + '    headers: {request: {add: {"x-a\\n": "1"}}}\n',
            "p.yaml:8: rules[0].headers.request.add.x-a\n: 'x-a\\n' is not a header name",
            id="header-name-with-a-trailing-newline",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + "    headers: {request: {add: {Content-Length: '0'}}}\n",
            "p.yaml:8: rules[0].headers.request.add.Content-Length: 'content-length' is set by the sidecar "
            "(framing, connection and Host headers cannot be added by a policy)",
            id="framing-header-added",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + "    headers: {response: {add: {transfer-encoding: chunked}}}\n",
            "p.yaml:8: rules[0].headers.response.add.transfer-encoding: 'transfer-encoding' is set by the sidecar "
            "(framing, connection and Host headers cannot be added by a policy)",
            id="framing-response-header-added",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + '    rewrite: {prefix: "/v2 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /admin"}\n',
            "p.yaml:8: rules[0].rewrite.prefix: '/v2 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /... has a space at "
            "position 3; a path holds only visible ASCII (percent-encode the rest)",
            id="rewrite-prefix",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + '    rewrite: {path: "/v2\\u0000"}\n',
            "p.yaml:8: rules[0].rewrite.path: '/v2\\x00' has a NUL at position 3; "
            "a path holds only visible ASCII (percent-encode the rest)",
            id="rewrite-path",
        ),
        pytest.param(
            _ROUTE + '    redirect: {location: "/x\\r\\nSet-Cookie: s=1"}\n',
            "p.yaml:7: rules[0].redirect.location: '/x\\r\\nSet-Cookie: s=1' has a CR at position 2; "
            "a location holds only visible ASCII (percent-encode the rest)",
            id="redirect-location",
        ),
        pytest.param(
            _ROUTE + '    direct_response: {status: 200, headers: {x-a: "1\\r\\n"}}\n',
            "p.yaml:7: rules[0].direct_response.headers.x-a: '1\\r\\n' has a CR at position 1; "
            "a header value holds only visible ASCII, space and tab",
            id="direct-response-header",
        ),
        pytest.param(
            _ROUTE + "    direct_response: {status: 200, headers: {content-length: '5'}}\n",
            "p.yaml:7: rules[0].direct_response.headers.content-length: 'content-length' is set by the sidecar "
            "(framing, connection and Host headers cannot be added by a policy)",
            id="direct-response-framing-header",
        ),
        pytest.param(
            'kind: DestinationPolicy\nname: d\nservice: item\nfallback: {status: 200, headers: {x-a: "\\0"}}\n',
            "p.yaml:4: fallback.headers.x-a: '\\x00' has a NUL at position 0; "
            "a header value holds only visible ASCII, space and tab",
            id="fallback-header",
        ),
        pytest.param(
            _ROUTE + _TO_ITEM + '    mirror: {service: "item\\n"}\n',
            "p.yaml:8: rules[0].mirror.service: 'item\\n' is not a service name (a DNS label: a-z, 0-9, '-', "
            "at most 63)",
            id="mirror-service",
        ),
        pytest.param(
            'kind: Route\nname: r\nhost: "item\\r\\n"\nrules: [{name: a, destinations: [{service: item}]}]\n',
            "p.yaml:3: host: 'item\\r\\n' is not a service name (a DNS label: a-z, 0-9, '-', at most 63)",
            id="route-host",
        ),
        pytest.param(
            'kind: Route\nname: "r\\n"\nhost: item\nrules: [{name: a, destinations: [{service: item}]}]\n',
            "p.yaml:2: name: 'r\\n' is not a name (a-z, 0-9, '-', '.', at most 253)",
            id="policy-name",
        ),
        pytest.param(
            'kind: Route\nname: r\nhost: item\nrules: [{name: "a\\r\\nb", destinations: [{service: item}]}]\n',
            "p.yaml:4: rules[0].name: 'a\\r\\nb' has a CR at position 1; a rule's name holds only visible ASCII "
            "and space",
            id="rule-name",
        ),
        pytest.param(
            'kind: Service\nname: billing\nendpoints: ["10.0.0.1\\r\\nx:80"]\n',
            "p.yaml:3: endpoints[0].address: '10.0.0.1\\r\\nx:80' is not HOST:PORT "
            "(a host is visible ASCII: no whitespace, control character or '/')",
            id="endpoint-address",
        ),
        pytest.param(
            'kind: MeshConfig\nname: mesh\ntracing: {collector: "http://c/\\r\\nX-A: 1"}\n',
            "p.yaml:3: tracing.collector: 'http://c/\\r\\nX-A: 1' has a CR at position 9; "
            "a URL holds only visible ASCII (percent-encode the rest)",
            id="collector",
        ),
        pytest.param(
            'kind: AccessPolicy\nname: a\nservice: item\nrules: [{sources: [user], paths: ["/a\\tb"]}]\n',
            "p.yaml:4: rules[0].paths[0]: '/a\\tb' has a TAB at position 2; "
            "a path holds only visible ASCII (percent-encode the rest)",
            id="access-path",
        ),
    ],
)
def test_no_string_that_reaches_the_wire_may_hold_a_control_character(text: str, expected: str) -> None:
    assert _problems(text) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "kind: AccessPolicy\nname: a\nservice: item\nrules: [{sources: [user], paths: [/items/../admin]}]\n",
            "p.yaml:4: rules[0].paths[0]: '/items/../admin' is not a normalised path (requests are compared "
            "normalised: write '/admin')",
            id="access-path-not-normal",
        ),
        pytest.param(
            "kind: AccessPolicy\nname: a\nservice: item\nrules: [{sources: [user], paths: ['/a%2fb']}]\n",
            "p.yaml:4: rules[0].paths[0]: '/a%2fb' can match no request: the sidecar refuses a path with an "
            "encoded '/' or '\\' (%2F, %5C), which apps split on or not",
            id="access-path-refused",
        ),
        pytest.param(
            _ROUTE.replace("/v1", "//v1") + _TO_ITEM,
            "p.yaml:6: rules[0].match.path.prefix: '//v1' is not a normalised path (requests are compared "
            "normalised: write '/v1')",
            id="route-prefix-not-normal",
        ),
    ],
)
def test_paths_matched_against_requests_are_written_normalised(text: str, expected: str) -> None:
    assert _problems(text) == [expected]
