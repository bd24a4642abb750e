"""`meshlet explain`'s answer, from documents and registry endpoints."""

from __future__ import annotations

import textwrap

from control_plane.explain import explain
from meshlet.policy import load_documents

POLICY = textwrap.dedent(
    """\
    kind: Route
    name: item
    host: item
    rules:
      - name: beta
        priority: 10
        match: {headers: {x-group: {exact: beta}}, path: {prefix: /api}}
        destinations: [{service: item, subset: {version: v2}}]
        rewrite: {prefix: /v2}
      - name: admin
        match: {path: {exact: /admin}}
        direct_response: {status: 403}
      - name: split
        destinations:
          - {service: item, subset: {version: v1}, weight: 90}
          - {service: item, subset: {version: v2}, weight: 10}
    ---
    kind: Service
    name: billing
    endpoints: [10.0.0.7:8443]
    ---
    kind: DestinationPolicy
    name: item-beta
    service: item
    rule: item/beta
    ---
    kind: DestinationPolicy
    name: item
    service: item
    ---
    kind: AccessPolicy
    name: item
    service: item
    rules: [{sources: [user], paths: [/v2]}]  # the path item sees: after the beta rule's rewrite
    """
)
ENDPOINTS = {
    "item": [
        {"id": "item-1", "address": "127.0.0.1:1", "labels": {"version": "v1"}},
        {"id": "item-2", "address": "127.0.0.1:2", "labels": {"version": "v2"}},
    ]
}


def test_a_matching_rule_its_destinations_endpoints_and_policies() -> None:
    docs = load_documents([("p.yaml", POLICY)])
    out = explain("http://item/api/x?y=1", docs, ENDPOINTS, headers=[("X-Group", "beta")], source="user")
    assert out["rule"]["name"] == "beta" and out["decision"]["rewritten_target"] == "/v2/x?y=1"
    (dest,) = out["destinations"]
    assert dest["endpoints"] == ["127.0.0.1:2"] and dest["endpoints_outside_subset"] == 1
    assert dest["destination_policy"]["name"] == "item-beta"  # the rule-specific one wins
    assert out["access"] == [
        {"service": "item", "allowed": True, "why": "AccessPolicy/item rules[0]", "mode": "enforce"}
    ]


def test_a_split_its_shares_and_an_access_denied() -> None:
    docs = load_documents([("p.yaml", POLICY)])
    out = explain("item/items", docs, ENDPOINTS, source="gateway")
    assert out["rule"]["name"] == "split"
    assert [(d["subset"], d["share"]) for d in out["decision"]["destinations"]] == [
        ({"version": "v1"}, 90.0),
        ({"version": "v2"}, 10.0),
    ]
    assert [d["destination_policy"]["name"] for d in out["destinations"]] == ["item", "item"]
    (access,) = out["access"]
    assert not access["allowed"] and "no rule lets gateway GET /items; default deny" in access["why"]


def test_direct_responses_no_match_and_no_route() -> None:
    docs = load_documents([("p.yaml", POLICY)])
    assert explain("http://item/admin", docs, ENDPOINTS)["decision"]["direct_response"]["status"] == 403
    billing = explain("http://billing/x", docs, ENDPOINTS)
    assert billing["route"] is None and billing["destinations"][0]["endpoints"] == ["10.0.0.7:8443"]
    assert billing["destinations"][0]["endpoints_from"] == "Service/billing"
    strict = load_documents(
        [
            (
                "s.yaml",
                "kind: Route\nname: r\nhost: item\nrules: [{name: a, match: {path: {exact: /a}}, destinations: [{service: item}]}]\n",
            )
        ]
    )
    assert explain("http://item/b", strict, ENDPOINTS)["decision"]["status"] == 404


PREFIXED = textwrap.dedent(
    """\
    kind: Route
    name: item
    host: item
    rules:
      - name: api
        match: {path: {prefix: /api}}
        destinations: [{service: item}]
      - name: rest
        direct_response: {status: 404}
    """
)


def test_explain_matches_the_path_a_sidecar_forwards():
    """The sidecar routes and checks the normalised path, so explain must too: a dot segment
    that leaves the prefix does not match it, and a path the sidecar refuses is a 400."""
    docs = load_documents([("r.yaml", PREFIXED)])
    assert explain("http://item/api/../admin", docs, ENDPOINTS)["rule"]["name"] == "rest"
    assert explain("http://item/x/../api/v1", docs, ENDPOINTS)["rule"]["name"] == "api"
    refused = explain("http://item/api/..;/admin", docs, ENDPOINTS)
    assert refused["decision"]["status"] == 400 and refused["destinations"] == []
