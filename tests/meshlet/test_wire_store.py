"""``store`` in hello and welcome (meshlet/wire.py): optional, absent when empty (older peers'
bytes unchanged), a short id when present, anything else a protocol error."""

from __future__ import annotations

import msgpack
import pytest

from meshlet import wire
from meshlet.wire import ClientConnection, FrameDecoder, Hello, ServerConnection, Welcome, WireError, encode

STORE = "0123456789abcdef0123456789abcdef"


def _hello(store: str = "") -> Hello:
    return Hello((1, 2), "node-1", "user", {"instance_id": "user-1"}, store=store)


def _frame(raw: dict[str, object]) -> bytes:
    body = msgpack.packb(raw, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def test_the_store_travels_both_ways() -> None:
    server = ServerConnection("cp", store=STORE)
    [hello] = server.receive_data(encode(_hello("a" * 32)))
    assert isinstance(hello, Hello) and hello.store == "a" * 32
    client = ClientConnection(_hello())
    [welcome] = client.receive_data(server.accept())
    assert isinstance(welcome, Welcome) and welcome.store == STORE


def test_absent_is_empty_and_empty_is_not_sent() -> None:
    assert "store" not in _hello().to_wire() and "store" not in Welcome(2, "cp").to_wire()
    assert encode(Welcome(2, "cp")) == encode(Welcome(2, "cp", store=""))
    [welcome] = FrameDecoder().feed(_frame({"k": "welcome", "pv": 2, "server": "cp"}))
    assert isinstance(welcome, Welcome) and welcome.store == ""


@pytest.mark.parametrize(
    "value", [7, True, None, ["a"], "x" * 65, "has space", "dots/../slash", "\u00e9t\u00e9", b"bytes"]
)
@pytest.mark.parametrize("kind", ["hello", "welcome"])
def test_anything_but_a_short_id_is_refused(kind: str, value: object) -> None:
    raw: dict[str, object] = _hello().to_wire() if kind == "hello" else {"k": "welcome", "pv": 2, "server": "cp"}
    raw["store"] = value
    with pytest.raises(WireError) as info:
        FrameDecoder().feed(_frame(raw))
    assert info.value.reason == "bad-message" and f"{kind}.store" in info.value.detail


def test_the_store_conflict_reason_is_part_of_the_contract() -> None:
    assert wire.STORE_CONFLICT == "store-conflict"
    assert wire.STORE_ID.fullmatch(STORE)
