"""sidecar.core.config: the static file, its `file:line: path: what` errors, durations,
addresses and the snapshot version."""

from __future__ import annotations

import math
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlet.names import is_service_name
from sidecar.core.config import ConfigError, MeshSnapshot, empty_snapshot, load_static, make_snapshot
from sidecar.core.services import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Endpoint, ServiceConfig


def load(text: str) -> MeshSnapshot:
    return load_static(textwrap.dedent(text), "mesh.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# good files ------------------------------------------------------------------------------

GOOD = """\
    defaults:
      connect_timeout: 250ms
      timeout: 2s
    services:
      item:
        - 10.0.0.1:8080
        - address: "[::1]:9090"
          labels: {zone: a, version: v2}
          weight: 3
      cart:
        endpoints: [cart-1:80, "cart-2:81"]
        timeout: 1m
        connect_timeout: 0.5
      empty: {}
      bare:
    """


def test_good_file() -> None:
    snap = load(GOOD.replace("      bare:\n", ""))
    assert snap.source == "static:mesh.yaml"
    assert sorted(snap.services) == ["cart", "empty", "item"]
    item = snap.services["item"]
    assert item == ServiceConfig(
        "item", (Endpoint("10.0.0.1", 8080), Endpoint("::1", 9090)), connect_timeout=0.25, timeout=2.0
    )
    assert [(e.host, e.port, dict(e.labels), e.weight) for e in item.endpoints] == [
        ("10.0.0.1", 8080, {}, 1),
        ("::1", 9090, {"zone": "a", "version": "v2"}, 3),
    ]
    cart = snap.services["cart"]
    assert [e.address for e in cart.endpoints] == ["cart-1:80", "cart-2:81"]
    assert (cart.connect_timeout, cart.timeout) == (0.5, 60.0)
    assert snap.services["empty"] == ServiceConfig("empty", (), 0.25, 2.0)


def test_services_are_immutable() -> None:
    snap = load(GOOD.replace("      bare:\n", ""))
    with pytest.raises(TypeError):
        snap.services["x"] = snap.services["item"]  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.services["item"].endpoints[1].labels["zone"] = "b"  # type: ignore[index]


def test_defaults_when_absent() -> None:
    snap = load("services:\n  item: [a:1]\n")
    assert snap.services["item"] == ServiceConfig(
        "item", (Endpoint("a", 1),), DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT
    )
    assert (DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT) == (1.0, 15.0)


@pytest.mark.parametrize("text", ["", "# nothing\n", "services:\n", "services: {}\n", "version: 3\nservices: {}\n"])
def test_empty_files_are_an_empty_mesh(text: str) -> None:
    snap = load_static(text, "m.yaml")
    assert dict(snap.services) == {}
    assert snap.version == empty_snapshot().version


def test_to_json() -> None:
    snap = load(GOOD.replace("      bare:\n", ""))
    assert snap.to_json() == {
        "version": snap.version,
        "source": "static:mesh.yaml",
        "policy_version": "",
        "outbound_traffic_policy": "ALLOW_ANY",
        "mtls": {"mode": "permissive", "services": {}},
        "routes": {},
        "shadow_routes": {},
        "access": {},
        "shadow_access": {},
        "destination_policies": {},
        "shadow_destination_policies": {},
        "services": {
            "cart": {
                "endpoints": [
                    {"address": "cart-1:80", "labels": {}, "weight": 1},
                    {"address": "cart-2:81", "labels": {}, "weight": 1},
                ],
                "connect_timeout": 0.5,
                "timeout": 60.0,
            },
            "empty": {"endpoints": [], "connect_timeout": 0.25, "timeout": 2.0},
            "item": {
                "endpoints": [
                    {"address": "10.0.0.1:8080", "labels": {}, "weight": 1},
                    {"address": "[::1]:9090", "labels": {"zone": "a", "version": "v2"}, "weight": 3},
                ],
                "connect_timeout": 0.25,
                "timeout": 2.0,
            },
        },
    }


# durations, addresses and names: tests/meshlet/test_durations.py, test_addresses.py, test_names.py


# one test per error kind: the exact message with file:line: and the field path --------------

ERRORS = [
    pytest.param(
        "servics: {}\n",
        "mesh.yaml:1: servics: unknown key (allowed: defaults, services, version)",
        id="unknown-top-key",
    ),
    pytest.param(
        "services: {}\nextra: 1\n",
        "mesh.yaml:2: extra: unknown key (allowed: defaults, services, version)",
        id="unknown-top-key-line-2",
    ),
    pytest.param(
        "defaults: [1]\n",
        "mesh.yaml:1: defaults: must be a mapping (allowed: connect_timeout, timeout)",
        id="defaults-not-a-mapping",
    ),
    pytest.param(
        "defaults:\n  retries: 3\n",
        "mesh.yaml:2: defaults.retries: unknown key (allowed: connect_timeout, timeout)",
        id="defaults-unknown-key",
    ),
    pytest.param(
        "defaults:\n  connect_timeout: 1s\n  timeout: soon\n",
        "mesh.yaml:3: defaults.timeout: 'soon' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        id="defaults-bad-duration",
    ),
    pytest.param(
        "defaults:\n  timeout: 0\n", "mesh.yaml:2: defaults.timeout: 0 must be greater than 0", id="defaults-zero"
    ),
    pytest.param(
        "defaults:\n  timeout: yes\n",
        "mesh.yaml:2: defaults.timeout: True is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        id="defaults-bool",
    ),
    pytest.param(
        "defaults:\n  timeout: .nan\n",
        "mesh.yaml:2: defaults.timeout: nan is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        id="defaults-nan",
    ),
    pytest.param(
        "defaults:\n  timeout: .inf\n",
        "mesh.yaml:2: defaults.timeout: inf is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        id="defaults-inf",
    ),
    pytest.param(
        "services: [item]\n",
        "mesh.yaml:1: services: must be a mapping of service name to its endpoints",
        id="services-not-a-mapping",
    ),
    pytest.param(
        "services:\n  Item_1: [a:1]\n",
        "mesh.yaml:2: services.Item_1: 'Item_1' is not a service name (a DNS label: a-z, 0-9, '-', at most 63)",
        id="bad-service-name",
    ),
    pytest.param(
        "services:\n  ok: []\n  -bad: []\n",
        "mesh.yaml:3: services.-bad: '-bad' is not a service name (a DNS label: a-z, 0-9, '-', at most 63)",
        id="service-name-leading-dash",
    ),
    pytest.param(
        "services:\n  " + "a" * 64 + ": []\n",
        "mesh.yaml:2: services."
        + "a" * 64
        + ": '"
        + "a" * 64
        + "' is not a service name (a DNS label: a-z, 0-9, '-', at most 63)",
        id="service-name-too-long",
    ),
    pytest.param(
        "services:\n  42: []\n",
        "mesh.yaml:2: services.42: 42 is not a service name (a DNS label: a-z, 0-9, '-', at most 63)",
        id="service-name-not-a-string",
    ),
    pytest.param(
        "services:\n  item: 3\n",
        "mesh.yaml:2: services.item: must be a mapping (allowed: endpoints, connect_timeout, timeout, mtls, protocol)",
        id="service-not-a-mapping",
    ),
    pytest.param(
        "services:\n  item:\n    endpoints: [a:1]\n    retry: 2\n",
        "mesh.yaml:4: services.item.retry: unknown key (allowed: endpoints, connect_timeout, timeout, mtls, protocol)",
        id="service-unknown-key",
    ),
    pytest.param(
        "services:\n  item:\n    endpoints: [a:1]\n    timeout: -1\n",
        "mesh.yaml:4: services.item.timeout: -1 must be greater than 0",
        id="service-bad-timeout",
    ),
    pytest.param(
        "services:\n  item:\n    connect_timeout: 5x\n",
        "mesh.yaml:3: services.item.connect_timeout: '5x' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        id="service-bad-connect-timeout",
    ),
    pytest.param(
        "services:\n  item:\n    endpoints: a:1\n",
        "mesh.yaml:3: services.item.endpoints: must be a list of HOST:PORT or {address, labels, weight}",
        id="endpoints-not-a-list",
    ),
    pytest.param(
        "services:\n  item:\n    endpoints:\n      - 42\n",
        "mesh.yaml:4: services.item.endpoints[0]: an endpoint is HOST:PORT or a mapping with 'address'",
        id="endpoint-not-a-string",
    ),
    pytest.param(
        "services:\n  item:\n    - a:1\n    - weight: 2\n",
        "mesh.yaml:4: services.item.endpoints[1]: an endpoint is HOST:PORT or a mapping with 'address'",
        id="endpoint-without-address-list-form",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:1\n      zone: x\n",
        "mesh.yaml:4: services.item.endpoints[0].zone: unknown key (allowed: address, labels, weight)",
        id="endpoint-unknown-key-list-form",
    ),
    pytest.param(
        "services:\n  item:\n    endpoints:\n      - address: a:1\n        labels: {zone: a}\n        extra: 2\n",
        "mesh.yaml:6: services.item.endpoints[0].extra: unknown key (allowed: address, labels, weight)",
        id="endpoint-unknown-key",
    ),
    pytest.param(
        "services:\n  item:\n    - a\n",
        "mesh.yaml:3: services.item.endpoints[0].address: 'a' is not HOST:PORT",
        id="address-no-port",
    ),
    pytest.param(
        "services:\n  item:\n    endpoints: [a:1, b:99999]\n",
        "mesh.yaml:3: services.item.endpoints[1].address: 'b:99999' has no valid port (1-65535)",
        id="address-bad-port",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:0\n",
        "mesh.yaml:3: services.item.endpoints[0].address: 'a:0' has no valid port (1-65535)",
        id="address-port-zero",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:1\n      weight: 0\n",
        "mesh.yaml:4: services.item.endpoints[0].weight: 0 is not a weight (an integer from 1 to 1000)",
        id="weight-zero",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:1\n      weight: 1001\n",
        "mesh.yaml:4: services.item.endpoints[0].weight: 1001 is not a weight (an integer from 1 to 1000)",
        id="weight-too-big",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:1\n      weight: '2'\n",
        "mesh.yaml:4: services.item.endpoints[0].weight: '2' is not a weight (an integer from 1 to 1000)",
        id="weight-string",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:1\n      weight: true\n",
        "mesh.yaml:4: services.item.endpoints[0].weight: True is not a weight (an integer from 1 to 1000)",
        id="weight-bool",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:1\n      weight: 1.5\n",
        "mesh.yaml:4: services.item.endpoints[0].weight: 1.5 is not a weight (an integer from 1 to 1000)",
        id="weight-float",
    ),
    pytest.param(
        "services:\n  item:\n    - address: a:1\n      labels: [zone]\n",
        "mesh.yaml:4: services.item.endpoints[0].labels: must be a mapping of label to value",
        id="labels-not-a-mapping",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_each_error_kind(text: str, message: str) -> None:
    assert problems(text) == [message]


def test_file_name_is_in_every_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_static("services:\n  Bad: []\n", "/etc/meshlet/static.yaml")
    assert info.value.problems == [
        "/etc/meshlet/static.yaml:2: services.Bad: 'Bad' is not a service name (a DNS label: a-z, 0-9, '-', at most 63)"
    ]


def test_all_errors_are_reported_at_once() -> None:
    text = """\
        bogus: 1
        defaults:
          timeout: x
        services:
          Bad: []
          ok:
            - nope
            - address: b:2
              weight: 0
          cart:
            endpoints: [c:1]
            retries: 3
            timeout: 0ms
        """
    assert problems(text) == [
        "mesh.yaml:1: bogus: unknown key (allowed: defaults, services, version)",
        "mesh.yaml:3: defaults.timeout: 'x' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        "mesh.yaml:5: services.Bad: 'Bad' is not a service name (a DNS label: a-z, 0-9, '-', at most 63)",
        "mesh.yaml:7: services.ok.endpoints[0].address: 'nope' is not HOST:PORT",
        "mesh.yaml:9: services.ok.endpoints[1].weight: 0 is not a weight (an integer from 1 to 1000)",
        "mesh.yaml:12: services.cart.retries: unknown key (allowed: endpoints, connect_timeout, timeout, mtls, protocol)",
        "mesh.yaml:13: services.cart.timeout: '0ms' must be greater than 0",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services:\n  item: [a:1\n", "mesh.yaml:3: not valid YAML: expected ',' or ']', but got '<stream end>'"),
        ("services:\n\titem: 1\n", "mesh.yaml:2: not valid YAML: found character '\\t' that cannot start any token"),
        ("a: b: c\n", "mesh.yaml:1: not valid YAML: mapping values are not allowed here"),
        ("services:\n  ? [a]\n  : 1\n", "mesh.yaml:2: not valid YAML: found unhashable key"),
        ("key: 'unterminated\n", "mesh.yaml:2: not valid YAML: found unexpected end of stream"),
    ],
)
def test_invalid_yaml(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_static(text, "mesh.yaml")
    assert info.value.problems == [message]


@pytest.mark.parametrize("text", ["- a\n- b\n", "hello\n", "42\n", "[services]\n", "'services'\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_static(text, "mesh.yaml")
    assert info.value.problems == ["mesh.yaml:1: (top): must be a mapping with a 'services' key"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("services: &a [*a]\n", id="recursive-list"),
        pytest.param("services:\n  item: &a {endpoints: *a}\n", id="recursive-mapping"),
        pytest.param("defaults:\n  timeout: " + "9" * 400 + "\n", id="int-too-big-for-a-float"),
        pytest.param("defaults:\n  timeout: " + "9" * 5000 + "\n", id="int-too-long-to-convert"),
        pytest.param("version: 2001-02-30\n", id="impossible-date"),
        pytest.param("services: " + "[" * 3000 + "]" * 3000 + "\n", id="nested-too-deep"),  # was a RecursionError
    ],
)
def test_pathological_files_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_static(text, "mesh.yaml")
    assert info.value.problems
    assert all(p.startswith("mesh.yaml:") for p in info.value.problems)


def test_a_key_written_with_nothing_after_it_is_left_out() -> None:
    snap = load(
        "defaults:\n  timeout:\nservices:\n  item:\n    endpoints:\n      - address: a:1\n        weight:\n    timeout:\n"
    )
    assert snap.services["item"] == ServiceConfig(
        "item", (Endpoint("a", 1),), DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT
    )
    assert snap.services["item"].endpoints[0].weight == 1


def test_a_service_with_nothing_after_it_is_refused() -> None:
    assert problems("services:\n  item: [a:1]\n  bare:\n") == [
        "mesh.yaml:3: services.bare: must be a mapping (allowed: endpoints, connect_timeout, timeout, mtls, protocol)"
    ]


def test_problems_are_in_line_order() -> None:
    text = "services:\n  item:\n    endpoints: [{weight: 0, address: a}]\n    timeout: x\n    connect_timeout: y\n"
    assert problems(text) == [
        "mesh.yaml:3: services.item.endpoints[0].address: 'a' is not HOST:PORT",
        "mesh.yaml:3: services.item.endpoints[0].weight: 0 is not a weight (an integer from 1 to 1000)",
        "mesh.yaml:4: services.item.timeout: 'x' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        "mesh.yaml:5: services.item.connect_timeout: 'y' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
    ]


def test_aliased_endpoints_are_checked_each_time() -> None:
    # An alias reports the line of its anchor, where the value is written.
    text = "services:\n  item:\n    - a:1\n    - &x {address: 'b:0'}\n    - *x\n"
    assert problems(text) == [
        "mesh.yaml:4: services.item.endpoints[1].address: 'b:0' has no valid port (1-65535)",
        "mesh.yaml:4: services.item.endpoints[2].address: 'b:0' has no valid port (1-65535)",
    ]


# snapshot versions ----------------------------------------------------------------------------


def test_version_is_stable_for_equal_content() -> None:
    a = load_static("services:\n  item: [a:1, b:2]\n  cart: [c:3]\n", "one.yaml")
    b = load_static(
        "# same mesh\nservices:\n  cart:\n    endpoints: ['c:3']\n  item:\n    - a:1\n    - address: b:2\n", "two.yaml"
    )
    assert a.version == b.version
    assert len(a.version) == 12 and int(a.version, 16) >= 0
    assert a.version == load_static("services:\n  item: [a:1, b:2]\n  cart: [c:3]\n", "one.yaml").version


@pytest.mark.parametrize(
    "changed",
    [
        "services:\n  item: [a:1, b:3]\n  cart: [c:3]\n",  # a port
        "services:\n  item: [b:2, a:1]\n  cart: [c:3]\n",  # endpoint order
        "services:\n  item: [a:1]\n  cart: [c:3]\n",  # an endpoint fewer
        "services:\n  item: [a:1, b:2]\n  carts: [c:3]\n",  # a service name
        "services:\n  item: [a:1, {address: 'b:2', weight: 2}]\n  cart: [c:3]\n",  # a weight
        "services:\n  item: [a:1, {address: 'b:2', labels: {v: '2'}}]\n  cart: [c:3]\n",  # a label
        "defaults: {timeout: 3s}\nservices:\n  item: [a:1, b:2]\n  cart: [c:3]\n",  # a timeout
    ],
)
def test_version_changes_with_content(changed: str) -> None:
    base = load_static("services:\n  item: [a:1, b:2]\n  cart: [c:3]\n", "mesh.yaml")
    assert load_static(changed, "mesh.yaml").version != base.version


def test_make_snapshot_version_ignores_the_source() -> None:
    services = {"item": ServiceConfig("item", (Endpoint("a", 1),))}
    assert make_snapshot(services, "static:x").version == make_snapshot(services, "control-plane").version
    assert make_snapshot(services, "x").version != empty_snapshot().version


def test_endpoint_identity_is_its_address() -> None:
    assert Endpoint("a", 1, weight=3) == Endpoint("a", 1)
    assert hash(Endpoint("a", 1, weight=3)) == hash(Endpoint("a", 1))
    assert Endpoint("a", 1) != Endpoint("a", 2)
    assert Endpoint("a", 1).address == "a:1"


# property: nothing but ConfigError ------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["250ms", "2s", "1m", "a:1", "[::1]:80", "item", "x:0", "10.0.0.1:8080", "0ms"])
)
_keys = st.sampled_from(
    [
        "services",
        "defaults",
        "version",
        "endpoints",
        "address",
        "labels",
        "weight",
        "timeout",
        "connect_timeout",
        "item",
        "Bad",
    ]
) | st.text(max_size=6)
_documents = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents)
def test_any_yaml_document_loads_or_is_a_config_error(doc: object) -> None:
    text = yaml.safe_dump(doc)
    try:
        snap = load_static(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("fuzz.yaml:") for p in exc.problems)
    else:
        for service in snap.services.values():
            assert math.isfinite(service.timeout) and service.timeout > 0
            assert math.isfinite(service.connect_timeout) and service.connect_timeout > 0
            for endpoint in service.endpoints:
                assert 1 <= endpoint.port <= 65535
                assert 1 <= endpoint.weight <= 1000


@settings(max_examples=500, deadline=None)
@given(
    services=st.dictionaries(
        st.sampled_from(["item", "cart", "Bad", "a-b", "x"]),
        st.lists(
            st.sampled_from(["a:1", "b:2", "nope", "c:0"])
            | st.fixed_dictionaries(
                {"address": st.sampled_from(["a:1", "b:99999"])},
                optional={
                    "weight": st.integers(-2, 1002),
                    "labels": st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
                },
            ),
            max_size=3,
        ),
        max_size=3,
    ),
    timeout=st.none() | st.sampled_from(["2s", "0s", "x", 5, -1]),
)
def test_structured_documents(services: dict[str, object], timeout: object) -> None:
    doc: dict[str, object] = {"services": services}
    if timeout is not None:
        doc["defaults"] = {"timeout": timeout}
    text = yaml.safe_dump(doc)
    try:
        load_static(text, "f.yaml")
    except ConfigError as exc:
        lines = text.count("\n")
        for problem in exc.problems:
            file, line, _ = problem.split(":", 2)
            assert file == "f.yaml"
            assert 1 <= int(line) <= lines


@pytest.mark.parametrize("name", ["item\n", "item\r\n", "Item", "-item", "item\x00"])
def test_a_service_name_is_a_dns_label_and_nothing_after_it(name: str) -> None:
    assert not is_service_name(name)


def test_a_static_service_with_an_mtls_mode_is_one_of_sidecars() -> None:
    snapshot = load_static(
        "services:\n"
        "  item: {endpoints: [127.0.0.1:15106], mtls: {mode: strict}}\n"
        "  cart: {endpoints: [127.0.0.1:15107], mtls: {mode: off}}\n"
        "  billing: [10.0.0.7:8443]\n",
        "mesh.yaml",
    )
    assert snapshot.mtls_modes == {"item": "strict", "cart": "off"}
    assert [e.mtls for name in ("item", "cart", "billing") for e in snapshot.services[name].endpoints] == [
        True,
        False,
        False,
    ]
    with pytest.raises(ConfigError) as refused:
        load_static("services:\n  item: {endpoints: [a:1], mtls: {mode: on, x: 1}}\n", "mesh.yaml")
    assert refused.value.problems == [
        "mesh.yaml:2: services.item.mtls.x: unknown key (allowed: mode)",
        "mesh.yaml:2: services.item.mtls.mode: True is not one of off, permissive, strict",
    ]


def test_a_static_service_declares_its_protocol_on_it_and_its_endpoints() -> None:
    snapshot = load_static(
        "services:\n  redis: {endpoints: [127.0.0.1:6379], protocol: tcp}\n  item: [127.0.0.1:8080]\n",
        "mesh.yaml",
    )
    assert snapshot.protocols == {"redis": "tcp"}
    assert snapshot.services["redis"].protocol == "tcp"
    assert [e.protocol for e in snapshot.services["redis"].endpoints] == ["tcp"]
    assert snapshot.services["item"].protocol == "" and snapshot.services["item"].endpoints[0].protocol == ""
    assert snapshot.to_json()["services"]["redis"]["protocol"] == "tcp"
    with pytest.raises(ConfigError) as refused:
        load_static("services:\n  redis: {endpoints: [a:1], protocol: mysql}\n", "mesh.yaml")
    assert refused.value.problems == [
        "mesh.yaml:2: services.redis.protocol: 'mysql' is not a protocol (one of http1, http2, grpc, tcp)"
    ]


@pytest.mark.parametrize(
    "declared, reported, protocol",
    [
        ("", ("tcp", "tcp"), "tcp"),  # every instance registered it
        ("", ("tcp", ""), ""),  # they disagree: undeclared
        ("", ("", ""), ""),
        ("http2", ("tcp", "grpc"), "http2"),  # a declaration wins, on every endpoint too
    ],
)
def test_a_services_protocol_is_declared_else_what_all_its_endpoints_report(
    declared: str, reported: tuple[str, str], protocol: str
) -> None:
    endpoints = tuple(Endpoint("10.0.0.1", 1 + i, protocol=p) for i, p in enumerate(reported))
    snapshot = make_snapshot(
        {"db": ServiceConfig("db", endpoints)}, "test", protocols={"db": declared} if declared else {}
    )
    assert snapshot.services["db"].protocol == protocol
    if declared:
        assert {e.protocol for e in snapshot.services["db"].endpoints} == {declared}
