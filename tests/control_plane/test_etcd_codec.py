"""control_plane.etcd.codec: the gateway's JSON both ways, pure. Shapes as etcd 3.4 sends them:
int64 as strings, default values left out; anything else is refused naming the field."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.etcd import codec
from control_plane.etcd.types import Compare, EtcdError, Event, KeyValue, Lease, LeaseNotFound, Op, OpResponse

HDR = {"cluster_id": "14655024145418835072", "member_id": "11046527456118344142", "revision": "7", "raft_term": "2"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def line(body: Any) -> bytes:
    return json.dumps(body).encode()  # (orjson refuses integers past 64 bits; a hostile peer need not)


# prefix_end and base64 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, end",
    [
        (b"/meshlet/", b"/meshlet0"),
        (b"a", b"b"),
        (b"a\xff", b"b"),
        (b"a\xfe\xff\xff", b"a\xff"),
        (b"\xff", b"\0"),
        (b"\xff\xff", b"\0"),
        (b"", b"\0"),
        (b"\0", b"\x01"),
    ],
)
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert codec.prefix_end(prefix) == end


@given(st.binary(max_size=12), st.binary(max_size=6))
def test_prefix_end_covers_exactly_the_keys_with_the_prefix(prefix: bytes, rest: bytes) -> None:
    end = codec.prefix_end(prefix)
    key = prefix + rest
    assert prefix <= key and (end == b"\0" or key < end)  # b"\0": to the end of the keyspace


@given(st.binary(max_size=12), st.binary(max_size=12))
def test_a_key_outside_the_prefix_is_outside_the_range(prefix: bytes, key: bytes) -> None:
    end = codec.prefix_end(prefix)
    if not key.startswith(prefix) and end != b"\0":
        assert not (prefix <= key < end)


@given(st.binary(max_size=64))
def test_base64_round_trips(data: bytes) -> None:
    assert codec.b64decode(codec.b64encode(data), "f") == data


@pytest.mark.parametrize("text, what", [("!!", "is not base64"), ("YQ", "is not base64"), (5, "a int, not a base64")])
def test_bad_base64_names_the_field(text: object, what: str) -> None:
    with pytest.raises(EtcdError, match=f"kvs\\[0\\].key: .*{what}"):
        codec.b64decode(text, "kvs[0].key")


# requests -------------------------------------------------------------------------------------


def test_requests() -> None:
    assert codec.range_request(b"a") == {"key": "YQ=="}
    assert codec.range_request(b"a", b"b", revision=5, serializable=True, keys_only=True, limit=3) == {
        "key": "YQ==",
        "range_end": "Yg==",
        "revision": "5",
        "serializable": True,
        "keys_only": True,
        "limit": "3",
    }
    assert codec.put_request(b"a", b"") == {"key": "YQ==", "value": ""}
    assert codec.put_request(b"a", b"v", lease=2**62) == {"key": "YQ==", "value": "dg==", "lease": str(2**62)}
    assert codec.delete_request(b"a", b"\0") == {"key": "YQ==", "range_end": "AA=="}
    assert codec.grant_request(10) == {"TTL": "10"}
    assert codec.lease_request(7) == {"ID": "7"}
    assert codec.compact_request(9) == {"revision": "9", "physical": True}
    assert codec.watch_request(b"/p/", b"/p0", 12) == {
        "create_request": {
            "key": b64(b"/p/"),
            "range_end": b64(b"/p0"),
            "start_revision": "12",
            "progress_notify": True,
            "prev_kv": True,
        }
    }
    assert "prev_kv" not in codec.watch_request(b"/p/", b"/p0", 1, prev_kv=False)["create_request"]


@pytest.mark.parametrize(
    "compare, expected",
    [
        (Compare.value(b"k", b"v"), {"target": "VALUE", "value": "dg=="}),
        (Compare.version(b"k", 3), {"target": "VERSION", "version": "3"}),
        (Compare.create_revision(b"k", 0), {"target": "CREATE", "create_revision": "0"}),
        (Compare.mod_revision(b"k", 9), {"target": "MOD", "mod_revision": "9"}),
        (Compare.lease(b"k", 77), {"target": "LEASE", "lease": "77"}),
    ],
)
def test_compares(compare: Compare, expected: dict[str, str]) -> None:
    assert codec.compare_json(compare) == {"key": "aw==", "result": "EQUAL", **expected}


def test_txn_request() -> None:
    body = codec.txn_request(
        [Compare.create_revision(b"k", 0)],
        [Op.put(b"k", b"v", lease=5), Op.delete(b"d"), Op.delete(b"p", b"q")],
        [Op.range(b"k"), Op.range(b"a", b"b")],
    )
    assert body["success"] == [
        {"request_put": {"key": "aw==", "value": "dg==", "lease": "5"}},
        {"request_delete_range": {"key": "ZA=="}},
        {"request_delete_range": {"key": "cA==", "range_end": "cQ=="}},
    ]
    assert body["failure"] == [
        {"request_range": {"key": "aw=="}},
        {"request_range": {"key": "YQ==", "range_end": "Yg=="}},
    ]
    assert codec.txn_request([], [])["failure"] == []


# responses ------------------------------------------------------------------------------------

KV = {
    "key": b64(b"/p/a"),
    "create_revision": "2",
    "mod_revision": "5",
    "version": "2",
    "value": b64(b"v"),
    "lease": "9",
}
KV_PARSED = KeyValue(b"/p/a", b"v", 2, 5, 2, 9)


def test_range_responses() -> None:
    assert codec.parse_range({"header": HDR, "kvs": [KV], "count": "1"}) == (7, [KV_PARSED])
    assert codec.parse_range({"header": HDR}) == (7, [])  # no kvs, no count: defaults left out
    # keys_only drops the value; a kv with defaults left out
    assert codec.parse_range({"header": HDR, "kvs": [{"key": b64(b"k"), "mod_revision": "3"}]}) == (
        7,
        [KeyValue(b"k", b"", 0, 3, 0, 0)],
    )


def test_write_responses() -> None:
    assert codec.parse_put({"header": HDR}) == 7
    assert codec.parse_delete({"header": HDR, "deleted": "2"}) == (7, 2)
    assert codec.parse_delete({"header": HDR}) == (7, 0)


def test_txn_responses() -> None:
    ok = {"header": HDR, "succeeded": True, "responses": [{"response_put": {"header": {"revision": "7"}}}]}
    result = codec.parse_txn(ok)
    assert (result.succeeded, result.revision, result.responses) == (True, 7, (OpResponse("put"),))
    failed = {"header": HDR, "responses": [{"response_range": {"header": HDR, "kvs": [KV], "count": "1"}}]}
    result = codec.parse_txn(failed)  # no "succeeded": false left out
    assert not result.succeeded and result.responses == (OpResponse("range", (KV_PARSED,), count=1),)
    deleted = codec.parse_txn(
        {"header": HDR, "succeeded": True, "responses": [{"response_delete_range": {"deleted": "1"}}]}
    )
    assert deleted.responses == (OpResponse("delete", deleted=1),)
    assert codec.parse_txn({"header": HDR, "succeeded": True}).responses == ()


def test_lease_responses() -> None:
    assert codec.parse_grant({"header": HDR, "ID": "2324035667078048527", "TTL": "10"}) == Lease(
        2324035667078048527, 10
    )
    assert codec.parse_keepalive({"result": {"header": HDR, "ID": "5", "TTL": "9"}}, 5) == 9
    with pytest.raises(LeaseNotFound, match="lease 5 not found"):  # a lease gone: no TTL
        codec.parse_keepalive({"result": {"header": HDR, "ID": "5"}}, 5)
    with pytest.raises(LeaseNotFound):
        codec.parse_keepalive({"result": {"header": HDR, "ID": "5", "TTL": "-1"}}, 5)


def test_status_response() -> None:
    body = {"header": HDR, "version": "3.4.23", "dbSize": "24576", "leader": "11046527456118344142", "raftTerm": "2"}
    status = codec.parse_status(body, "http://127.0.0.1:2379")
    assert (status.member_id, status.leader, status.raft_term, status.revision, status.db_size, status.version) == (
        "994d2631bf8889ce",
        "994d2631bf8889ce",
        2,
        7,
        24576,
        "3.4.23",
    )
    assert status.error == ""


@pytest.mark.parametrize(
    "body, error",
    [
        ({"header": HDR}, None),
        (
            {
                "error": "etcdserver: requested lease not found",
                "message": "etcdserver: requested lease not found",
                "code": 5,
            },
            (5, "etcdserver: requested lease not found"),
        ),
        ({"error": "x", "code": 11}, (11, "x")),  # 3.4 writes "error"; "message" alone as well
        ({"message": "m", "code": 3, "error": "e"}, (3, "m")),
        (
            {
                "error": {
                    "grpc_code": 14,
                    "http_code": 503,
                    "message": "etcdserver: no leader",
                    "http_status": "Service Unavailable",
                }
            },
            (14, "etcdserver: no leader"),
        ),
        ({"error": "e", "code": "14"}, (None, "e")),  # a code that is not a number: unknown
    ],
)
def test_gateway_errors(body: dict[str, Any], error: tuple[int | None, str] | None) -> None:
    found = codec.gateway_error(body)
    assert (None if found is None else (found.code, found.message)) == error


# watch ----------------------------------------------------------------------------------------


def test_watch_messages() -> None:
    created = codec.parse_watch_message(line({"result": {"header": HDR, "created": True}}))
    assert (created.kind, created.revision) == ("created", 7)
    put = {"kv": KV}
    delete = {"type": "DELETE", "kv": {"key": b64(b"/p/a"), "mod_revision": "6"}, "prev_kv": KV}
    events = codec.parse_watch_message(line({"result": {"header": HDR, "events": [put, delete]}}))
    assert events.kind == "events" and events.revision == 6
    assert events.events == (
        Event("put", KV_PARSED, None),
        Event("delete", KeyValue(b"/p/a", b"", 0, 6, 0, 0), KV_PARSED),
    )
    progress = codec.parse_watch_message(line({"result": {"header": {**HDR, "revision": "301"}}}))
    assert (progress.kind, progress.revision, progress.events) == ("progress", 301, ())
    canceled = codec.parse_watch_message(
        line({"result": {"header": {"cluster_id": "1"}, "canceled": True, "compact_revision": "14"}})
    )
    assert (canceled.kind, canceled.compact_revision) == ("canceled", 14)
    error = codec.parse_watch_message(
        line({"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader", "http_status": "x"}})
    )
    assert (error.kind, error.code, error.reason) == ("error", 14, "etcdserver: no leader")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"result": 5}, "result: a int, not an object"),
        ({}, "result: missing"),
        ({"result": {"events": [{"kv": KV}]}}, "result.header: missing"),
        ({"result": {"header": {"revision": "x"}}}, "result.header.revision: 'x' is not an integer"),
        ({"result": {"header": {"revision": 1.5}}}, "result.header.revision: 1.5 is not an integer"),
        ({"result": {"header": {"revision": True}}}, "result.header.revision: True is not an integer"),
        ({"result": {"header": {"revision": "1" * 30}}}, "is not an integer"),
        ({"result": {"header": HDR, "events": {}}}, "result.events: a dict, not a list"),
        (
            {"result": {"header": HDR, "events": [{"type": "PATCH", "kv": KV}]}},
            "events[0].type: 'PATCH' is not PUT or DELETE",
        ),
        ({"result": {"header": HDR, "events": [{}]}}, "events[0].kv: missing"),
        ({"result": {"header": HDR, "events": [{"kv": {"key": 1}}]}}, "events[0].kv.key: a int"),
        ({"result": {"header": HDR, "events": [{"kv": {"key": "YQ=="}}]}}, "events[0].kv.mod_revision: missing"),
        ({"result": {"header": HDR, "events": [{"kv": KV, "prev_kv": []}]}}, "events[0].prev_kv: a list"),
        ({"result": {"header": HDR, "canceled": True, "compact_revision": "x"}}, "compact_revision"),
    ],
)
def test_malformed_watch_messages(body: Any, field: str) -> None:
    with pytest.raises(EtcdError, match="unexpected answer from etcd: ") as info:
        codec.parse_watch_message(line(body))
    assert field in str(info.value)


def test_out_of_order_events_are_refused() -> None:
    late = {"kv": {**KV, "mod_revision": "3"}}
    with pytest.raises(EtcdError, match="out of order"):
        codec.parse_watch_message(line({"result": {"header": HDR, "events": [{"kv": KV}, late]}}))


@pytest.mark.parametrize("data", [b"", b"{", b"[1]", b"null", b"\xff\xfe", b'"text"'])
def test_not_a_json_object(data: bytes) -> None:
    with pytest.raises(EtcdError, match="etcd"):
        codec.loads(data, "/v3/kv/range")


@pytest.mark.parametrize(
    "parse, body, field",
    [
        (codec.parse_range, {"header": HDR, "kvs": [5]}, "kvs[0]: a int"),
        (codec.parse_range, {"kvs": []}, "header: missing"),
        (codec.parse_range, {"header": {}}, "header.revision: missing"),
        (
            codec.parse_range,
            {"header": HDR, "kvs": [{**KV, "version": None}]},
            "kvs[0].version: None is not an integer",
        ),
        (codec.parse_delete, {"header": HDR, "deleted": "-"}, "deleted: '-' is not an integer"),
        (codec.parse_txn, {"header": HDR, "succeeded": "yes"}, "succeeded: 'yes' is not a boolean"),
        (codec.parse_txn, {"header": HDR, "responses": [{"response_nothing": {}}]}, "responses[0]: none of"),
        (
            codec.parse_txn,
            {"header": HDR, "responses": [{"response_range": []}]},
            "responses[0].response_range: a list",
        ),
        (codec.parse_grant, {"header": HDR, "TTL": "10"}, "ID: missing"),
        (codec.parse_grant, {"header": HDR, "ID": {}, "TTL": "10"}, "ID: {} is not an integer"),
    ],
)
def test_malformed_responses(parse: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(EtcdError) as info:
        parse(body)
    assert field in str(info.value)


def test_malformed_keepalive_and_status() -> None:
    with pytest.raises(EtcdError, match="result: missing"):
        codec.parse_keepalive({"header": HDR}, 1)
    with pytest.raises(EtcdError, match="version: 5 is not a string"):
        codec.parse_status({"header": HDR, "version": 5}, "http://x:1")
    with pytest.raises(EtcdError, match="etcd refused the lease: too many"):
        codec.parse_grant({"header": HDR, "ID": "1", "error": "too many"})


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "result",
                    "header",
                    "revision",
                    "events",
                    "kv",
                    "key",
                    "type",
                    "created",
                    "canceled",
                    "error",
                    "compact_revision",
                    "mod_revision",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(_json_values)
def test_anything_else_is_a_message_or_an_etcd_error(value: Any) -> None:
    """Whatever arrives on a watch stream: a WatchMessage or EtcdError, never another exception."""
    try:
        codec.parse_watch_message(line(value))
    except EtcdError:
        pass
