"""A sidecar on a session with another store (sidecar/net/control.py): it keeps the policies
that store would remove, NACKs ``store-conflict`` naming them, logs it once, and keeps, on disk
too, the store they came from until the new store has every one of them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from meshlet import wire
from sidecar.core.config import MeshSnapshot
from sidecar.net.control import ControlPlaneClient, InstanceInfo
from sidecar.net.persist import read_last_good

OLD, NEW = "a" * 32, "b" * 32
DENY_NAME = "AccessPolicy/item-callers"
DENY = {"kind": "AccessPolicy", "name": "item-callers", "service": "item", "rules": [{"sources": ["user"]}]}
ROUTE_NAME = "Route/item"
ROUTE = {
    "kind": "Route",
    "name": "item",
    "host": "item",
    "rules": [{"name": "all", "destinations": [{"service": "item"}]}],
}


def _client(state_file: Path, applied: list[MeshSnapshot] | None = None) -> ControlPlaneClient:
    return ControlPlaneClient(
        [("127.0.0.1", 1)],
        InstanceInfo("item", "item-1", "127.0.0.1:2", "127.0.0.1:3"),
        (applied if applied is not None else []).append,
        state_file=state_file,
    )


def _resource(name: str, body: dict[str, object]) -> wire.Resource:
    return wire.Resource(name, wire.content_version(body), body)


def _push(nonce: str, *resources: wire.Resource, removed: tuple[str, ...] = (), full: bool = False) -> wire.Push:
    return wire.Push(wire.POLICIES, f"v{nonce}", nonce, resources, removed, full)


def _answer(data: bytes) -> wire.Message:
    [message] = wire.FrameDecoder(wire.UPSTREAM_KINDS).feed(data)
    return message


def _session(client: ControlPlaneClient, store: str) -> wire.ClientConnection:
    """What a welcome naming ``store`` starts."""
    client._start_session(store)
    return wire.ClientConnection(client._hello())


def _holding_deny_from_old(state_file: Path) -> ControlPlaneClient:
    client = _client(state_file)
    conn = _session(client, OLD)
    ack = _answer(client._on_push(conn, _push("1", _resource(DENY_NAME, DENY), full=True)))
    assert isinstance(ack, wire.Ack) and client.config.store == OLD
    return client


def test_a_fresh_sidecar_adopts_the_store_and_says_so_in_its_next_hello(tmp_path: Path) -> None:
    client = _holding_deny_from_old(tmp_path / "item.json")
    assert client._hello().store == OLD
    persisted = json.loads((tmp_path / "item.json").read_text())
    assert persisted["store"] == OLD


def test_another_store_that_would_remove_a_policy_is_refused_and_the_rest_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_file = tmp_path / "item.json"
    client = _holding_deny_from_old(state_file)
    conn = _session(client, NEW)
    with caplog.at_level(logging.INFO, "meshlet.control"):
        # The empty store's first push: DENY removed, a route it has added.
        nack = _answer(client._on_push(conn, _push("2", _resource(ROUTE_NAME, ROUTE), removed=(DENY_NAME,), full=True)))
        assert isinstance(nack, wire.Nack) and nack.names == (DENY_NAME,) and nack.version == "v1"
        assert nack.message.startswith(f"store-conflict: kept {DENY_NAME}: they came from store {OLD} ")
        assert set(client.config.policies.held) == {DENY_NAME, ROUTE_NAME}  # kept, and the add applied
        assert "item" in client.config.snapshot({}, "t").access  # still enforced
        assert client.config.store == OLD and client._hello().store == OLD
        persisted = read_last_good(state_file)
        assert persisted is not None and persisted.store == OLD and DENY_NAME in persisted.policies.held

        # Again (after the control plane's warm-up, say): refused again, not logged again.
        again = _answer(client._on_push(conn, _push("3", removed=(DENY_NAME,))))
        assert isinstance(again, wire.Nack) and again.names == (DENY_NAME,)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and DENY_NAME in errors[0].getMessage()
    assert "re-apply them to this control plane" in errors[0].getMessage()
    assert client.nacks_sent == 2

    # A restarted sidecar serves the kept policy and still names the old store.
    restarted = _client(state_file)
    assert restarted.load_persisted()
    assert restarted.config.store == OLD and DENY_NAME in restarted.config.policies.held
    assert restarted._hello().store == OLD


def test_once_the_new_store_lists_what_was_kept_the_sidecar_adopts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_file = tmp_path / "item.json"
    client = _holding_deny_from_old(state_file)
    conn = _session(client, NEW)
    assert isinstance(_answer(client._on_push(conn, _push("2", removed=(DENY_NAME,), full=True))), wire.Nack)
    with caplog.at_level(logging.INFO, "meshlet.control"):
        # The policy applied to the new store: listed, at the version held.
        ack = _answer(client._on_push(conn, _push("3", _resource(DENY_NAME, DENY))))
    assert isinstance(ack, wire.Ack)
    assert client.config.store == NEW and client.store_conflict == ()
    persisted = read_last_good(state_file)
    assert persisted is not None and persisted.store == NEW
    assert "store conflict resolved" in caplog.text
    # From now on a removal is a removal.
    assert isinstance(_answer(client._on_push(conn, _push("4", removed=(DENY_NAME,)))), wire.Ack)
    assert client.config.policies.held == {}


def test_a_full_push_from_another_store_that_removes_nothing_is_adopted(tmp_path: Path) -> None:
    client = _holding_deny_from_old(tmp_path / "item.json")
    conn = _session(client, NEW)
    ack = _answer(
        client._on_push(conn, _push("2", _resource(DENY_NAME, DENY), _resource(ROUTE_NAME, ROUTE), full=True))
    )
    assert isinstance(ack, wire.Ack) and client.config.store == NEW


def test_the_same_store_removes_as_always(tmp_path: Path) -> None:
    client = _holding_deny_from_old(tmp_path / "item.json")
    conn = _session(client, OLD)  # reconnected to the same store
    assert isinstance(_answer(client._on_push(conn, _push("2", removed=(DENY_NAME,), full=True))), wire.Ack)
    assert client.config.policies.held == {} and client.config.store == OLD


def test_a_conflict_and_a_rejected_resource_share_one_nack(tmp_path: Path) -> None:
    client = _holding_deny_from_old(tmp_path / "item.json")
    conn = _session(client, NEW)
    bad = wire.Resource("Route/bad", "x", {"kind": "Route", "name": "bad"})
    nack = _answer(client._on_push(conn, _push("2", bad, removed=(DENY_NAME,), full=True)))
    assert isinstance(nack, wire.Nack) and nack.names == (DENY_NAME, "Route/bad")
    assert nack.message.startswith("store-conflict: ") and "; Route/bad: " in nack.message


def test_endpoints_are_not_concerned(tmp_path: Path) -> None:
    client = _holding_deny_from_old(tmp_path / "item.json")
    conn = _session(client, NEW)
    body = [wire.endpoint("item-1", "127.0.0.1:9001")]
    push = wire.Push(wire.ENDPOINTS, "e1", "2", (wire.Resource("item", wire.content_version(body), body),))
    assert isinstance(_answer(client._on_push(conn, push)), wire.Ack)
    gone = wire.Push(wire.ENDPOINTS, "e2", "3", (), ("item",))
    assert isinstance(_answer(client._on_push(conn, gone)), wire.Ack)
    assert client.config.store == OLD  # endpoints say nothing about the policies' store
