"""Access tables (meshlet/access.py): who may call a service, on which paths and methods."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet import paths
from meshlet.access import AccessTable, normalise_path
from meshlet.policy import load_documents
from meshlet.schema import AccessPolicy

POLICY = """\
kind: AccessPolicy
name: item-callers
service: item
rules:
  - sources: [user]
    paths: [/items, /public/]
    methods: [GET, HEAD]
  - sources: [gateway]
  - sources: ["*"]
    paths: [/health]
"""


def table(text: str = POLICY) -> AccessTable:
    (policy,) = load_documents([("a.yaml", text)])
    assert isinstance(policy, AccessPolicy)
    return AccessTable(policy)


@pytest.mark.parametrize(
    ("source", "method", "target", "allowed", "rule"),
    [
        ("user", b"GET", b"/items", True, "rules[0]"),
        ("user", b"GET", b"/items/42?full=1", True, "rules[0]"),
        ("user", b"HEAD", b"/items/", True, "rules[0]"),
        ("user", b"POST", b"/items/42", False, "default"),  # method not listed
        ("user", b"GET", b"/items-admin", False, "default"),  # a prefix is whole segments
        ("user", b"GET", b"/itemsX", False, "default"),
        ("user", b"GET", b"/public/x", True, "rules[0]"),  # a prefix ending in / as written
        ("user", b"GET", b"/public", False, "default"),
        ("user", b"GET", b"/items/../admin", False, "default"),  # what the app would serve: /admin
        ("user", b"GET", b"/items/%2e%2e/admin", False, "default"),  # the same, percent-encoded
        ("user", b"GET", b"//items//42", True, "rules[0]"),
        ("user", b"GET", b"http://item/items/42", True, "rules[0]"),  # absolute-form: its path
        # What apps resolve differently is under no prefix (the inbound sidecar refuses it first):
        ("user", b"GET", b"/items/..;/admin", False, "default"),
        ("user", b"GET", b"/items/..%5cadmin", False, "default"),
        ("user", b"GET", b"/items/..\\admin", False, "default"),
        ("user", b"GET", b"/items/%252e%252e/admin", False, "default"),
        ("gateway", b"GET", b"/items/..;/admin", True, "rules[1]"),  # a rule without paths: any path
        ("user", b"GET", b"/admin?x=/items", False, "default"),  # the query is not the path
        ("gateway", b"DELETE", b"/anything", True, "rules[1]"),  # no paths, no methods: all
        ("billing", b"GET", b"/items", False, "default"),
        ("billing", b"GET", b"/health", True, "rules[2]"),  # "*": any caller
        ("unknown", b"POST", b"/health/deep", True, "rules[2]"),  # one without a sidecar too
    ],
)
def test_the_first_rule_that_holds_decides_else_the_default(
    source: str, method: bytes, target: bytes, allowed: bool, rule: str
) -> None:
    verdict = table().check(source, method, target)
    assert (verdict.allowed, verdict.rule) == (allowed, rule)


def test_default_allow_lets_in_whoever_no_rule_names() -> None:
    allow = table("kind: AccessPolicy\nname: a\nservice: item\ndefault: allow\n")
    assert allow.check("anyone", b"GET", b"/").allowed
    deny = table("kind: AccessPolicy\nname: a\nservice: item\n")
    assert not deny.check("anyone", b"GET", b"/").allowed  # no rules, default deny: nobody
    assert (deny.name, deny.service, deny.mode) == ("a", "item", "enforce")


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../../b", "/b"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("//a///b", "/a/b"),
        ("/%2e%2E/x", "/x"),
        ("/caf%e9", "/caf%E9"),  # only unreserved characters are decoded (meshlet/paths.py)
        ("/a%2Fb", "/a%2Fb"),  # refused by the sidecar: shown as it is
    ],
)
def test_paths_are_compared_as_the_app_would_resolve_them(path: str, normal: str) -> None:
    assert normalise_path(path) == normal


@given(st.text(alphabet="/.%2eEfF0a", max_size=30))
def test_a_normal_path_is_rooted_has_no_dot_segments_and_is_stable(path: str) -> None:
    normal = normalise_path(path)
    try:
        paths.normalise_path(path.encode())
    except paths.BadPath:
        assert normal == path  # refused by the sidecar: shown as it is
        return
    assert normal.startswith("/")
    assert "/../" not in normal + "/" and "/./" not in normal + "/" and "//" not in normal
    assert normalise_path(normal) == normal


def test_unauthenticated_callers_are_let_in_only_by_name() -> None:
    """A plaintext caller is ``unauthenticated``: a rule lets it in by that name, or with "*"."""
    by_name = table(
        "kind: AccessPolicy\nname: p\nservice: item\nrules:\n  - sources: [unauthenticated]\n    paths: [/public]\n"
    )
    assert by_name.check("unauthenticated", b"GET", b"/public/x").allowed
    assert not by_name.check("unauthenticated", b"GET", b"/private").allowed
    assert not by_name.check("user", b"GET", b"/public/x").allowed
    assert not table().check("unauthenticated", b"GET", b"/items").allowed  # user's rule is user's
    assert table().check("unauthenticated", b"GET", b"/health").allowed  # "*"


@pytest.mark.parametrize(
    ("text", "source", "allowed", "rule"),
    [
        (POLICY, "gateway", True, "rules[1]"),  # a rule naming only sources
        (POLICY, "user", False, "default"),  # its only rule needs paths and methods: never a connection
        (POLICY, "billing", False, "default"),  # rules[2] ("*") names a path: no connection matches it
        (POLICY.replace("rules:", "default: allow\nrules:"), "billing", True, "default"),
        ("kind: AccessPolicy\nname: a\nservice: db\nrules:\n  - sources: ['*']\n", "anyone", True, "rules[0]"),
        (
            "kind: AccessPolicy\nname: a\nservice: db\nrules:\n  - sources: [x]\n    methods: [GET]\n",
            "x",
            False,
            "default",
        ),
    ],
)
def test_a_tcp_connection_is_allowed_only_by_a_rule_without_paths_or_methods(
    text: str, source: str, allowed: bool, rule: str
) -> None:
    verdict = table(text).check_connection(source)
    assert (verdict.allowed, verdict.rule) == (allowed, rule)
