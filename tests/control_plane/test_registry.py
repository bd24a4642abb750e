"""control_plane.registry: leases, readiness, the changed-services sets, versions and self-preservation.

Pure: every test passes explicit ``now`` values."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from control_plane.registry import (
    DEFAULT_SELF_PRESERVATION_MIN_INSTANCES,
    DEFAULT_SELF_PRESERVATION_THRESHOLD,
    DEFAULT_TTL,
    ExpiryResult,
    Instance,
    Registry,
    UnknownInstance,
    endpoints_version,
)

T = 1000.0  # an arbitrary start on the monotonic clock


def inst(instance_id: str = "item-1", service: str = "item", *, ready: bool = True, **kw: object) -> Instance:
    n = sum(map(ord, instance_id)) % 250 + 1
    fields: dict[str, object] = {
        "address": f"10.0.0.{n}:8080",
        "admin": f"10.0.0.{n}:15090",
        "labels": {"zone": "a", "version": "v1"},
        "node": f"node-{instance_id}",
    }
    fields.update(kw)
    return Instance(service, instance_id, ready=ready, **fields)  # type: ignore[arg-type]


def fleet(n: int, *, now: float = T, service: str = "item") -> Registry:
    reg = Registry()
    for i in range(n):
        reg.register(inst(f"{service}-{i:02d}", service), now)
    return reg


# defaults -------------------------------------------------------------------------------------


def test_defaults_follow_product() -> None:
    assert DEFAULT_TTL == 10.0
    assert DEFAULT_SELF_PRESERVATION_THRESHOLD == 0.15
    reg = Registry()
    assert reg.ttl == 10.0
    assert reg.self_preservation_threshold == 0.15
    assert reg.self_preservation_min_instances == DEFAULT_SELF_PRESERVATION_MIN_INSTANCES == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1.0}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"self_preservation_threshold": 1.0}, "self_preservation_threshold"),
        ({"self_preservation_threshold": -0.1}, "self_preservation_threshold"),
        ({"self_preservation_min_instances": 0}, "self_preservation_min_instances"),
        ({"self_preservation_min_instances": 2.5}, "self_preservation_min_instances"),
    ],
)
def test_bad_registry_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Registry(**kwargs)  # type: ignore[arg-type]


# instances ------------------------------------------------------------------------------------


def test_instance_freezes_its_labels() -> None:
    labels = {"zone": "a"}
    i = inst(labels=labels)
    labels["zone"] = "b"
    assert i.labels == {"zone": "a"}
    with pytest.raises(TypeError):
        i.labels["zone"] = "c"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        i.ready = False  # type: ignore[misc]
    assert hash(i) == hash(inst(labels={"zone": "a"}))  # hashable although labels is a mapping
    assert i != inst(labels={"zone": "b"})


def test_instance_defaults_are_fail_closed() -> None:
    i = Instance("item", "item-1", "10.0.0.1:8080", "10.0.0.1:15090")
    assert i.ready is False
    assert dict(i.labels) == {}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"service": ""}, "service is empty"),
        ({"service": "Item"}, "service 'Item' is not a DNS label"),
        ({"service": "-item"}, "is not a DNS label"),
        ({"service": "item-"}, "is not a DNS label"),
        ({"service": "it_em"}, "is not a DNS label"),
        ({"service": "a" * 64}, "is not a DNS label"),
        ({"service": "item\n"}, "is not a DNS label"),  # "$" let a trailing newline through
        ({"service": None}, "service must be a string"),
        ({"instance_id": ""}, "instance_id is empty"),
        ({"instance_id": "item/1"}, "instance_id 'item/1' contains '/'"),
        ({"instance_id": "item 1"}, "contains '/', whitespace"),
        ({"address": ""}, "address '' is not HOST:PORT"),
        ({"address": "10.0.0.1"}, "address '10.0.0.1' is not HOST:PORT"),
        ({"address": ":8080"}, "address ':8080' is not HOST:PORT"),
        ({"address": "10.0.0.1:0"}, "address '10.0.0.1:0' has no valid port (1-65535)"),
        ({"address": "10.0.0.1:65536"}, "has no valid port (1-65535)"),
        ({"address": "10.0.0.1:http"}, "has no valid port"),
        ({"address": "10.0.0.1:-1"}, "has no valid port"),
        ({"address": "10.0.0.1:８０"}, "has no valid port"),  # fullwidth digits: str.isdigit() says yes
        ({"address": "::1:8080"}, "an IPv6 host goes in brackets"),
        ({"address": "[]:8080"}, "has an empty host"),
        ({"address": "bad host:8080"}, "whitespace"),
        ({"address": "bücher.example:8080"}, "a host is visible ASCII"),  # meshlet/addresses.py, as everywhere
        ({"admin": "localhost"}, "admin 'localhost' is not HOST:PORT"),
        ({"labels": {"zone": 1}}, "label 'zone'"),
        ({"labels": {"": "a"}}, "label ''"),
        ({"labels": ["zone"]}, "labels must be a mapping"),
        ({"ready": 1}, "ready must be a bool"),
        ({"node": 7}, "node must be a string"),
        ({"app_port": 70000}, "app_port 70000"),
        ({"app_port": -1}, "app_port -1"),
        ({"app_port": "8080"}, "app_port '8080'"),
        ({"app_port": True}, "app_port True"),
        ({"protocol": "http3"}, "protocol 'http3' is not a protocol (one of http1, http2, grpc, tcp)"),
        ({"protocol": "TCP"}, "protocol 'TCP' is not a protocol"),
    ],
)
def test_invalid_instances_are_rejected(changes: dict[str, object], message: str) -> None:
    good = {
        "service": "item",
        "instance_id": "item-1",
        "address": "10.0.0.1:8080",
        "admin": "10.0.0.1:15090",
        "labels": {},
        "node": "n1",
        "ready": True,
    }
    with pytest.raises(ValueError) as info:
        Instance(**(good | changes))  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    "service, address",
    [
        ("a", "h:1"),
        ("a" * 63, "127.0.0.1:65535"),
        ("item-v2", "[::1]:8080"),
        ("0", "cart.default.svc:80"),
    ],
)
def test_valid_instances(service: str, address: str) -> None:
    assert Instance(service, "x", address, address).address == address


def test_register_takes_instances_only() -> None:
    with pytest.raises(TypeError):
        Registry().register({"service": "item"}, T)  # type: ignore[arg-type]


# register / renew / readiness / deregister and what changed -------------------------------------


def test_register_reports_the_service_when_ready() -> None:
    reg = Registry()
    assert reg.register(inst("item-1"), T) == {"item"}
    assert reg.register(inst("cart-1", "cart", ready=False), T) == set()  # not pushed: nothing changed
    assert reg.endpoints("item") == (inst("item-1"),)
    assert reg.endpoints("cart") == ()
    assert reg.all_endpoints("cart") == (inst("cart-1", "cart", ready=False),)
    assert reg.services() == ["cart", "item"]
    assert len(reg) == 2
    assert "item-1" in reg and "nope" not in reg
    assert reg.get("item-1") == inst("item-1")
    assert reg.get("nope") is None
    assert reg.lease_expires_at("item-1") == T + 10
    assert reg.is_connected("item-1")


@pytest.mark.parametrize(
    "first, second, changed",
    [
        (inst("i1"), inst("i1"), set()),  # a reconnect with the same content
        (inst("i1"), inst("i1", admin="10.9.9.9:1"), set()),  # admin is not pushed
        (inst("i1"), inst("i1", node="other"), set()),  # nor the node
        (inst("i1"), inst("i1", address="10.9.9.9:80"), {"item"}),
        (inst("i1"), inst("i1", labels={"zone": "b"}), {"item"}),
        (inst("i1"), inst("i1", app_port=8080), {"item"}),  # transparent-mode callers dial it
        (inst("i1"), inst("i1", ready=False), {"item"}),
        (inst("i1", ready=False), inst("i1", address="10.9.9.9:80", ready=False), set()),
        (inst("i1", ready=False), inst("i1"), {"item"}),
        (inst("i1"), inst("i1", "cart"), {"item", "cart"}),  # ids are unique across services: it moves
        (inst("i1", ready=False), inst("i1", "cart"), {"cart"}),
        (inst("i1"), inst("i1", "cart", ready=False), {"item"}),
        (inst("i1", ready=False), inst("i1", "cart", ready=False), set()),
    ],
)
def test_reregistration_replaces(first: Instance, second: Instance, changed: set[str]) -> None:
    reg = Registry()
    reg.register(first, T)
    assert reg.register(second, T + 3) == changed
    assert reg.get("i1") == second
    assert len(reg) == 1
    assert reg.instances() == [second]
    assert reg.lease_expires_at("i1") == T + 13
    assert reg.services() == [second.service]
    assert reg.endpoints(second.service) == ((second,) if second.ready else ())


def test_endpoints_serve_the_new_instance_even_when_nothing_pushed_changed() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    assert reg.endpoints("item")[0].admin == inst("i1").admin  # warms the cache
    assert reg.register(inst("i1", admin="10.9.9.9:1"), T) == set()
    assert reg.endpoints("item")[0].admin == "10.9.9.9:1"


def test_renew_extends_the_lease() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    assert reg.renew("i1", T + 5) is None
    assert reg.lease_expires_at("i1") == T + 15
    assert reg.expire(T + 14.999).removed == ()
    assert reg.expire(T + 15).removed == ("i1",)


@pytest.mark.parametrize(
    "call",
    [
        lambda reg: reg.renew("ghost", T),
        lambda reg: reg.set_ready("ghost", True, T),
        lambda reg: reg.lease_expires_at("ghost"),
        lambda reg: reg.is_connected("ghost"),
    ],
)
def test_unknown_instances(call) -> None:  # type: ignore[no-untyped-def]
    reg = Registry()
    reg.register(inst("i1"), T)
    with pytest.raises(UnknownInstance) as info:
        call(reg)
    assert isinstance(info.value, KeyError)
    assert info.value.instance_id == "ghost"
    assert str(info.value) == "unknown instance 'ghost'"


def test_renew_after_expiry_means_register_again() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    reg.expire(T + 10)
    with pytest.raises(UnknownInstance):
        reg.renew("i1", T + 11)


def test_set_ready_reports_changes_and_renews() -> None:
    reg = Registry()
    reg.register(inst("i1", ready=False), T)
    assert reg.set_ready("i1", False, T + 1) == set()
    assert reg.set_ready("i1", True, T + 2) == {"item"}
    assert reg.endpoints("item") == (inst("i1"),)
    assert reg.set_ready("i1", True, T + 3) == set()
    assert reg.lease_expires_at("i1") == T + 13
    assert reg.set_ready("i1", False, T + 4) == {"item"}
    assert reg.endpoints("item") == ()
    assert reg.all_endpoints("item") == (inst("i1", ready=False),)
    with pytest.raises(ValueError, match="ready must be a bool"):
        reg.set_ready("i1", "yes", T)  # type: ignore[arg-type]
    assert reg.get("i1") == inst("i1", ready=False)


def test_deregister_removes_at_once_and_is_idempotent() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    reg.register(inst("i2", ready=False), T)
    assert reg.deregister("i2") == set()
    assert reg.deregister("i1") == {"item"}
    assert reg.deregister("i1") == set()
    assert len(reg) == 0
    assert reg.services() == []
    assert reg.endpoints("item") == ()
    assert reg.expire(T + 100) == ExpiryResult()
    assert reg.stats().expired_total == 0  # goodbyes are not expiries


def test_readers_sort_by_instance_id() -> None:
    reg = Registry()
    for i in ["c", "a", "b"]:
        reg.register(inst(f"item-{i}"), T)
    reg.register(inst("cart-z", "cart"), T)
    reg.register(inst("item-d", ready=False), T)
    assert [e.instance_id for e in reg.endpoints("item")] == ["item-a", "item-b", "item-c"]
    assert [e.instance_id for e in reg.all_endpoints("item")] == ["item-a", "item-b", "item-c", "item-d"]
    assert [i.instance_id for i in reg.instances()] == ["cart-z", "item-a", "item-b", "item-c", "item-d"]
    assert reg.endpoints("unknown") == () == reg.all_endpoints("unknown")


def test_stats_and_repr() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    reg.register(inst("i2", ready=False), T)
    reg.register(inst("c1", "cart"), T + 5)
    reg.disconnected("c1", T + 6)
    reg.expire(T + 10)
    s = reg.stats()
    assert (s.instances, s.ready, s.services, s.connected, s.expired_total) == (1, 1, 1, 0, 2)
    assert s.self_preservation is False and s.self_preservation_reason is None
    assert repr(reg) == "<Registry [instances: 1, ready: 1, services: 1 | self-preservation: off]>"


# leases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset, present",
    [(0.0, True), (9.0, True), (9.999, True), (10.0, False), (10.001, False), (1e6, False)],
)
def test_lease_expires_exactly_at_ttl(offset: float, present: bool) -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    result = reg.expire(T + offset)
    assert ("i1" in reg) is present
    assert result.removed == (() if present else ("i1",))
    assert result.changed == (frozenset() if present else {"item"})


def test_custom_ttl() -> None:
    reg = Registry(ttl=2.5)
    reg.register(inst("i1"), T)
    assert reg.lease_expires_at("i1") == T + 2.5
    assert reg.expire(T + 2.4).removed == ()
    assert reg.expire(T + 2.5).removed == ("i1",)


def test_expiring_a_not_ready_instance_changes_no_service() -> None:
    reg = Registry()
    reg.register(inst("i1", ready=False), T)
    assert reg.expire(T + 10) == ExpiryResult(removed=("i1",))


def test_a_disconnected_instance_lives_until_its_lease_runs_out() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    reg.renew("i1", T + 3)  # expires at T + 13
    assert reg.disconnected("i1", T + 5) == set()  # nothing changes for other sidecars
    assert not reg.is_connected("i1")
    assert reg.lease_expires_at("i1") == T + 13  # neither shortened nor lengthened
    assert reg.expire(T + 12.999).removed == ()
    assert reg.endpoints("item") == (inst("i1"),)
    result = reg.expire(T + 13.001)
    assert result.removed == ("i1",) and result.changed == {"item"}
    assert reg.endpoints("item") == ()


def test_reregistering_after_a_disconnect_keeps_it() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    reg.disconnected("i1", T + 2)
    assert reg.register(inst("i1"), T + 4) == set()  # no churn: same content
    assert reg.is_connected("i1")
    assert reg.expire(T + 10.5).removed == ()
    assert reg.endpoints("item") == (inst("i1"),)
    assert reg.expire(T + 14).removed == ("i1",)


def test_disconnect_of_an_unknown_instance_is_ignored() -> None:
    reg = Registry()
    reg.register(inst("i1"), T)
    reg.deregister("i1")
    assert reg.disconnected("i1", T) == set()


def test_only_the_crashed_one_of_three_goes() -> None:
    reg = Registry()
    for i in range(3):
        reg.register(inst(f"item-{i}"), T)
    for now in (T + 3, T + 6, T + 9, T + 12):  # item-2 crashed at T: it stops renewing
        reg.renew("item-0", now)
        reg.renew("item-1", now)
        reg.expire(now)
    assert [e.instance_id for e in reg.endpoints("item")] == ["item-0", "item-1"]
    assert not reg.self_preservation


# self-preservation ----------------------------------------------------------------------------


def stale(reg: Registry, alive: set[str], now: float) -> None:
    """Renew the ``alive`` instances at ``now``; the others keep their older leases."""
    for instance_id in alive:
        reg.renew(instance_id, now)


def test_self_preservation_holds_a_mass_expiry_then_lets_go() -> None:
    reg = fleet(20)
    ids = [i.instance_id for i in reg.instances()]
    gone = set(ids[:5])
    stale(reg, set(ids) - gone, T + 8)
    result = reg.expire(T + 10)
    assert result.removed == () and result.changed == frozenset()
    assert result.held == tuple(sorted(gone))
    assert result.self_preservation and reg.self_preservation
    assert len(reg) == 20 and len(reg.endpoints("item")) == 20
    assert reg.self_preservation_reason == (
        "5 of 20 instances (25%) expired within one TTL window (10 s), more than 15%: evictions paused"
    )
    stats = reg.stats()
    assert stats.self_preservation and stats.self_preservation_reason == reg.self_preservation_reason
    assert repr(reg).endswith("| self-preservation: ON]>")

    # still held on the next sweep
    assert reg.expire(T + 11).held == tuple(sorted(gone))

    # the partition heals for three of them: 2 of 20 is not more than 15 %, so they go
    back = set(ids[:3])
    stale(reg, back, T + 11.5)
    result = reg.expire(T + 12)
    assert result.removed == tuple(sorted(gone - back))
    assert result.changed == {"item"}
    assert not result.self_preservation and not reg.self_preservation
    assert reg.self_preservation_reason is None
    assert len(reg) == 18
    assert reg.stats().expired_total == 2


def test_self_preservation_ends_when_the_leases_are_renewed() -> None:
    reg = fleet(20)
    ids = [i.instance_id for i in reg.instances()]
    stale(reg, set(ids[5:]), T + 8)
    assert reg.expire(T + 10).self_preservation
    stale(reg, set(ids[:5]), T + 10.5)
    assert reg.expire(T + 11) == ExpiryResult()
    assert not reg.self_preservation and len(reg) == 20


def test_self_preservation_ends_when_an_operator_deregisters_the_dead() -> None:
    reg = fleet(20)
    ids = [i.instance_id for i in reg.instances()]
    stale(reg, set(ids[5:]), T + 8)
    assert reg.expire(T + 10).self_preservation
    for instance_id in ids[:3]:
        reg.deregister(instance_id)  # 2 of 17 left to expire: 11.8 %
    assert reg.expire(T + 10.5).removed == tuple(ids[3:5])
    assert not reg.self_preservation


@pytest.mark.parametrize(
    "total, expiring, preserved",
    [
        # the small-registry rule: fewer than 3 lapsing together is an ordinary failure
        (1, 1, False),  # 100 %, but one crash
        (2, 1, False),
        (2, 2, False),
        (3, 1, False),
        (3, 2, False),
        (3, 3, True),  # the whole small mesh at once: more likely our side
        (6, 2, False),
        (10, 2, False),
        (10, 3, True),
        # from 20 instances on, the 15 % share decides
        (20, 3, False),  # exactly 15 %: at or below the threshold, evicted
        (20, 4, True),
        (20, 5, True),
        (100, 15, False),
        (100, 16, True),
    ],
)
def test_when_self_preservation_applies(total: int, expiring: int, preserved: bool) -> None:
    reg = fleet(total)
    ids = [i.instance_id for i in reg.instances()]
    stale(reg, set(ids[expiring:]), T + 5)
    result = reg.expire(T + 10)
    assert result.self_preservation is preserved
    assert reg.self_preservation is preserved
    assert len(reg) == (total if preserved else total - expiring)
    assert len(result.removed) == (0 if preserved else expiring)
    assert len(result.held) == (expiring if preserved else 0)


@pytest.mark.parametrize(
    "threshold, minimum, preserved",
    [(0.15, 3, True), (0.15, 6, False), (0.5, 1, False), (0.0, 1, True)],
)
def test_self_preservation_settings(threshold: float, minimum: int, preserved: bool) -> None:
    reg = Registry(self_preservation_threshold=threshold, self_preservation_min_instances=minimum)
    for i in range(10):
        reg.register(inst(f"item-{i}"), T)
    stale(reg, {f"item-{i}" for i in range(5, 10)}, T + 5)  # 5 of 10 expire
    assert reg.expire(T + 10).self_preservation is preserved


def test_self_preservation_counts_one_ttl_window_not_one_sweep() -> None:
    """Partitioned sidecars' leases run out a few at a time; frequent sweeps must still see the whole."""
    reg = fleet(20)
    ids = [i.instance_id for i in reg.instances()]
    # ids[0:2] last renewed at T, ids[2:4] at T + 2, the rest keep renewing
    stale(reg, set(ids[2:]), T + 2)
    for now in (T + 4, T + 6, T + 8, T + 10):
        stale(reg, set(ids[4:]), now)
    first = reg.expire(T + 10)
    assert first.removed == tuple(ids[0:2])  # 2 of 20: evicted
    second = reg.expire(T + 12)
    assert second.removed == () and second.held == tuple(ids[2:4])  # 2 + 2 of 20 in one window
    assert reg.self_preservation_reason is not None
    assert reg.self_preservation_reason.startswith("4 of 20 instances (20%)")
    # once the first evictions are older than one TTL, the window holds only the two due now
    stale(reg, set(ids[4:]), T + 19)
    third = reg.expire(T + 20)
    assert third.removed == tuple(ids[2:4])
    assert not reg.self_preservation


