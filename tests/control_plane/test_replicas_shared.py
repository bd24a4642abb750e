"""The registry replicas rebuild from etcd's events, and the lease-expiry safety valve (pure)."""

from __future__ import annotations

import json

import pytest

from control_plane.ownership import Owner
from control_plane.registry import Instance, Registry
from control_plane.replicas.records import (
    INSTANCES,
    REPLICAS,
    RecordError,
    ReplicaCard,
    decode_card,
    decode_instance,
    encode_instance,
    instance_key,
)
from control_plane.replicas.shared import Change, SharedRegistry

TTL = 10.0
LEASE_A, LEASE_B = 0xA, 0xB


def instance(n: int, service: str = "item", ready: bool = True) -> Instance:
    return Instance(service, f"{service}-{n}", f"10.0.0.{n}:15006", f"10.0.0.{n}:15090", ready=ready)


def put(i: Instance, revision: int, lease: int = LEASE_A, replica: str = "cp-a", connected: bool = True) -> Change:
    return Change(instance_key(i.instance_id), encode_instance(i, replica, connected), lease, 0, revision)


def gone(i: Instance, revision: int, prev_lease: int = LEASE_A) -> Change:
    return Change(instance_key(i.instance_id), None, 0, prev_lease, revision)


def card(replica: str, lease: int, revision: int) -> Change:
    value = ReplicaCard(replica, "127.0.0.1:1", "127.0.0.1:2", "0.1.0", 1.0, 0).encode()
    return Change(REPLICAS + replica, value, lease, 0, revision)


def card_gone(replica: str, lease: int, revision: int) -> Change:
    return Change(REPLICAS + replica, None, 0, lease, revision)


def shared_with(instances: list[Instance], lease: int = LEASE_A) -> SharedRegistry:
    shared = SharedRegistry(Registry(ttl=TTL), hold=TTL)
    changes = [card("cp-a", LEASE_A, 1), card("cp-b", LEASE_B, 2)]
    changes += [put(i, 3 + n, lease) for n, i in enumerate(instances)]
    shared.apply(changes, now=0.0)
    return shared


def test_puts_register_and_report_the_services_that_changed() -> None:
    shared = SharedRegistry(Registry(ttl=TTL), hold=TTL)
    changed = shared.apply([put(instance(1), 1), put(instance(2, "user"), 2)], now=0.0)
    assert changed == {"item", "user"}
    assert [i.instance_id for i in shared.registry.endpoints("item")] == ["item-1"]
    # The same record again changes nothing anybody is pushed.
    assert shared.apply([put(instance(1), 3)], now=1.0) == set()


def test_a_disconnected_record_stays_an_endpoint_but_shows_disconnected() -> None:
    shared = SharedRegistry(Registry(ttl=TTL), hold=TTL)
    shared.apply([put(instance(1), 1, connected=False)], now=0.0)
    assert shared.registry.endpoints("item") and not shared.registry.is_connected("item-1")


def test_a_live_replicas_deletion_removes_at_once() -> None:
    instances = [instance(n) for n in range(1, 11)]
    shared = shared_with(instances)
    changed = shared.apply([gone(instances[0], 20), gone(instances[1], 20), gone(instances[2], 20)], now=1.0)
    assert changed == {"item"}
    assert len(shared.registry.endpoints("item")) == 7
    assert not shared.held


def test_a_lease_expiry_of_many_holds_them_until_the_hold_ends() -> None:
    instances = [instance(n) for n in range(1, 11)]
    shared = shared_with(instances[:5], LEASE_A)
    shared.apply([put(i, 10 + n, LEASE_B, "cp-b") for n, i in enumerate(instances[5:])], now=0.0)
    # cp-a's lease runs out: its card and its five instances go in one revision (any order).
    expiry = [gone(i, 30) for i in instances[:5]] + [card_gone("cp-a", LEASE_A, 30)]
    assert shared.apply(expiry, now=1.0) == set()
    assert len(shared.registry.endpoints("item")) == 10  # still pushed
    assert sorted(shared.held) == [f"item-{n}" for n in range(1, 6)]
    assert shared.held_reason is not None and "5 of 10" in shared.held_reason
    assert shared.release(now=1.0 + TTL - 0.1) == set()
    assert shared.release(now=1.0 + TTL) == {"item"}
    assert len(shared.registry.endpoints("item")) == 5 and not shared.held and shared.held_reason is None


