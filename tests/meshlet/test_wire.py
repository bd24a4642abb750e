"""The push channel's wire protocol: golden bytes for protocol version 1, framing
limits, both ends' state machines, versions and endpoint deltas."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.wire import (
    MAX_FRAME,
    Ack,
    Bye,
    ClientConnection,
    Error,
    FrameDecoder,
    Health,
    Hello,
    Message,
    Nack,
    Ping,
    Pong,
    Push,
    Resource,
    ServerConnection,
    Watch,
    Welcome,
    WireError,
    apply_endpoint_delta,
    canonical_bytes,
    content_version,
    encode,
    endpoint,
    list_version,
    negotiate,
    type_version,
)

# Protocol version 1, byte for byte. A change here is a wire format change: it needs a
# new protocol version (docs/protocol.md), never an edit of these constants.
GOLDEN_V1 = [
    pytest.param(
        Hello(
            (1,),
            "node-1",
            "user",
            {
                "instance_id": "user-1",
                "address": "127.0.0.1:15006",
                "admin": "127.0.0.1:15090",
                "labels": {"zone": "a"},
            },
            {"endpoints": {"item": "0123456789ab"}},
        ),
        (
            "000000a486a16ba568656c6c6fa270769101a46e6f6465a66e6f64652d31a773657276696365a475736572a8696e7374"
            "616e636584ab696e7374616e63655f6964a6757365722d31a761646472657373af3132372e302e302e313a3135303036"
            "a561646d696eaf3132372e302e302e313a3135303930a66c6162656c7381a47a6f6e65a161a46861766581a9656e6470"
            "6f696e747381a46974656dac303132333435363738396162"
        ),
        id="hello",
    ),
    pytest.param(
        Welcome(1, "cp-1"),
        ("0000001b83a16ba777656c636f6d65a2707601a6736572766572a463702d31"),
        id="welcome",
    ),
    pytest.param(
        Push(
            "endpoints",
            "aabbccddeeff",
            "1",
            (Resource("item", "00112233aabb", [endpoint("item-1", "127.0.0.1:15106")]),),
            ("old",),
            True,
        ),
        (
            "0000008d87a16ba470757368a174a9656e64706f696e7473a176ac616162626363646465656666a16ea131a1729183a4"
            "6e616d65a46974656da3766572ac303031313232333361616262a4626f64799184a26964a66974656d2d31a761646472"
            "657373af3132372e302e302e313a3135313036a66c6162656c7380a677656967687401a2726d91a36f6c64a466756c6c"
            "c3"
        ),
        id="push-full",
    ),
    pytest.param(
        Push(
            "endpoints",
            "aabbccddee00",
            "2",
            (
                Resource(
                    "item", "99887766aabb", None, "00112233aabb", (endpoint("item-2", "127.0.0.1:15206"),), ("item-1",)
                ),
            ),
        ),
        (
            "000000a987a16ba470757368a174a9656e64706f696e7473a176ac616162626363646465653030a16ea132a1729185a4"
            "6e616d65a46974656da3766572ac393938383737363661616262a462617365ac303031313232333361616262a3616464"
            "9184a26964a66974656d2d32a761646472657373af3132372e302e302e313a3135323036a66c6162656c7380a6776569"
            "67687401a672656d6f766591a66974656d2d31a2726d90a466756c6cc2"
        ),
        id="push-delta",
    ),
    pytest.param(
        Ack("endpoints", "aabbccddeeff", "1"),
        ("0000002684a16ba361636ba174a9656e64706f696e7473a176ac616162626363646465656666a16ea131"),
        id="ack",
    ),
    pytest.param(
        Nack("policies", "", "3", "route item: unknown field 'foo'", ("item",)),
        (
            "0000004f85a16ba46e61636ba174a8706f6c6963696573a176a0a16ea133a365727282a36d7367bf726f757465206974"
            "656d3a20756e6b6e6f776e206669656c642027666f6f27a56e616d657391a46974656d"
        ),
        id="nack",
    ),
    pytest.param(
        Ping(7),
        ("0000000c82a16ba470696e67a2696407"),
        id="ping",
    ),
    pytest.param(
        Pong(7),
        ("0000000c82a16ba4706f6e67a2696407"),
        id="pong",
    ),
    pytest.param(
        Health(True),
        ("0000001182a16ba66865616c7468a57265616479c3"),
        id="health",
    ),
    pytest.param(
        Bye("draining"),
        ("0000001782a16ba3627965a6726561736f6ea8647261696e696e67"),
        id="bye",
    ),
    pytest.param(
        Error("unsupported-version", "sidecar speaks [2], control plane speaks [1]"),
        (
            "0000005683a16ba56572726f72a6726561736f6eb3756e737570706f727465642d76657273696f6ea36d7367d92c7369"
            "646563617220737065616b73205b325d2c20636f6e74726f6c20706c616e6520737065616b73205b315d"
        ),
        id="error",
    ),
]


# Protocol version 2 = version 1 + subscriptions: hello.watch, the watch message, and the
# answer for a watched name that does not exist (a resource without a body).
GOLDEN_V2 = [
    pytest.param(
        Hello(
            (1, 2),
            "node-1",
            "user",
            {"instance_id": "user-1", "address": "127.0.0.1:15006"},
            {"endpoints": {"item": "0123456789ab"}},
            {"endpoints": ("item", "pay")},
        ),
        (
            "0000009b87a16ba568656c6c6fa27076920102a46e6f6465a66e6f64652d31a773657276696365a475736572a8696e73"
            "74616e636582ab696e7374616e63655f6964a6757365722d31a761646472657373af3132372e302e302e313a31353030"
            "36a46861766581a9656e64706f696e747381a46974656dac303132333435363738396162a5776174636881a9656e6470"
            "6f696e747392a46974656da3706179"
        ),
        id="hello-watch",
    ),
    pytest.param(
        Watch("endpoints", ("pay",), ("old",)),
        "0000002a84a16ba57761746368a174a9656e64706f696e7473a361646491a3706179a672656d6f766591a36f6c64",
        id="watch",
    ),
    pytest.param(
        Push("endpoints", "aabbccddeeff", "3", (Resource("pay", "", None),)),
        (
            "0000004987a16ba470757368a174a9656e64706f696e7473a176ac616162626363646465656666a16ea133a1729183a4"
            "6e616d65a3706179a3766572a0a4626f6479c0a2726d90a466756c6cc2"
        ),
        id="push-missing",
    ),
]


@pytest.mark.parametrize(("message", "hex_bytes"), GOLDEN_V1 + GOLDEN_V2)
def test_golden_bytes(message: Message, hex_bytes: str) -> None:
    assert encode(message).hex() == hex_bytes
    assert FrameDecoder().feed(bytes.fromhex(hex_bytes)) == [message]


def test_frames_split_anywhere_decode_the_same() -> None:
    stream = b"".join(bytes.fromhex(p.values[1]) for p in GOLDEN_V1)
    expected = [p.values[0] for p in GOLDEN_V1]
    for step in (1, 2, 3, 7, 64, 1000):
        decoder = FrameDecoder()
        got: list[Message] = []
        for i in range(0, len(stream), step):
            got += decoder.feed(stream[i : i + step])
        assert got == expected, step


def _frame(payload: object) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(struct.pack(">I", MAX_FRAME + 1), "frame-too-large", id="oversized-length"),
        pytest.param(struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad-frame", id="not-msgpack"),
        pytest.param(_frame([1, 2]), "bad-message", id="not-a-map"),
        pytest.param(_frame({"k": "launch"}), "unknown-message", id="unknown-kind"),
        pytest.param(_frame({"x": 1}), "unknown-message", id="no-kind"),
        pytest.param(_frame({"k": "ping", "id": "seven"}), "bad-message", id="wrong-field-type"),
        pytest.param(
            _frame({"k": "hello", "pv": [], "node": "n", "service": "s", "instance": {}}),
            "bad-message",
            id="hello-without-versions",
        ),
        pytest.param(_frame({"k": "ack", "t": "endpoints", "v": "x"}), "bad-message", id="ack-without-nonce"),
        pytest.param(_frame({"k": "watch", "t": "endpoints", "add": [1]}), "bad-message", id="watch-non-string-name"),
        pytest.param(
            _frame({"k": "watch", "t": "endpoints", "add": ["s"] * 5000}), "bad-message", id="watch-too-many-names"
        ),
        pytest.param(
            _frame({"k": "hello", "pv": [2], "node": "n", "service": "s", "instance": {}, "watch": {"endpoints": "x"}}),
            "bad-message",
            id="hello-watch-not-a-list",
        ),
    ],
)
def test_malformed_frames(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        FrameDecoder().feed(data)
    assert info.value.reason == reason


def test_oversized_frame_rejected_before_its_body_arrives() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(WireError, match="frame-too-large"):
        decoder.feed(struct.pack(">I", 2048) + b"x" * 10)


def test_until_hello_is_accepted_the_server_takes_only_small_frames() -> None:
    from meshlet import wire

    with pytest.raises(WireError, match=f"max {wire.HELLO_MAX_FRAME}"):
        ServerConnection("cp").receive_data(struct.pack(">I", wire.HELLO_MAX_FRAME + 1))
    conn = ServerConnection("cp")
    conn.receive_data(encode(_hello()))
    with pytest.raises(WireError, match="frame-too-large"):  # received, not yet accepted
        conn.receive_data(struct.pack(">I", wire.HELLO_MAX_FRAME + 1))
    conn = ServerConnection("cp")
    conn.receive_data(encode(_hello()))
    conn.accept()
    assert conn.receive_data(struct.pack(">I", wire.HELLO_MAX_FRAME + 1)) == []  # waits for the frame


def test_each_side_refuses_the_other_sides_messages() -> None:
    with pytest.raises(WireError, match="unknown-message"):
        ServerConnection("cp").receive_data(encode(Welcome(1, "cp")))
    client = ClientConnection(_hello())
    with pytest.raises(WireError, match="unknown-message"):
        client.receive_data(encode(Ack("endpoints", "v", "1")))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_wire_error(data: bytes) -> None:
    try:
        FrameDecoder().feed(data)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
        max_leaves=10,
    )
)
def test_any_msgpack_value_only_ever_raises_wire_error(value: object) -> None:
    try:
        FrameDecoder().feed(_frame(value))
    except WireError:
        pass


# --- the two ends ----------------------------------------------------------------------------


def _hello(versions: tuple[int, ...] = (1,)) -> Hello:
    return Hello(versions, "node-1", "user", {"instance_id": "user-1", "address": "127.0.0.1:15006"})


def _connected() -> tuple[ServerConnection, ClientConnection]:
    server, client = ServerConnection("cp-1"), ClientConnection(_hello())
    (hello,) = server.receive_data(client.hello())
    assert isinstance(hello, Hello)
    (welcome,) = client.receive_data(server.accept())
    assert welcome == Welcome(1, "cp-1")
    return server, client


@pytest.mark.parametrize(
    ("theirs", "ours", "chosen"),
    [((1,), (1,), 1), ((1, 2), (1,), 1), ((1, 2, 3), (2, 3, 4), 3), ((2,), (1,), None), ((), (1,), None)],
)
def test_negotiate_picks_the_highest_common_version(
    theirs: tuple[int, ...], ours: tuple[int, ...], chosen: int | None
) -> None:
    assert negotiate(theirs, ours) == chosen


def test_unknown_protocol_version_is_refused() -> None:
    server = ServerConnection("cp-1")
    server.receive_data(ClientConnection(_hello((4, 5))).hello())
    with pytest.raises(WireError) as info:
        server.accept()
    assert info.value.reason == "unsupported-version"
    assert "[4, 5]" in info.value.detail


def test_first_message_must_be_hello() -> None:
    with pytest.raises(WireError, match="expected-hello"):
        ServerConnection("cp").receive_data(encode(Ping(1)))


def test_second_hello_is_a_protocol_error() -> None:
    server, client = _connected()
    with pytest.raises(WireError, match="unexpected-hello"):
        server.receive_data(client.hello())


def test_push_before_welcome_is_a_protocol_error() -> None:
    client = ClientConnection(_hello())
    with pytest.raises(WireError, match="expected-welcome"):
        client.receive_data(encode(Push("endpoints", "v", "1")))


def test_welcome_with_a_version_the_client_does_not_speak() -> None:
    with pytest.raises(WireError, match="unsupported-version"):
        ClientConnection(_hello()).receive_data(encode(Welcome(9, "cp")))


def test_ack_nack_and_stale_nonces() -> None:
    server, client = _connected()
    first, data = server.push("endpoints", "v1", (Resource("item", "r1", []),), full=True)
    (received,) = client.receive_data(data)
    assert received == first and first.nonce == "1"
    assert server.in_flight("endpoints")
    second, data = server.push("endpoints", "v2", (Resource("item", "r2", []),))
    client.receive_data(data)
    # The answer to the first push arrives late: stale, dropped, counted.
    assert server.receive_data(client.ack(first)) == []
    assert server.stale_answers == 1
    assert server.in_flight("endpoints")
    (ack,) = server.receive_data(client.ack(second))
    assert ack == Ack("endpoints", "v2", "2")
    assert server.acked == {"endpoints": "v2"} and not server.in_flight("endpoints")
    third, data = server.push("policies", "p1", (Resource("route-item", "x", {"bad": True}),))
    client.receive_data(data)
    (nack,) = server.receive_data(client.nack(third, "", "route-item: unknown field 'bad'", ("route-item",)))
    assert isinstance(nack, Nack) and nack.names == ("route-item",)
    assert server.last_nack == nack and "policies" not in server.acked


def test_keepalive_and_goodbye_pass_through() -> None:
    server, _client = _connected()
    messages = server.receive_data(encode(Ping(1)) + encode(Pong(2)) + encode(Health(False)) + encode(Bye("sigterm")))
    assert messages == [Ping(1), Pong(2), Health(False), Bye("sigterm")]


def test_watch_needs_version_2_and_hello_watch_scopes_only_then() -> None:
    scoped = Hello((1, 2), "n", "user", {}, {}, {"endpoints": ("item",)})
    server = ServerConnection("cp", versions=(1,))  # an older control plane: v1 only
    server.receive_data(encode(scoped))
    client = ClientConnection(scoped)
    client.receive_data(server.accept())
    assert client.protocol_version == 1 and not client.can_watch
    assert server.watches() == {"endpoints": None, "policies": None}  # v1: every resource
    with pytest.raises(WireError, match="unsupported-version"):
        client.watch("endpoints", ("pay",))
    with pytest.raises(WireError, match="unknown-message"):
        server.receive_data(encode(Watch("endpoints", ("pay",))))

    server = ServerConnection("cp")
    server.receive_data(encode(scoped))
    client = ClientConnection(scoped)
    client.receive_data(server.accept())
    assert client.protocol_version == 2 and client.can_watch
    assert server.watches() == {"endpoints": {"item"}, "policies": None}  # a type not named: every resource
    assert server.receive_data(client.watch("endpoints", ("pay",), ("item",))) == [
        Watch("endpoints", ("pay",), ("item",))
    ]


def test_error_is_readable_before_welcome() -> None:
    client = ClientConnection(_hello((5,)))
    assert client.receive_data(encode(Error("unsupported-version", "no"))) == [Error("unsupported-version", "no")]


# --- versions and deltas ---------------------------------------------------------------------


def test_content_version_ignores_map_key_order_and_sees_content() -> None:
    a = [{"id": "i1", "address": "h:1", "labels": {"zone": "a", "version": "v1"}, "weight": 1}]
    b = [{"weight": 1, "labels": {"version": "v1", "zone": "a"}, "address": "h:1", "id": "i1"}]
    assert content_version(a) == content_version(b)
    assert content_version(a) != content_version([{**a[0], "weight": 2}])
    assert len(content_version(a)) == 12
    assert type_version({"a": "1", "b": "2"}) == type_version({"b": "2", "a": "1"}) != type_version({"a": "1"})
    assert type_version({}) == ""


def test_endpoint_delta_applies_and_verifies() -> None:
    old = [endpoint("item-1", "127.0.0.1:1"), endpoint("item-2", "127.0.0.1:2")]
    new = [endpoint("item-2", "127.0.0.1:2"), endpoint("item-3", "127.0.0.1:3")]
    delta = Resource(
        "item", content_version(new), None, content_version(old), (endpoint("item-3", "127.0.0.1:3"),), ("item-1",)
    )
    assert apply_endpoint_delta(old, delta) == new
    wrong = Resource("item", "000000000000", None, content_version(old), (), ("item-1",))
    with pytest.raises(WireError, match="delta-mismatch"):
        apply_endpoint_delta(old, wrong)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 300, 65_536])
def test_list_version_is_content_version_from_cached_items(n: int) -> None:
    body = [endpoint(f"i-{k:06d}", f"127.0.0.1:{k % 60000 + 1}", {"zone": "a"} if k % 2 else None) for k in range(n)]
    assert list_version([canonical_bytes(e) for e in body]) == content_version(body)


SPAN_TOKEN = "mst_" + "a1B2-_" * 7


def test_welcome_carries_the_session_span_token_and_keeps_it_out_of_its_repr() -> None:
    server, client = ServerConnection("cp-1", api_port=15000), ClientConnection(_hello())
    server.receive_data(client.hello())
    (welcome,) = client.receive_data(server.accept(span_token=SPAN_TOKEN))
    assert welcome == Welcome(1, "cp-1", 15000, span_token=SPAN_TOKEN)
    assert SPAN_TOKEN not in repr(welcome)
    assert "span_token" not in Welcome(1, "cp-1").to_wire()  # none given: the frame is what it was


@pytest.mark.parametrize(
    "token",
    [
        "mst_abc\r\nx-forged: 1" + "a" * 16,  # a header of the control plane's choosing
        "mst_ a b c d e f g h i j k",
        "short",
        "mst_" + "a" * 300,
        12345678901234567890,
        ["mst_" + "a" * 43],
    ],
)
def test_a_span_token_that_could_not_be_sent_as_one_header_value_is_no_token(token: object) -> None:
    raw = {"k": "welcome", "pv": 1, "server": "cp", "api": 15000, "span_token": token}
    assert Welcome.from_wire(raw) == Welcome(1, "cp", 15000)


@pytest.mark.parametrize(
    ("raw_tls", "api_tls"), [(True, True), (None, False), (1, False), ("yes", False), (False, False)]
)
def test_welcome_says_the_api_speaks_https_only_with_a_true(raw_tls: object, api_tls: bool) -> None:
    raw = {"k": "welcome", "pv": 1, "server": "cp", "api": 15000}
    if raw_tls is not None:
        raw["api_tls"] = raw_tls
    assert Welcome.from_wire(raw) == Welcome(1, "cp", 15000, api_tls=api_tls)
    assert Welcome.from_wire(Welcome(1, "cp", 15000, api_tls=True).to_wire()).api_tls is True
    assert "api_tls" not in Welcome(1, "cp", 15000).to_wire()  # unchanged bytes for a plain API