def test_an_evicted_instance_that_came_back_does_not_count() -> None:
    reg = fleet(20)
    ids = [i.instance_id for i in reg.instances()]
    stale(reg, set(ids[2:]), T + 5)
    assert reg.expire(T + 10).removed == tuple(ids[:2])
    reg.register(inst(ids[0]), T + 10.5)  # restarted sidecar: alive again
    reg.register(inst(ids[1]), T + 10.5)
    stale(reg, set(ids[4:]), T + 10.5)
    # ids[2:4] now lapse: 2 of 20 in the window (the two that came back are alive)
    assert reg.expire(T + 15).removed == tuple(ids[2:4])
    assert not reg.self_preservation


@pytest.mark.parametrize(
    "sweeps, held_at_end, removed_by_end",
    [
        # Four ready registrations whose sidecars vanish together: 4 of 4 is a mass expiry, held for
        # one window after the leases ran out (T + 10 .. T + 20), then evicted and the pause ends.
        ([T + 10], 4, 0),
        ([T + 10, T + 15, T + 19.9], 4, 0),
        ([T + 10, T + 15, T + 20], 0, 4),
        ([T + 10, T + 20, T + 60, T + 600], 0, 4),
        # a sweep only after the window: nothing left in it to protect
        ([T + 25], 0, 4),
    ],
)
def test_self_preservation_lets_go_one_window_after_the_expiries(
    sweeps: list[float], held_at_end: int, removed_by_end: int
) -> None:
    reg = fleet(4)
    removed: list[str] = []
    result = ExpiryResult()
    for now in sweeps:
        result = reg.expire(now)
        removed += result.removed
    assert len(result.held) == held_at_end
    assert reg.self_preservation is (held_at_end > 0)
    assert len(removed) == removed_by_end == reg.stats().expired_total
    assert len(reg) == 4 - removed_by_end


