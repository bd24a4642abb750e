"""meshlet.endpoints: the rules of a service's endpoints, and the proof that both of their
users keep them: the sidecar's static file (``load_static``, no pydantic) and the ``Service``
policy (the pydantic schema) accept and refuse the same documents, with the same
``file:line: path: what``."""

from __future__ import annotations

import textwrap

import pytest

from meshlet.addresses import parse_address
from meshlet.endpoints import check_labels, check_weight, endpoint_mapping
from meshlet.policy import PolicyError, load_documents
from meshlet.schema import Service
from sidecar.core.config import ConfigError, load_static


@pytest.mark.parametrize(("value", "weight"), [(1, 1), (1000, 1000), (7, 7), (None, 1)])
def test_weights(value: object, weight: int) -> None:
    assert check_weight(value) == weight


@pytest.mark.parametrize("value", [0, -1, 1001, 1.0, 1.5, "2", True, False, [1]])
def test_not_weights(value: object) -> None:
    with pytest.raises(ValueError, match=r"is not a weight \(an integer from 1 to 1000\)$"):
        check_weight(value)


def test_labels() -> None:
    assert check_labels({"zone": "a", "version": ""}) == {"zone": "a", "version": ""}
    assert check_labels(None) == {}
    assert check_labels({"k" * 63: "v" * 63}) == {"k" * 63: "v" * 63}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["zone"], "must be a mapping of label to value"),
        ({"zone": 1}, "zone: 1 is not a label value (a string of at most 63)"),
        ({"zone": None}, "zone: None is not a label value (a string of at most 63)"),
        ({"zone": "v" * 64}, "is not a label value (a string of at most 63)"),
        ({"": "a"}, "'' is not a label name (a string of 1 to 63 characters)"),
        ({"k" * 64: "a"}, "is not a label name (a string of 1 to 63 characters)"),
        ({3: "a"}, "3 is not a label name (a string of 1 to 63 characters)"),
    ],
)
def test_not_labels(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_labels(value)
    assert str(info.value).endswith(message)


def test_an_endpoint_is_an_address_or_a_mapping_with_one() -> None:
    assert endpoint_mapping("a:1") == {"address": "a:1"}
    assert endpoint_mapping({"address": "a:1", "weight": 2}) == {"address": "a:1", "weight": 2}
    for value in (42, None, ["a:1"], {"weight": 2}):
        with pytest.raises(ValueError, match="^an endpoint is HOST:PORT or a mapping with 'address'$"):
            endpoint_mapping(value)


# One table, two loaders ---------------------------------------------------------------------
#
# Each body is a service's mapping: after ``services:\n  api:\n`` in a static file, after
# ``kind: Service\nname: api\n`` in a policy. Both put the body on the same lines (from 3),
# so a problem has the same line in both; its path is under ``services.api.`` in the first.

VISIBLE = "(a host is visible ASCII: no whitespace, control character or '/')"
WEIGHT = "is not a weight (an integer from 1 to 1000)"
NOT_AN_ENDPOINT = "an endpoint is HOST:PORT or a mapping with 'address'"

SHAPES = [
    pytest.param("endpoints: [a:1, 'b:2']\n", [], id="short-forms"),
    pytest.param(
        "endpoints:\n  - address: '[::1]:80'\n    labels: {zone: a, version: v2}\n    weight: 1000\n",
        [],
        id="long-form",
    ),
    pytest.param("endpoints: []\ntimeout: 2s\nconnect_timeout: 250ms\n", [], id="timeouts"),
    pytest.param("timeout: 2\nconnect_timeout: 0.5\n", [], id="bare-seconds"),
    pytest.param("timeout: '2'\n", [], id="bare-seconds-in-a-string"),
    pytest.param("timeout: 1h\n", [], id="hours"),
    pytest.param("endpoints:\ntimeout:\n", [], id="written-with-nothing-after-it"),
    pytest.param("endpoints:\n  - address: a:1\n    labels:\n    weight:\n", [], id="endpoint-fields-empty"),
    pytest.param(
        "endpoints: [{address: a:1, labels: {'': x}}]\n",
        [(3, "endpoints[0].labels", "'' is not a label name (a string of 1 to 63 characters)")],
        id="label-name-empty",
    ),
    pytest.param(
        "endpoints: [{address: a:1, labels: {zone: 1}}]\n",
        [(3, "endpoints[0].labels", "zone: 1 is not a label value (a string of at most 63)")],
        id="label-value-number",
    ),
    pytest.param(
        "endpoints: [{address: a:1, labels: [zone]}]\n",
        [(3, "endpoints[0].labels", "must be a mapping of label to value")],
        id="labels-a-list",
    ),
    pytest.param(
        "timeout: soon\n", [(3, "timeout", "'soon' is not a duration (allowed: 250ms, 2s, 1m, 1h)")], id="bad-duration"
    ),
    pytest.param("timeout: 0\n", [(3, "timeout", "0 must be greater than 0")], id="zero-duration"),
    pytest.param(
        "connect_timeout: -1s\n",
        [(3, "connect_timeout", "'-1s' is not a duration (allowed: 250ms, 2s, 1m, 1h)")],
        id="negative-duration",
    ),
    pytest.param(
        "timeout: yes\n", [(3, "timeout", "True is not a duration (allowed: 250ms, 2s, 1m, 1h)")], id="bool-duration"
    ),
    pytest.param(
        "timeout: .inf\n",
        [(3, "timeout", "inf is not a duration (allowed: 250ms, 2s, 1m, 1h)")],
        id="infinite-duration",
    ),
    pytest.param(
        "timeout: " + "9" * 400 + "\n",
        [(3, "timeout", "9" * 37 + "... is not a duration (allowed: 250ms, 2s, 1m, 1h)")],
        id="int-past-float",
    ),
    pytest.param(
        "endpoints: a:1\n",
        [(3, "endpoints", "must be a list of HOST:PORT or {address, labels, weight}")],
        id="endpoints-not-a-list",
    ),
    pytest.param("endpoints: [42]\n", [(3, "endpoints[0]", NOT_AN_ENDPOINT)], id="endpoint-a-number"),
    pytest.param(
        "endpoints:\n  - a:1\n  - weight: 2\n", [(5, "endpoints[1]", NOT_AN_ENDPOINT)], id="endpoint-without-address"
    ),
    pytest.param(
        "endpoints:\n  - address: a:1\n    zone: b\n",
        [(5, "endpoints[0].zone", "unknown key (allowed: address, labels, weight)")],
        id="endpoint-unknown-key",
    ),
    pytest.param("endpoints: [a]\n", [(3, "endpoints[0].address", "'a' is not HOST:PORT")], id="no-port"),
    pytest.param("endpoints: [':80']\n", [(3, "endpoints[0].address", "':80' is not HOST:PORT")], id="no-host"),
    pytest.param(
        "endpoints: ['::1:80']\n",
        [(3, "endpoints[0].address", "'::1:80' is not HOST:PORT (an IPv6 host goes in brackets, as [::1]:8080)")],
        id="ipv6-without-brackets",
    ),
    pytest.param(
        "endpoints: ['a/b:80']\n",
        [(3, "endpoints[0].address", f"'a/b:80' is not HOST:PORT {VISIBLE}")],
        id="slash-in-host",
    ),
    pytest.param(
        'endpoints: ["a\\r\\nb:80"]\n',
        [(3, "endpoints[0].address", f"'a\\r\\nb:80' is not HOST:PORT {VISIBLE}")],
        id="crlf-in-host",
    ),
    pytest.param(
        "endpoints: ['a:٣']\n",
        [(3, "endpoints[0].address", "'a:٣' has no valid port (1-65535)")],
        id="arabic-digit-port",
    ),
    pytest.param(
        "endpoints: [a:0, b:65536]\n",
        [
            (3, "endpoints[0].address", "'a:0' has no valid port (1-65535)"),
            (3, "endpoints[1].address", "'b:65536' has no valid port (1-65535)"),
        ],
        id="ports-out-of-range",
    ),
    pytest.param(
        "endpoints: [{address: 8080}]\n", [(3, "endpoints[0].address", "8080 is not HOST:PORT")], id="address-a-number"
    ),
    pytest.param(
        "endpoints: [{address: a:1, weight: 0}]\n", [(3, "endpoints[0].weight", f"0 {WEIGHT}")], id="weight-zero"
    ),
    pytest.param(
        "endpoints: [{address: a:1, weight: 1001}]\n",
        [(3, "endpoints[0].weight", f"1001 {WEIGHT}")],
        id="weight-too-big",
    ),
    pytest.param(
        "endpoints: [{address: a:1, weight: '5'}]\n",
        [(3, "endpoints[0].weight", f"'5' {WEIGHT}")],
        id="weight-a-string",
    ),
    pytest.param(
        "endpoints: [{address: a:1, weight: 2.0}]\n", [(3, "endpoints[0].weight", f"2.0 {WEIGHT}")], id="weight-a-float"
    ),
    pytest.param(
        "endpoints: [{address: a:1, weight: true}]\n",
        [(3, "endpoints[0].weight", f"True {WEIGHT}")],
        id="weight-a-bool",
    ),
    pytest.param(
        "endpoints:\n  - address: a\n    weight: 0\ntimeout: x\n",
        [
            (4, "endpoints[0].address", "'a' is not HOST:PORT"),
            (5, "endpoints[0].weight", f"0 {WEIGHT}"),
            (6, "timeout", "'x' is not a duration (allowed: 250ms, 2s, 1m, 1h)"),
        ],
        id="every-problem-at-once",
    ),
    pytest.param(
        "retries: 3\n",
        [(3, "retries", "unknown key (allowed: endpoints, connect_timeout, timeout, mtls, protocol)")],
        id="unknown-key",
    ),
]


def _static(body: str) -> tuple[list[tuple[int, str, str]], object]:
    text = "services:\n  api:\n" + textwrap.indent(body, "    ")
    try:
        snapshot = load_static(text, "f.yaml")
    except ConfigError as exc:
        return [_split(p, "services.api.") for p in exc.problems], None
    service = snapshot.services["api"]
    endpoints = [(e.host, e.port, dict(e.labels), e.weight) for e in service.endpoints]
    return [], endpoints


def _policy(body: str) -> tuple[list[tuple[int, str, str]], object]:
    try:
        (doc,) = load_documents([("f.yaml", "kind: Service\nname: api\n" + body)])
    except PolicyError as exc:
        return [_split(p, "") for p in exc.problems], None
    assert isinstance(doc, Service)
    endpoints = [(*parse_address(e.address), dict(e.labels), e.weight) for e in doc.endpoints]
    return [], endpoints


def _split(problem: str, prefix: str) -> tuple[int, str, str]:
    file, line, path, what = problem.split(": ", 1)[0].split(":") + problem.split(": ", 2)[1:]
    assert file == "f.yaml" and path.startswith(prefix), problem
    # A Service document also has kind and name; the static file's service has neither.
    what = what.replace("(allowed: kind, name, endpoints,", "(allowed: endpoints,")
    return int(line), path[len(prefix) :], what


@pytest.mark.parametrize(("body", "expected"), SHAPES)
def test_the_static_file_and_a_service_policy_agree(body: str, expected: list[tuple[int, str, str]]) -> None:
    static_problems, static_endpoints = _static(body)
    policy_problems, policy_endpoints = _policy(body)
    assert sorted(static_problems) == sorted(expected)
    assert sorted(policy_problems) == sorted(expected)
    assert static_endpoints == policy_endpoints  # what both made of an accepted one, too
