"""What a sidecar builds from the pushes (sidecar/core/discovered.py): endpoints whole or
as deltas, rejections, removals, the answers to lookups, the snapshot served and the
persisted form."""

from __future__ import annotations

import pytest

from meshlet import wire
from sidecar.core import errors
from sidecar.core.discovered import DiscoveredState, PushedConfig
from sidecar.core.services import Endpoint, ServiceConfig


def _push(*resources: wire.Resource, removed: tuple[str, ...] = (), type: str = wire.ENDPOINTS) -> wire.Push:
    return wire.Push(type, "t", "1", resources, removed)


def _full(name: str, body: object) -> wire.Resource:
    return wire.Resource(name, wire.content_version(body), body)


ITEM = [wire.endpoint("item-1", "127.0.0.1:9001"), wire.endpoint("item-2", "127.0.0.1:9002")]


def test_full_then_delta_then_removal() -> None:
    state = DiscoveredState()
    assert state.apply(_push(_full("item", ITEM))) == {}
    after = [ITEM[1], wire.endpoint("item-3", "127.0.0.1:9003")]
    delta = wire.Resource(
        "item", wire.content_version(after), None, wire.content_version(ITEM), (after[1],), ("item-1",)
    )
    assert state.apply(_push(delta)) == {}
    assert [e.address for e in state.services()["item"].endpoints] == ["127.0.0.1:9002", "127.0.0.1:9003"]
    state.apply(_push(removed=("item",)))
    assert state.services() == {}


@pytest.mark.parametrize(
    ("resource", "why"),
    [
        (wire.Resource("other", "x", [{"id": "o-1", "address": "nowhere"}]), "nowhere"),
        (wire.Resource("other", "x", [{"id": "o-1", "address": "127.0.0.1:1", "weight": 0}]), "weight"),
        (wire.Resource("other", "x", [{"id": "o-1", "address": "127.0.0.1:1", "weight": True}]), "weight"),
        (wire.Resource("other", "x", [{"id": "o-1", "address": "127.0.0.1:1", "weight": "2"}]), "'2' is not a weight"),
        (
            wire.Resource("other", "x", [{"id": "o-1", "address": "127.0.0.1:1", "weight": 1001}]),
            "1001 is not a weight",
        ),
        (wire.Resource("other", "x", [{"id": "o-1", "address": "10.0.0.4:1", "app_port": 70000}]), "app_port"),
        (wire.Resource("other", "x", [{"address": "127.0.0.1:1"}]), "needs an id"),
        (wire.Resource("other", "x", {"id": "o-1"}), "must be a list"),
        (wire.Resource("other", "x", None, "not-my-version", (), ("o-1",)), "not-my-version"),
    ],
)
def test_a_malformed_resource_is_refused_with_why(resource: wire.Resource, why: str) -> None:
    state = DiscoveredState()
    refused = state.apply(_push(resource))
    assert list(refused) == ["other"] and why in refused["other"]
    assert state.rejected == refused and state.services() == {}


def test_bad_resources_are_rejected_and_the_rest_applied() -> None:
    state = DiscoveredState()
    state.apply(_push(_full("item", ITEM)))
    bad_address = wire.Resource("other", "x", [{"id": "o-1", "address": "nowhere"}])
    bad_weight = wire.Resource("third", "y", [{"id": "t-1", "address": "127.0.0.1:1", "weight": 0}])
    wrong_base = wire.Resource("item", "z", None, "not-my-version", (), ("item-1",))
    fine = _full("fine", [wire.endpoint("f-1", "127.0.0.1:7000")])
    refused = state.apply(_push(bad_address, bad_weight, wrong_base, fine))
    assert list(refused) == ["other", "third", "item"]
    assert "nowhere" in refused["other"] and "weight" in refused["third"] and "not-my-version" in refused["item"]
    services = state.services()
    assert set(services) == {"item", "fine"}  # item kept at its previous version
    assert len(services["item"].endpoints) == 2
    assert state.apply(_push(_full("item", ITEM))) == {} and "item" not in state.rejected  # a good one clears it


def test_app_ports_arrive_with_their_endpoints_and_bad_ones_are_rejected() -> None:
    state = DiscoveredState()
    body = [wire.endpoint("item-1", "10.0.0.2:15006", app_port=8080), wire.endpoint("item-2", "10.0.0.3:15006")]
    assert "app_port" not in body[1]  # not told: not sent
    bad = wire.Resource("other", "x", [{"id": "o-1", "address": "10.0.0.4:15006", "app_port": 70000}])
    refused = state.apply(_push(_full("item", body), bad))
    assert list(refused) == ["other"] and "app_port" in refused["other"]
    endpoints = state.services()["item"].endpoints
    assert [(e.address, e.app_port) for e in endpoints] == [("10.0.0.2:15006", 8080), ("10.0.0.3:15006", 0)]


def test_protocols_arrive_with_their_endpoints_and_unknown_ones_are_refused() -> None:
    state = DiscoveredState()
    body = [wire.endpoint("db-1", "10.0.0.2:15006", protocol="tcp"), wire.endpoint("db-2", "10.0.0.3:15006")]
    assert "protocol" not in body[1]  # not declared: not sent
    bad = wire.Resource("other", "x", [{"id": "o-1", "address": "10.0.0.4:15006", "protocol": "quic"}])
    refused = state.apply(_push(_full("db", body), bad))
    assert refused == {"other": "endpoint o-1: protocol 'quic' is not a protocol (one of http1, http2, grpc, tcp)"}
    assert [e.protocol for e in state.services()["db"].endpoints] == ["tcp", ""]