def test_a_killed_sidecar_is_evicted_while_dead_ones_hold_self_preservation() -> None:
    """The issue's outage: four registrations that never come back switch self-preservation on;
    a fifth sidecar, kill -9'd later, must still leave within two TTLs of its last renewal."""
    reg = fleet(4)  # registered at T, never renewed: their channels dropped
    for i in range(6):
        reg.register(inst(f"live-{i}"), T)
    live = {f"live-{i}" for i in range(6)}
    killed = "live-0"
    removed: list[str] = []
    for second in range(1, 61):
        now = T + second
        stale(reg, live - {killed} if second >= 5 else live, now)  # live-0 killed at T + 4
        removed += reg.expire(now).removed
    assert killed in removed and killed not in reg
    assert sorted(removed) == sorted([*(f"item-{i:02d}" for i in range(4)), killed])
    assert not reg.self_preservation
    assert [e.instance_id for e in reg.endpoints("item")] == sorted(live - {killed})


def test_the_killed_sidecar_goes_at_most_two_ttls_after_its_last_renewal() -> None:
    reg = fleet(4)
    reg.register(inst("killed"), T + 5)  # its lease runs out at T + 15, inside the dead four's window
    for second in range(10, 31):
        reg.expire(T + second)
        if second == 19:
            assert "killed" in reg and reg.self_preservation  # held with the others
    assert "killed" not in reg and len(reg) == 0
    assert not reg.self_preservation