def test_a_held_instance_that_registers_again_is_no_longer_held() -> None:
    instances = [instance(n) for n in range(1, 11)]
    shared = shared_with(instances[:5], LEASE_A)
    shared.apply([put(i, 10 + n, LEASE_B, "cp-b") for n, i in enumerate(instances[5:])], now=0.0)
    shared.apply([gone(i, 30) for i in instances[:5]] + [card_gone("cp-a", LEASE_A, 30)], now=1.0)
    shared.apply([put(instances[0], 31, LEASE_B, "cp-b")], now=2.0)  # its sidecar moved to cp-b
    shared.release(now=1.0 + TTL)
    kept = [i.instance_id for i in shared.registry.endpoints("item")]
    assert kept == ["item-1", "item-10", "item-6", "item-7", "item-8", "item-9"]


def test_one_lease_expiry_among_many_is_an_ordinary_loss() -> None:
    instances = [instance(n) for n in range(1, 11)]
    shared = shared_with(instances[9:], LEASE_A)
    shared.apply([put(i, 10 + n, LEASE_B, "cp-b") for n, i in enumerate(instances[:9])], now=0.0)
    changed = shared.apply([gone(instances[9], 30), card_gone("cp-a", LEASE_A, 30)], now=1.0)
    assert changed == {"item"} and not shared.held
    assert len(shared.registry.endpoints("item")) == 9


def test_instances_never_ready_are_not_held() -> None:
    shared = shared_with([instance(n, ready=False) for n in range(1, 6)])
    shared.apply([gone(instance(n), 30) for n in range(1, 6)] + [card_gone("cp-a", LEASE_A, 30)], now=1.0)
    assert len(shared.registry) == 0 and not shared.held


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"service": "item", "instance_id": "item-1"}).encode(),  # fields missing
        encode_instance(instance(2), "cp-a", True),  # the key names item-1
        encode_instance(instance(1), "CP A", True),  # not a replica id
        b"x" * 70_000,
    ],
)
def test_a_bad_record_is_skipped_and_counted(value: bytes) -> None:
    shared = SharedRegistry(Registry(ttl=TTL), hold=TTL)
    changed = shared.apply([Change(instance_key("item-1"), value, LEASE_A, 0, 1)], now=0.0)
    assert changed == set() and len(shared.registry) == 0 and shared.bad_records == 1


def test_a_fresh_listing_replaces_everything_and_ends_holds() -> None:
    instances = [instance(n) for n in range(1, 6)]
    shared = shared_with(instances)
    shared.held["item-1"] = 99.0
    listing = [
        (REPLICAS + "cp-b", ReplicaCard("cp-b", "a:1", "a:2", "v", 1.0, 3).encode(), LEASE_B),
        (instance_key("item-2"), encode_instance(instances[1], "cp-b", True), LEASE_B),
        (instance_key("user-1"), encode_instance(instance(1, "user"), "cp-b", True), LEASE_B),
        ("policies/current", b"1", 0),
    ]
    changed = shared.replace_all(listing, now=5.0)
    assert changed == {"item", "user"}
    assert [i.instance_id for i in shared.registry.instances()] == ["item-2", "user-1"]
    assert list(shared.cards) == ["cp-b"] and shared.cards["cp-b"].lease == LEASE_B
    assert not shared.held


def test_records_round_trip_with_their_owner() -> None:
    original = Instance(
        "item",
        "item-1",
        "10.0.0.1:15006",
        "10.0.0.1:15090",
        {"zone": "a"},
        "node-1",
        8080,
        "http2",
        True,
        Owner("item", "10.0.0.1"),
    )
    record = decode_instance(instance_key("item-1"), encode_instance(original, "cp-a", False))
    assert record.instance == original and record.replica == "cp-a" and record.connected is False


@pytest.mark.parametrize(
    ("key", "body"),
    [
        (REPLICAS + "cp-a", {"id": "cp-b", "push": "a", "api": "b", "version": "v", "started": 1, "sessions": 0}),
        (REPLICAS + "cp-a", {"id": "cp-a", "push": 1, "api": "b", "version": "v", "started": 1, "sessions": 0}),
        (REPLICAS + "cp-a", {"id": "cp-a", "push": "a", "api": "b", "version": "v", "started": "x", "sessions": 0}),
        (REPLICAS + "cp-a", {"id": "cp-a", "push": "a", "api": "b", "version": "v", "started": 1, "sessions": -1}),
    ],
)
def test_bad_cards_are_refused(key: str, body: dict[str, object]) -> None:
    with pytest.raises(RecordError, match=key):
        decode_card(key, json.dumps(body).encode(), 1)


def test_instance_keys_live_under_the_registry() -> None:
    assert instance_key("item-1") == INSTANCES + "item-1"


def test_what_replicas_keep_is_live_state_an_import_never_touches() -> None:
    from control_plane.replicas.records import LEADER
    from control_plane.store import is_live

    assert is_live(instance_key("item-1")) and is_live(REPLICAS + "cp-a") and is_live(LEADER)
    assert not is_live("policies/current") and not is_live("secrets/api-token") and not is_live("ca/ca.crt")