def test_a_service_documents_protocol_wins_over_what_instances_report() -> None:
    config = PushedConfig()
    body = [wire.endpoint("db-1", "10.0.0.2:15006", protocol="http1")]
    config.apply(_push(_full("db", body), _full("cache", [wire.endpoint("c-1", "10.0.0.5:15006", protocol="tcp")])))
    document = {"kind": "Service", "name": "db", "protocol": "tcp"}
    assert config.apply(_push(_full("Service/db", document), type=wire.POLICIES)) == {}
    snapshot = config.snapshot({}, "test")
    assert snapshot.services["db"].protocol == "tcp" and snapshot.services["db"].endpoints[0].protocol == "tcp"
    assert snapshot.services["cache"].protocol == "tcp"  # reported by its instances, nothing declared
    assert snapshot.protocols == {"db": "tcp"}


def _looked_up() -> DiscoveredState:
    """A state with an answer of each kind: item found, gone missing, bad rejected."""
    state = DiscoveredState()
    state.watched |= {"item", "gone", "bad", "asked"}
    state.apply(_push(_full("item", ITEM), wire.Resource("gone", "v", None)))
    state.apply(_push(wire.Resource("bad", "x", [{"id": "b-1", "address": "nowhere"}])))
    return state


@pytest.mark.parametrize(
    ("service", "answered", "refusal"),
    [
        ("item", True, None),
        ("gone", True, "no service named 'gone' in the mesh"),
        ("bad", True, "service 'bad': its configuration was rejected: "),
        ("asked", False, None),  # watched, no answer yet
        ("never", False, None),
        ("Not_A_Name", False, "no service named 'Not_A_Name' in the mesh"),
    ],
)
def test_what_a_lookup_already_knows(service: str, answered: bool, refusal: str | None) -> None:
    state = _looked_up()
    assert state.has_answered(service) is answered
    error = state.refusal(service)
    if refusal is None:
        assert error is None
    else:
        assert error is not None and error.reason is errors.NO_ROUTE and error.detail.startswith(refusal)


def test_a_removed_watched_service_is_missing_and_comes_back_when_pushed() -> None:
    state = _looked_up()
    state.apply(_push(removed=("item",)))
    assert "item" in state.missing and state.refusal("item") is not None
    state.apply(_push(_full("item", ITEM)))
    assert "item" not in state.missing and state.refusal("item") is None


def test_a_sidecar_watches_at_most_max_watched_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_WATCHED", 2)
    state = DiscoveredState()
    state.watched |= {"a", "b"}
    assert state.can_watch("a") and not state.can_watch("c")


def test_persisted_form_round_trips() -> None:
    state = DiscoveredState()
    state.apply(_push(_full("item", ITEM)))
    state.watched.add("cart")
    again = DiscoveredState.from_json(state.to_json())
    assert again.versions() == state.versions()
    assert again.services() == state.services()
    assert again.watched == {"item", "cart"}  # what the app called is watched again


ROUTE = {
    "kind": "Route",
    "name": "item",
    "host": "item",
    "rules": [{"name": "all", "destinations": [{"service": "item"}]}],
}
SERVICE = {"kind": "Service", "name": "item", "endpoints": [{"address": "10.0.0.7:80"}]}


def test_the_snapshot_layers_pushed_services_over_documents_over_static_ones() -> None:
    config = PushedConfig()
    static = {name: ServiceConfig(name, (Endpoint("static", 1),)) for name in ("item", "cart")}
    billing = {**SERVICE, "name": "billing"}
    config.apply(_push(_full("Service/item", SERVICE), _full("Service/billing", billing), type=wire.POLICIES))
    config.apply(_push(_full("item", ITEM)))
    snapshot = config.snapshot(static, "control-plane")
    hosts = {name: [e.host for e in service.endpoints] for name, service in snapshot.services.items()}
    assert hosts == {"cart": ["static"], "billing": ["10.0.0.7"], "item": ["127.0.0.1", "127.0.0.1"]}
    assert snapshot.source == "control-plane"


def test_the_snapshot_carries_the_compiled_policies_and_their_version() -> None:
    config = PushedConfig()
    shadow = {**ROUTE, "name": "pay", "host": "pay", "mode": "shadow"}
    config.apply(_push(_full("Route/item", ROUTE), _full("Route/pay", shadow), type=wire.POLICIES))
    snapshot = config.snapshot({}, "control-plane")
    assert list(snapshot.routes) == ["item"] and list(snapshot.shadow_routes) == ["pay"]
    assert snapshot.policy_version == config.policies.version() != ""
    assert snapshot.tracing is None and snapshot.metrics is None and snapshot.outbound_traffic_policy == "ALLOW_ANY"
    unchanged = PushedConfig()
    assert unchanged.snapshot({}, "x").version != snapshot.version  # the policies count in the version


def test_a_push_of_an_unknown_type_applies_nothing() -> None:
    config = PushedConfig()
    assert config.apply(_push(_full("x", {}), type="secrets")) is None
    assert config.versions() == {wire.ENDPOINTS: {}, wire.POLICIES: {}}


def test_the_pushed_config_round_trips_through_its_persisted_form() -> None:
    config = PushedConfig()
    config.apply(_push(_full("item", ITEM)))
    config.apply(_push(_full("Route/item", ROUTE), type=wire.POLICIES))
    again = PushedConfig.from_json(config.to_json())
    assert again.versions() == config.versions()
    assert again.snapshot({}, "persisted").version == config.snapshot({}, "control-plane").version