@pytest.mark.parametrize(
    "ready, expiring, preserved",
    [
        # never-ready registrations (an app that never came up) count in neither number
        ([False] * 4, 4, False),
        ([True, True, False, False], 4, False),  # 2 ready ones lapse: an ordinary failure
        ([True, True, True, False], 4, True),  # 3 of 3 ready
        ([True] * 3 + [False] * 17, 3, True),  # 3 of the 3 that were ever ready
        ([True] * 20, 3, False),  # 3 of 20: 15 %, not more
    ],
)
def test_never_ready_instances_do_not_count(ready: list[bool], expiring: int, preserved: bool) -> None:
    reg = Registry()
    ids = [f"item-{i:02d}" for i in range(len(ready))]
    for instance_id, is_ready in zip(ids, ready, strict=True):
        reg.register(inst(instance_id, ready=is_ready), T)
    stale(reg, set(ids[expiring:]), T + 5)
    result = reg.expire(T + 10)
    assert result.self_preservation is preserved
    never_ready_due = [i for i, r in zip(ids[:expiring], ready, strict=False) if not r]
    assert set(never_ready_due) <= set(result.removed)  # evicted when due, held or not
    assert len(result.held) == (sum(ready[:expiring]) if preserved else 0)


def test_an_instance_that_became_ready_counts() -> None:
    reg = Registry()
    for i in range(3):
        reg.register(inst(f"item-{i}", ready=False), T)
        reg.set_ready(f"item-{i}", True, T)
        reg.set_ready(f"item-{i}", False, T)  # was ready once: somebody may have been sent there
    assert reg.expire(T + 10).self_preservation


