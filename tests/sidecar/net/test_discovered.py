"""The sidecar's view of pushed endpoints (DiscoveredState): deltas, rejections,
removals and the persisted form."""

from __future__ import annotations

from meshlet import wire
from sidecar.net.control import DiscoveredState


def _push(*resources: wire.Resource, removed: tuple[str, ...] = ()) -> wire.Push:
    return wire.Push("endpoints", "t", "1", resources, removed)


def _full(name: str, body: list[dict[str, object]]) -> wire.Resource:
    return wire.Resource(name, wire.content_version(body), body)


ITEM = [wire.endpoint("item-1", "127.0.0.1:9001"), wire.endpoint("item-2", "127.0.0.1:9002")]


def test_full_then_delta_then_removal() -> None:
    state = DiscoveredState()
    assert state.apply(_push(_full("item", ITEM))) == ([], "")
    after = [ITEM[1], wire.endpoint("item-3", "127.0.0.1:9003")]
    delta = wire.Resource(
        "item", wire.content_version(after), None, wire.content_version(ITEM), (after[1],), ("item-1",)
    )
    assert state.apply(_push(delta)) == ([], "")
    assert [e.address for e in state.services()["item"].endpoints] == ["127.0.0.1:9002", "127.0.0.1:9003"]
    state.apply(_push(removed=("item",)))
    assert state.services() == {}


def test_bad_resources_are_rejected_and_the_rest_applied() -> None:
    state = DiscoveredState()
    state.apply(_push(_full("item", ITEM)))
    bad_address = wire.Resource("other", "x", [{"id": "o-1", "address": "nowhere"}])
    bad_weight = wire.Resource("third", "y", [{"id": "t-1", "address": "127.0.0.1:1", "weight": 0}])
    wrong_base = wire.Resource("item", "z", None, "not-my-version", (), ("item-1",))
    fine = _full("fine", [wire.endpoint("f-1", "127.0.0.1:7000")])
    rejected, why = state.apply(_push(bad_address, bad_weight, wrong_base, fine))
    assert rejected == ["other", "third", "item"]
    assert "nowhere" in why and "weight" in why and "not-my-version" in why
    services = state.services()
    assert set(services) == {"item", "fine"}  # item kept at its previous version
    assert len(services["item"].endpoints) == 2


def test_app_ports_arrive_with_their_endpoints_and_bad_ones_are_rejected() -> None:
    state = DiscoveredState()
    body = [wire.endpoint("item-1", "10.0.0.2:15006", app_port=8080), wire.endpoint("item-2", "10.0.0.3:15006")]
    assert "app_port" not in body[1]  # not told: not sent
    bad = wire.Resource("other", "x", [{"id": "o-1", "address": "10.0.0.4:15006", "app_port": 70000}])
    rejected, why = state.apply(_push(_full("item", body), bad))
    assert rejected == ["other"] and "app_port" in why
    endpoints = state.services()["item"].endpoints
    assert [(e.address, e.app_port) for e in endpoints] == [("10.0.0.2:15006", 8080), ("10.0.0.3:15006", 0)]


def test_persisted_form_round_trips() -> None:
    state = DiscoveredState()
    state.apply(_push(_full("item", ITEM)))
    again = DiscoveredState.from_json(state.to_json())
    assert again.versions() == state.versions()
    assert again.services() == state.services()


async def test_instances_sharing_a_state_file_never_collide(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two sidecars of one service on one host persist to the same file, concurrently."""
    import threading

    from sidecar.net.control import ControlPlaneClient, InstanceInfo

    state = tmp_path / "item.json"
    clients = [
        ControlPlaneClient(
            [("127.0.0.1", 1)], InstanceInfo("item", f"item-{i}", "127.0.0.1:1", ""), lambda s: None, state_file=state
        )
        for i in range(2)
    ]
    errors: list[BaseException] = []

    def hammer(client: ControlPlaneClient) -> None:
        try:
            for _ in range(300):
                client._persist()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and state.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["item.json"]  # no temporary file left behind


def test_the_registry_hears_ready_only_once_the_sidecar_has_a_configuration() -> None:
    """Its inbound listener refuses until then: callers must not be sent there before."""
    from sidecar.net.control import ControlPlaneClient, InstanceInfo

    client = ControlPlaneClient(
        [("127.0.0.1", 1)], InstanceInfo("item", "item-1", "127.0.0.1:2", "127.0.0.1:3"), lambda snapshot: None
    )
    client.ready = True  # the app answers its health probe
    assert not client.reported_ready
    client._install("control-plane")  # the first push applied
    assert client.reported_ready
    client.ready = False
    assert not client.reported_ready
