"""Route tables (meshlet/routes.py): which rule matches, in which order, and how a
weighted split divides traffic; the embedded route tests run on apply."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from meshlet.policy import PolicyError, load_documents
from meshlet.routes import RouteTable
from meshlet.schema import Route

ROUTE = textwrap.dedent(
    """\
    kind: Route
    name: item
    host: item
    rules:
      - name: default
        destinations: [{service: item}]
      - name: exact-admin
        priority: 50
        match: {path: {exact: /admin}}
        direct_response: {status: 403}
      - name: items-prefix
        priority: 10
        match: {path: {prefix: /items}}
        destinations: [{service: item, subset: {version: v1}}]
      - name: versioned
        priority: 20
        match: {path: {regex: "/items/[0-9]+"}}
        destinations: [{service: item, subset: {version: v2}}]
      - name: beta-header
        priority: 30
        match: {headers: {x-group: {exact: beta}}}
        destinations: [{service: item-beta}]
      - name: debug-query
        priority: 30
        match: {query: {debug: {present: true}}, methods: [GET]}
        destinations: [{service: item-debug}]
      - name: tenant-prefix
        priority: 40
        match: {headers: {x-tenant: {prefix: acme-}}, path: {prefix: /items}}
        destinations: [{service: item-acme}]
    """
)


def _table(text: str = ROUTE) -> RouteTable:
    (route,) = load_documents([("r.yaml", text)])
    assert isinstance(route, Route)
    return RouteTable(route)


@pytest.mark.parametrize(
    ("method", "target", "headers", "rule"),
    [
        ("GET", "/", [], "default"),  # no match block: every request
        ("GET", "/admin", [], "exact-admin"),
        ("GET", "/admin/x", [], "default"),  # exact is exact
        ("GET", "/items", [], "items-prefix"),
        ("GET", "/itemsx", [], "items-prefix"),  # a prefix is a string prefix (as Envoy's)
        ("GET", "/items/42", [], "versioned"),  # regex beats prefix by priority
        ("GET", "/items/42/reviews", [], "items-prefix"),  # a regex must match the whole path
        ("GET", "/items/42?x=1", [], "versioned"),  # the query is not part of the path
        ("GET", "/items/1", [(b"X-Group", b"beta")], "beta-header"),  # header names ignore case
        ("GET", "/items/1", [(b"x-group", b"beta2")], "versioned"),  # exact is exact
        ("GET", "/?debug", [], "debug-query"),  # present, even empty
        ("POST", "/?debug=1", [], "default"),  # methods must match too
        ("GET", "/items/1", [(b"x-tenant", b"acme-eu")], "tenant-prefix"),  # every condition holds
        ("GET", "/other", [(b"x-tenant", b"acme-eu")], "default"),  # ... or the rule does not match
    ],
)
def test_the_rule_that_matches(method: str, target: str, headers: list[tuple[bytes, bytes]], rule: str) -> None:
    matched = _table().match(method.encode(), target.encode(), headers)
    assert matched is not None and matched.name == rule


def test_equal_priorities_keep_the_order_written_and_no_match_is_none() -> None:
    table = _table(
        "kind: Route\nname: r\nhost: item\nrules:\n"
        "  - {name: first, match: {path: {prefix: /a}}, destinations: [{service: a}]}\n"
        "  - {name: second, match: {path: {prefix: /a}}, destinations: [{service: b}]}\n"
    )
    first = table.match(b"GET", b"/a", [])
    assert first is not None and first.name == "first"
    assert table.match(b"GET", b"/b", []) is None


def test_a_header_sent_twice_is_matched_on_its_joined_values() -> None:
    table = _table(
        "kind: Route\nname: r\nhost: item\nrules:\n"
        "  - {name: both, match: {headers: {x-a: {exact: '1,2'}}}, destinations: [{service: a}]}\n"
    )
    assert table.match(b"GET", b"/", [(b"x-a", b"1"), (b"X-A", b" 2")]) is not None


@pytest.mark.parametrize(("weights", "total"), [((90, 10), 10_000), ((1, 1, 1), 999), ((70, 20, 10), 1000)])
def test_a_split_gives_each_destination_exactly_its_share(weights: tuple[int, ...], total: int) -> None:
    destinations = ", ".join(f"{{service: s{i}, weight: {w}}}" for i, w in enumerate(weights))
    table = _table(f"kind: Route\nname: r\nhost: item\nrules:\n  - {{name: split, destinations: [{destinations}]}}\n")
    rule = table.match(b"GET", b"/", [])
    assert rule is not None
    counts = Counter(rule.pick().service for _ in range(total))
    assert [counts[f"s{i}"] for i in range(len(weights))] == [total * w // sum(weights) for w in weights]


def test_a_split_interleaves_rather_than_sending_runs() -> None:
    table = _table(
        "kind: Route\nname: r\nhost: item\nrules:\n  - {name: s, destinations: [{service: a, weight: 1}, {service: b, weight: 1}]}\n"
    )
    rule = table.match(b"GET", b"/", [])
    assert rule is not None
    assert [rule.pick().service for _ in range(6)] == ["a", "b", "a", "b", "a", "b"]


def test_failing_route_tests_reject_the_documents_with_their_lines() -> None:
    text = ROUTE + textwrap.dedent(
        """\
        tests:
          - request: {path: /items/7}
            expect: {rule: versioned, service: item}
          - request: {path: /items/7}
            expect: {rule: items-prefix}
          - request: {path: /admin}
            expect: {status: 404}
          - request: {path: /x}
            expect: {service: nope}
        """
    )
    with pytest.raises(PolicyError) as info:
        load_documents([("r.yaml", text)])
    assert info.value.problems == [
        "r.yaml:34: tests[1]: expected rule 'items-prefix', got rule 'versioned'",
        "r.yaml:36: tests[2]: expected status 404, rule 'exact-admin' gives 403",
        "r.yaml:38: tests[3]: expected service 'nope', but rule 'default' sends to item",
    ]


def test_route_tests_match_the_path_normalised_as_the_sidecar_does() -> None:
    text = ROUTE + textwrap.dedent(
        """\
        tests:
          - request: {path: /items/../admin}
            expect: {rule: exact-admin, status: 403}
          - request: {path: "/items/..;/admin"}
            expect: {rule: items-prefix}
        """
    )
    with pytest.raises(PolicyError) as info:
        load_documents([("r.yaml", text)])
    assert info.value.problems == [
        "r.yaml:34: tests[1]: the sidecar refuses this path (400 bad-request): it has path parameters on a dot "
        "segment ('..;')"
    ]