# a live channel whose lease ran out -------------------------------------------------------------


def test_restore_puts_an_expired_registration_back() -> None:
    """A sidecar paused for 12.5 s (past the 10 s lease) speaks again on its live channel."""
    reg = Registry()
    me = inst("item-1")
    reg.register(me, T)
    assert reg.expire(T + 10).removed == ("item-1",)
    with pytest.raises(UnknownInstance):
        reg.renew("item-1", T + 12.5)
    assert reg.restore(me, T + 12.5) == {"item"}
    assert reg.endpoints("item") == (me,)
    assert reg.lease_expires_at("item-1") == T + 22.5
    assert reg.stats().restored_total == 1
    # restoring what is registered only renews it, and is not counted
    assert reg.restore(me, T + 13) == set()
    assert reg.lease_expires_at("item-1") == T + 23
    assert reg.stats().restored_total == 1


def test_a_restored_instance_leaves_the_self_preservation_window() -> None:
    reg = fleet(20)
    ids = [i.instance_id for i in reg.instances()]
    stale(reg, set(ids[2:]), T + 5)
    assert reg.expire(T + 10).removed == tuple(ids[:2])
    for instance_id in ids[:2]:
        reg.restore(inst(instance_id), T + 10.5)
    stale(reg, set(ids[4:]), T + 10.5)
    assert reg.expire(T + 15).removed == tuple(ids[2:4])  # 2 of 20, the restored two are alive
    assert not reg.self_preservation


