"""The control-plane client's bookkeeping (sidecar/net/control.py) without a socket: what a
push makes it serve, persist and answer, and the readiness the registry hears. The session
over a real socket is tested in tests/integration/test_control_plane.py."""

from __future__ import annotations

from pathlib import Path

from meshlet import wire
from sidecar.core.config import MeshSnapshot
from sidecar.net.control import ControlPlaneClient, InstanceInfo
from sidecar.net.health import AppHealth
from sidecar.net.persist import read_last_good

ITEM = [wire.endpoint("item-1", "127.0.0.1:9001")]


def _client(applied: list[MeshSnapshot], state_file: Path | None = None) -> ControlPlaneClient:
    return ControlPlaneClient(
        [("127.0.0.1", 1)],
        InstanceInfo("user", "user-1", "127.0.0.1:2", "127.0.0.1:3"),
        applied.append,
        app_health_url="http://127.0.0.1:4/healthz",
        state_file=state_file,
    )


def _answer(data: bytes) -> wire.Message:
    [message] = wire.FrameDecoder(wire.UPSTREAM_KINDS).feed(data)
    return message


def test_a_push_is_served_persisted_and_acked_and_a_bad_one_nacked_with_the_last_good_version(tmp_path: Path) -> None:
    applied: list[MeshSnapshot] = []
    client = _client(applied, tmp_path / "user.json")
    conn = wire.ClientConnection(client._hello())
    good = wire.Push(wire.ENDPOINTS, "v1", "n1", (wire.Resource("item", wire.content_version(ITEM), ITEM),))
    assert _answer(client._on_push(conn, good)) == wire.Ack(wire.ENDPOINTS, "v1", "n1")
    assert [s.source for s in applied] == ["control-plane"] and list(applied[0].services) == ["item"]
    persisted = read_last_good(tmp_path / "user.json")
    assert persisted is not None and persisted.versions() == client.config.versions()

    bad = wire.Push(wire.ENDPOINTS, "v2", "n2", (wire.Resource("cart", "x", [{"id": "c-1", "address": "nowhere"}]),))
    nack = _answer(client._on_push(conn, bad))
    assert isinstance(nack, wire.Nack) and (nack.version, nack.nonce, nack.names) == ("v1", "n2", ("cart",))
    assert nack.message.startswith("cart: ") and "nowhere" in nack.message
    assert (client.pushes_applied, client.nacks_sent) == (2, 1)


def test_a_push_of_an_unknown_type_is_acked_and_changes_nothing() -> None:
    applied: list[MeshSnapshot] = []
    client = _client(applied)
    conn = wire.ClientConnection(client._hello())
    push = wire.Push("secrets", "v1", "n1", (wire.Resource("x", "v", {}),))
    assert _answer(client._on_push(conn, push)) == wire.Ack("secrets", "v1", "n1")
    assert applied == [] and client.pushes_applied == 0


def test_a_restarted_sidecar_serves_its_persisted_config(tmp_path: Path) -> None:
    first: list[MeshSnapshot] = []
    before = _client(first, tmp_path / "user.json")
    push = wire.Push(wire.ENDPOINTS, "v1", "n1", (wire.Resource("item", wire.content_version(ITEM), ITEM),))
    before._on_push(wire.ClientConnection(before._hello()), push)
    again: list[MeshSnapshot] = []
    after = _client(again, tmp_path / "user.json")
    assert after.load_persisted() and after.has_config
    assert [s.source for s in again] == ["persisted"] and again[0].version == first[0].version
    assert after._hello().have == before._hello().have  # the control plane resends nothing it has
    assert not _client([], tmp_path / "other.json").load_persisted()


def test_the_registry_hears_ready_only_once_the_sidecar_has_a_configuration() -> None:
    """Its inbound listener refuses until then: callers must not be sent there before."""
    client = _client([])
    assert isinstance(client.health, AppHealth)
    client.health.ready = True  # the app answers its health probe
    assert not client.reported_ready
    client._install("control-plane")  # the first push applied
    assert client.reported_ready
    client.health.ready = False
    assert not client.reported_ready
