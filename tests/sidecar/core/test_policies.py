"""A sidecar's policy cache: validated again on arrival (a bad one is rejected, the
rest applied), Service documents as services, enforcing routes by host, persistence."""

from __future__ import annotations

from meshlet import wire
from sidecar.core.policies import PolicyCache

ROUTE = {
    "kind": "Route",
    "name": "item",
    "host": "item",
    "rules": [{"name": "all", "destinations": [{"service": "item"}]}],
}
SHADOW = {**ROUTE, "name": "pay", "host": "pay", "mode": "shadow"}
BILLING = {
    "kind": "Service",
    "name": "billing",
    "endpoints": [{"address": "10.0.0.7:8443", "labels": {"zone": "b"}}],
    "timeout": 5,
}


def _push(*resources: tuple[str, object], removed: tuple[str, ...] = ()) -> wire.Push:
    return wire.Push(
        "policies",
        "v",
        "1",
        tuple(wire.Resource(name, wire.content_version(body), body) for name, body in resources),
        removed,
    )


def test_valid_documents_are_applied_and_a_bad_one_is_rejected_with_why() -> None:
    cache = PolicyCache()
    refused = cache.apply(
        _push(
            ("Route/item", ROUTE),
            ("Service/billing", BILLING),
            ("Route/bad", {**ROUTE, "name": "bad", "rules": []}),
            ("Route/other", ROUTE),  # the body is Route/item: not what it claims to be
        )
    )
    assert list(refused) == ["Route/bad", "Route/other"]
    assert "rules: the list should have at least 1 item" in refused["Route/bad"]
    assert "not Route/other" in refused["Route/other"]
    assert set(cache.held) == {"Route/item", "Service/billing"}
    billing = cache.services()["billing"]
    assert billing.timeout == 5.0 and billing.endpoints[0].labels == {"zone": "b"}
    assert list(cache.routes()) == ["item"]


def test_a_shadow_route_is_held_but_not_enforced_and_removals_apply() -> None:
    cache = PolicyCache()
    cache.apply(_push(("Route/item", ROUTE), ("Route/pay", SHADOW)))
    assert set(cache.held) == {"Route/item", "Route/pay"} and list(cache.routes()) == ["item"]
    cache.apply(_push(removed=("Route/item",)))
    assert cache.routes() == {} and cache.version() == wire.type_version({"Route/pay": cache.versions()["Route/pay"]})


def test_access_policies_by_service_enforced_or_shadowed_one_per_service() -> None:
    access = {"kind": "AccessPolicy", "name": "a", "service": "item", "rules": [{"sources": ["user"]}]}
    cache = PolicyCache()
    cache.apply(
        _push(
            ("AccessPolicy/a", access),
            ("AccessPolicy/b", {**access, "name": "b"}),  # a second one for item: the control plane refuses it
            ("AccessPolicy/c", {**access, "name": "c", "service": "pay", "mode": "shadow"}),
        )
    )
    enforced, shadow = cache.access(), cache.access("shadow")
    assert list(enforced) == ["item"] and enforced["item"].name == "a"  # the first by name, deterministic
    assert (
        enforced["item"].check("user", b"GET", b"/").allowed and not enforced["item"].check("x", b"GET", b"/").allowed
    )
    assert list(shadow) == ["pay"] and shadow["pay"].mode == "shadow"


def test_persisted_policies_come_back_and_unreadable_ones_are_dropped() -> None:
    cache = PolicyCache()
    cache.apply(_push(("Route/item", ROUTE), ("Service/billing", BILLING)))
    raw = cache.to_json()
    raw["Route/broken"] = {"ver": "x", "body": {"kind": "Route"}}
    again = PolicyCache.from_json(raw)
    assert set(again.held) == {"Route/item", "Service/billing"}
    assert again.versions() == cache.versions()


def test_a_policy_that_would_put_a_control_character_on_the_wire_is_rejected_never_applied() -> None:
    cache = PolicyCache()
    assert cache.apply(_push(("Route/item", ROUTE))) == {}
    smuggling = {
        **ROUTE,
        "rules": [
            {
                "name": "all",
                "match": {"path": {"prefix": "/"}},
                "destinations": [{"service": "item"}],
                "headers": {"response": {"add": {"x-a": "1\r\nSet-Cookie: s=1"}}},
                "rewrite": {"prefix": "/ HTTP/1.1\r\nHost: item\r\n\r\nGET /admin"},
            }
        ],
    }
    refused = cache.apply(_push(("Route/item", smuggling)))
    assert list(refused) == ["Route/item"]
    assert "has a CR at position 1" in refused["Route/item"] and "has a space at position 1" in refused["Route/item"]
    (table,) = cache.routes().values()
    assert table.rules[0].response_set == ()  # the version held before still serves


def test_two_routes_for_one_host_the_first_by_name_is_enforced() -> None:
    cache = PolicyCache()
    cache.apply(_push(("Route/b", {**ROUTE, "name": "b"}), ("Route/a", {**ROUTE, "name": "a"})))
    assert {host: table.name for host, table in cache.routes().items()} == {"item": "a"}


def test_mtls_modes_from_mesh_config_and_service_documents() -> None:
    """MeshConfig sets the mesh's mode (permissive when absent: None here); a Service
    document overrides it for one service, and one with only a mode lists no endpoints, so
    it does not hide the service's sidecars from discovery."""
    cache = PolicyCache()
    assert cache.mtls_modes() == (None, {})
    cache.apply(
        _push(
            ("MeshConfig/mesh", {"kind": "MeshConfig", "name": "mesh", "mtls": {"mode": "strict"}}),
            ("Service/payments", {"kind": "Service", "name": "payments", "mtls": {"mode": False}}),  # YAML's `off`
            ("Service/billing", {**BILLING, "mtls": {"mode": "permissive"}}),
        )
    )
    assert cache.mtls_modes() == ("strict", {"payments": "off", "billing": "permissive"})
    assert set(cache.services()) == {"billing"}  # payments: only a mode
    assert not any(e.mtls for e in cache.services()["billing"].endpoints)  # a Service's endpoints are plain