# versions -------------------------------------------------------------------------------------


def test_version_is_a_content_hash() -> None:
    a, b = Registry(), Registry()
    for i in ["i1", "i2", "i3"]:
        a.register(inst(i), T)
    for i in ["i3", "i1", "i2"]:  # another order, other times, another registry: same content
        b.register(inst(i, admin="10.1.1.1:1", node="elsewhere"), T + 50)
    b.register(inst("i4", ready=False), T)  # not ready: not in the set
    assert a.version("item") == b.version("item")
    assert len(a.version("item")) == 12 and int(a.version("item"), 16) >= 0
    assert a.version("item") == endpoints_version(a.endpoints("item"))


def test_version_is_pinned() -> None:
    """Equal content gives an equal version after a control-plane upgrade too: sidecars keep theirs."""
    reg = Registry()
    reg.register(Instance("item", "i1", "10.0.0.1:8080", "10.0.0.1:15090", {"zone": "a"}, ready=True), T)
    # sha256('[["i1","10.0.0.1:8080",{"zone":"a"}]]'): canonical JSON, sorted keys, no spaces
    assert reg.version("item") == endpoints_version(reg.endpoints("item")) == "e0a278600ae0"
    assert Registry().version("item") == endpoints_version([]) == "4f53cda18c2b"  # sha256('[]')


