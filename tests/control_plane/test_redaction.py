"""control_plane/redaction.py: what a reader without the write token sees of the policy.
One table: a document in, what is redacted and what is kept."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.redaction import (
    REDACTED,
    credential_like,
    redact_collector,
    redact_document,
    redact_match,
    redact_policy_text,
)
from meshlet.policy import load_documents

R = REDACTED


def route(**rule: Any) -> dict[str, Any]:
    return {"kind": "Route", "name": "r", "host": "item", "rules": [{"name": "a", "destinations": [], **rule}]}


CASES = [
    pytest.param(
        route(headers={"request": {"add": {"authorization": "Bearer s3cret"}, "remove": ["cookie"]}}),
        route(headers={"request": {"add": {"authorization": R}, "remove": ["cookie"]}}),
        id="request header added: value redacted, name and removals kept",
    ),
    pytest.param(
        route(headers={"response": {"add": {"x-plain": "v1"}}}),
        route(headers={"response": {"add": {"x-plain": R}}}),
        id="every written header value, not only credential-like names",
    ),
    pytest.param(
        route(direct_response={"status": 200, "headers": {"set-cookie": "sid=1"}, "body": "hello"}),
        route(direct_response={"status": 200, "headers": {"set-cookie": R}, "body": "hello"}),
        id="direct response: header values redacted, body kept",
    ),
    pytest.param(
        route(match={"headers": {"x-api-key": {"exact": "k1"}, "x-canary": {"exact": "true"}}}),
        route(match={"headers": {"x-api-key": {"exact": R}, "x-canary": {"exact": "true"}}}),
        id="match on a credential-like header: its value only",
    ),
    pytest.param(
        route(match={"headers": {"authorization": {"present": True}}, "query": {"token": {"prefix": "t"}}}),
        route(match={"headers": {"authorization": {"present": True}}, "query": {"token": {"prefix": R}}}),
        id="present is kept; a credential-like query parameter is redacted",
    ),
    pytest.param(
        {**route(), "tests": [{"request": {"headers": {"Authorization": "Bearer t", "x-v": "2"}}, "expect": {}}]},
        {**route(), "tests": [{"request": {"headers": {"Authorization": R, "x-v": "2"}}, "expect": {}}]},
        id="a route's tests: credential-like headers",
    ),
    pytest.param(
        {
            "kind": "DestinationPolicy",
            "name": "d",
            "service": "item",
            "fallback": {"status": 503, "headers": {"x": "y"}},
        },
        {"kind": "DestinationPolicy", "name": "d", "service": "item", "fallback": {"status": 503, "headers": {"x": R}}},
        id="fallback headers",
    ),
    pytest.param(
        {"kind": "MeshConfig", "name": "mesh", "tracing": {"collector": "https://u:p@zipkin:9411/api/v2/spans?key=k"}},
        {"kind": "MeshConfig", "name": "mesh", "tracing": {"collector": f"https://{R}@zipkin:9411/api/v2/spans?{R}"}},
        id="collector: userinfo and query",
    ),
    pytest.param(
        {"kind": "MeshConfig", "name": "mesh", "tracing": {"collector": "http://zipkin:9411/api/v2/spans"}},
        {"kind": "MeshConfig", "name": "mesh", "tracing": {"collector": "http://zipkin:9411/api/v2/spans"}},
        id="collector without a credential: unchanged",
    ),
    pytest.param(
        {"kind": "AccessPolicy", "name": "a", "service": "item", "rules": [{"sources": ["user"]}]},
        {"kind": "AccessPolicy", "name": "a", "service": "item", "rules": [{"sources": ["user"]}]},
        id="an AccessPolicy holds no secret",
    ),
    pytest.param(
        route(headers="not a mapping", match=None), route(headers="not a mapping", match=None), id="odd shapes pass"
    ),
    pytest.param(["not", "a", "document"], ["not", "a", "document"], id="not a document"),
]


@pytest.mark.parametrize(("document", "shown"), CASES)
def test_redact_document(document: Any, shown: Any) -> None:
    before = repr(document)
    assert redact_document(document) == shown
    assert repr(document) == before  # the input is not changed: the sidecars get it whole


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        ("authorization", True),
        ("Proxy-Authorization", True),
        ("cookie", True),
        ("x-api-key", True),
        ("x-auth-token", True),
        ("client_secret", True),
        ("x-session-id", True),
        ("x-canary", False),
        ("x-version", False),
        ("accept", False),
    ],
)
def test_credential_like(name: str, credential: bool) -> None:
    assert credential_like(name) is credential


def test_redact_match_of_a_model_dump() -> None:
    assert redact_match({"path": {"prefix": "/a"}, "headers": {"cookie": {"regex": "sid=.*"}}}) == {
        "path": {"prefix": "/a"},
        "headers": {"cookie": {"regex": R}},
    }


@pytest.mark.parametrize("url", ["http://a b@c", "http://[::1"])
def test_redact_collector_never_shows_what_it_cannot_read(url: str) -> None:
    assert "a b" not in str(redact_collector(url))


POLICY = """\
# the token below is for the upstream only
kind: Route
name: item
host: item
rules:
  - name: all
    headers:
      request:
        add: {authorization: "Bearer s3cret-abc"}
    destinations: [{service: item}]
---
kind: MeshConfig
name: mesh
tracing: {collector: "http://user:s3cret-pw@zipkin:9411/api/v2/spans"}
"""


def test_redact_policy_text_keeps_a_valid_policy_without_the_secrets() -> None:
    text = redact_policy_text(POLICY)
    assert "s3cret" not in text and "the token below" not in text
    documents = load_documents([("p.yaml", text)])  # still a policy, the same shape
    assert [d.kind for d in documents] == ["Route", "MeshConfig"]
    assert text.count(R) == 2


def test_redact_policy_text_withholds_what_it_cannot_read() -> None:
    text = redact_policy_text("kind: Route\n  bad: [s3cret")
    assert "s3cret" not in text and R in text