@pytest.mark.parametrize(
    "change",
    [
        lambda reg: reg.register(inst("i1", address="10.9.9.9:80"), T),
        lambda reg: reg.register(inst("i1", labels={"zone": "a", "version": "v2"}), T),
        lambda reg: reg.register(inst("i1", labels={}), T),
        lambda reg: reg.register(inst("i9"), T),
        lambda reg: reg.set_ready("i1", False, T),
        lambda reg: reg.deregister("i2"),
        lambda reg: reg.register(inst("i1", "cart"), T),
    ],
)
def test_version_changes_with_content(change) -> None:  # type: ignore[no-untyped-def]
    reg = Registry()
    reg.register(inst("i1"), T)
    reg.register(inst("i2"), T)
    before = reg.version("item")
    assert "item" in change(reg)
    assert reg.version("item") != before


def test_version_of_labels_does_not_depend_on_their_order() -> None:
    a, b = Registry(), Registry()
    a.register(inst("i1", labels={"zone": "a", "version": "v1"}), T)
    b.register(inst("i1", labels={"version": "v1", "zone": "a"}), T)
    assert a.version("item") == b.version("item")


def test_version_distinguishes_which_instance_has_which_address() -> None:
    a, b = Registry(), Registry()
    a.register(inst("i1", address="10.0.0.1:80"), T)
    a.register(inst("i2", address="10.0.0.2:80"), T)
    b.register(inst("i1", address="10.0.0.2:80"), T)
    b.register(inst("i2", address="10.0.0.1:80"), T)
    assert a.version("item") != b.version("item")


# random operations ----------------------------------------------------------------------------

_IDS = [f"i{n}" for n in range(8)]
_SERVICES = ["item", "cart", "pay"]


class RegistryMachine(RuleBasedStateMachine):
    """Random operations; after each, the invariants below, and every returned changed-set must be
    exactly the services whose version moved."""

    def __init__(self) -> None:
        super().__init__()
        self.reg = Registry(ttl=10.0)
        self.now = 0.0
        self.expired_at: float | None = None  # the `now` of the last expire() call

    def _versions(self) -> dict[str, str]:
        return {s: self.reg.version(s) for s in _SERVICES}

    def _check_changed(self, before: dict[str, str], changed: set[str] | frozenset[str]) -> None:
        after = self._versions()
        assert set(changed) == {s for s in _SERVICES if before[s] != after[s]}

    @rule(dt=st.sampled_from([0.0, 0.001, 1.0, 3.0, 9.999, 10.0, 25.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(
        instance_id=st.sampled_from(_IDS),
        service=st.sampled_from(_SERVICES),
        address=st.sampled_from(["10.0.0.1:80", "10.0.0.2:80"]),
        zone=st.sampled_from(["a", "b"]),
        ready=st.booleans(),
    )
    def register(self, instance_id: str, service: str, address: str, zone: str, ready: bool) -> None:
        before = self._versions()
        changed = self.reg.register(
            inst(instance_id, service, address=address, labels={"zone": zone}, ready=ready), self.now
        )
        self._check_changed(before, changed)
        assert self.reg.lease_expires_at(instance_id) == self.now + 10

    @rule(instance_id=st.sampled_from(_IDS))
    def renew(self, instance_id: str) -> None:
        if instance_id in self.reg:
            self.reg.renew(instance_id, self.now)
        else:
            with pytest.raises(UnknownInstance):
                self.reg.renew(instance_id, self.now)

    @rule(instance_id=st.sampled_from(_IDS), ready=st.booleans())
    def set_ready(self, instance_id: str, ready: bool) -> None:
        before = self._versions()
        if instance_id not in self.reg:
            with pytest.raises(UnknownInstance):
                self.reg.set_ready(instance_id, ready, self.now)
            return
        self._check_changed(before, self.reg.set_ready(instance_id, ready, self.now))

    @rule(instance_id=st.sampled_from(_IDS))
    def disconnected(self, instance_id: str) -> None:
        before = self._versions()
        self._check_changed(before, self.reg.disconnected(instance_id, self.now))

    @rule(instance_id=st.sampled_from(_IDS))
    def deregister(self, instance_id: str) -> None:
        before = self._versions()
        self._check_changed(before, self.reg.deregister(instance_id))
        assert instance_id not in self.reg

    @rule()
    def expire(self) -> None:
        before = self._versions()
        count = len(self.reg)
        result = self.reg.expire(self.now)
        self._check_changed(before, result.changed)
        assert len(self.reg) == count - len(result.removed)
        assert result.self_preservation == self.reg.self_preservation
        assert not set(result.removed) & set(result.held)
        assert result.self_preservation is bool(result.held)
        self.expired_at = self.now

    @precondition(lambda self: self.expired_at is not None)
    @invariant()
    def no_expired_lease_remains_unless_preserving(self) -> None:
        assert self.expired_at is not None
        # renewals and registrations since the sweep only move leases later; self-preservation
        # holds a lease for at most one window (the TTL) after it ran out
        oldest = self.expired_at - (self.reg.ttl if self.reg.self_preservation else 0.0)
        for i in self.reg.instances():
            assert self.reg.lease_expires_at(i.instance_id) > oldest

    @invariant()
    def endpoints_are_the_ready_registered_instances(self) -> None:
        instances = self.reg.instances()
        assert len(instances) == len(self.reg)
        for s in _SERVICES:
            endpoints = self.reg.endpoints(s)
            assert all(e.ready and self.reg.get(e.instance_id) == e for e in endpoints)
            assert set(endpoints) == {i for i in instances if i.service == s and i.ready}
            assert [e.instance_id for e in endpoints] == sorted(e.instance_id for e in endpoints)
            assert set(self.reg.all_endpoints(s)) == {i for i in instances if i.service == s}
        assert self.reg.services() == sorted({i.service for i in instances})
        stats = self.reg.stats()
        assert stats.instances == len(instances)
        assert stats.ready == sum(i.ready for i in instances)

    @invariant()
    def versions_are_equal_iff_ready_sets_are(self) -> None:
        content = {
            s: frozenset((e.instance_id, e.address, tuple(sorted(e.labels.items()))) for e in self.reg.endpoints(s))
            for s in _SERVICES
        }
        for a in _SERVICES:
            for b in _SERVICES:
                assert (self.reg.version(a) == self.reg.version(b)) == (content[a] == content[b])


RegistryMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestRegistryMachine = RegistryMachine.TestCase
