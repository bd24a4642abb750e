"""control_plane.etcd.client: failover and error mapping over a mock transport, then every
operation, leases, compaction and watches on a real etcd (one member; three in
test_etcd_cluster.py)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
import trio

from control_plane.etcd import (
    Compacted,
    Compare,
    Etcd,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    LeaseNotFound,
    Op,
    OpResponse,
    TxnResult,
    Watch,
    WatchBatch,
    prefix_end,
)
from control_plane.etcd import client as client_module

from ..etcd_cluster import EtcdCluster

HDR = {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "2"}
A, B, C = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"


def mock(answers: dict[str, Callable[[httpx.Request], httpx.Response]], asked: list[str]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        endpoint = f"http://{request.url.host}:{request.url.port}"
        asked.append(endpoint)
        return answers[endpoint](request)

    return httpx.MockTransport(handle)


def ok(body: Any = None) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, content=orjson.dumps(body if body is not None else {"header": HDR}))


def status(code: int, body: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(code, content=orjson.dumps(body) if not isinstance(body, bytes) else body)


def raises(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    return handle


REFUSED = raises(httpx.ConnectError("connection refused"))
NO_LEADER = status(503, {"error": "etcdserver: no leader", "message": "etcdserver: no leader", "code": 14})
TIMED_OUT = raises(httpx.ReadTimeout("read timed out"))


async def test_a_request_moves_to_the_next_member_and_stays_there() -> None:
    asked: list[str] = []
    etcd = Etcd([A, B, C], transport=mock({A: REFUSED, B: NO_LEADER, C: ok()}, asked))
    assert await etcd.put(b"k", b"v") == 7
    assert asked == [A, B, C]
    asked.clear()
    assert await etcd.range(b"k") == (7, [])
    assert asked == [C]  # the member that last answered first
    await etcd.aclose()


@pytest.mark.parametrize(
    "answer, reason",
    [
        (REFUSED, "cannot connect (connection refused)"),
        (NO_LEADER, "etcdserver: no leader (code 14)"),
        (
            status(200, {"error": "etcdserver: request timed out", "code": 14}),
            "etcdserver: request timed out (code 14)",
        ),
        (status(502, b"<html>bad gateway</html>"), "HTTP 502"),
        (status(500, {"error": "boom", "code": 2}), "boom (code 2)"),
        (raises(httpx.RemoteProtocolError("server disconnected")), "RemoteProtocolError: server disconnected"),
    ],
)
async def test_every_member_failing_names_each(answer: Any, reason: str) -> None:
    asked: list[str] = []
    etcd = Etcd([A, B], transport=mock({A: answer, B: REFUSED}, asked))
    with pytest.raises(EtcdUnavailable) as info:
        await etcd.range(b"k")
    assert (
        str(info.value)
        == f"no etcd member answered /v3/kv/range: {A}: {reason}; {B}: cannot connect (connection refused)"
    )
    assert info.value.code == 14
    await etcd.aclose()


async def test_a_write_that_timed_out_may_have_been_applied() -> None:
    etcd = Etcd([A], timeout=2, transport=mock({A: TIMED_OUT}, []))
    with pytest.raises(EtcdUnavailable, match=r"timed out after 2s \(a write: it may have been applied\)"):
        await etcd.put(b"k", b"v")
    with pytest.raises(EtcdUnavailable) as info:
        await etcd.range(b"k")
    assert str(info.value).endswith("timed out after 2s")  # a read is simply retried by the caller
    await etcd.aclose()


@pytest.mark.parametrize(
    "answer, error, message",
    [
        (
            status(400, {"error": "etcdserver: mvcc: required revision has been compacted", "code": 11}),
            Compacted,
            "compacted",
        ),
        (status(404, {"error": "etcdserver: requested lease not found", "code": 5}), LeaseNotFound, "lease not found"),
        (
            status(400, {"error": "etcdserver: duplicate key given in txn request", "code": 3}),
            EtcdError,
            "duplicate key",
        ),
        (status(200, b"not json"), EtcdError, "is not JSON"),
        (status(200, {"header": {}}), EtcdError, "header.revision: missing"),
        (status(403, b""), EtcdError, "is not JSON"),
    ],
)
async def test_other_answers_are_raised_as_they_are(answer: Any, error: type[EtcdError], message: str) -> None:
    asked: list[str] = []
    etcd = Etcd([A, B], transport=mock({A: answer, B: ok()}, asked))
    with pytest.raises(error, match=message) as info:
        await etcd.range(b"k")
    assert type(info.value) is error
    assert asked == [A]  # an answer: no other member is asked
    await etcd.aclose()


async def test_an_answer_is_read_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_RESPONSE", 1000)
    etcd = Etcd([A], transport=mock({A: ok({"header": HDR, "padding": "x" * 2000})}, []))
    with pytest.raises(EtcdError, match="larger than 1000 bytes"):
        await etcd.range(b"k")
    await etcd.aclose()


async def test_revoking_a_lease_already_gone_is_not_an_error() -> None:
    etcd = Etcd(
        [A], transport=mock({A: status(404, {"error": "etcdserver: requested lease not found", "code": 5})}, [])
    )
    await etcd.revoke(5)
    with pytest.raises(LeaseNotFound):
        await etcd.keepalive(5)
    await etcd.aclose()


async def test_status_asks_every_member_and_never_raises() -> None:
    body = {"header": HDR, "version": "3.4.23", "leader": "2", "dbSize": "10"}
    etcd = Etcd([A, B, C], transport=mock({A: ok(body), B: REFUSED, C: ok({"header": 5})}, []))
    a, b, c = await etcd.status()
    assert (a.endpoint, a.member_id, a.leader, a.version, a.error) == (A, "2", "2", "3.4.23", "")
    assert (b.endpoint, b.error) == (B, "cannot connect (connection refused)")
    assert (c.endpoint, c.error) == (C, "unexpected answer from etcd: header: a int, not an object")
    await etcd.aclose()


@pytest.mark.parametrize(
    "endpoints, what",
    [
        ([], "at least one endpoint"),
        (["127.0.0.1:2379"], "is not a URL like http://127.0.0.1:2379"),
        (["http://127.0.0.1"], "is not a URL like"),
        (["ftp://h:1"], "is not a URL like"),
        (["http://h:1/v3"], "is not a URL like"),
        (["http://h:99999"], "is not a URL like"),
    ],
)
def test_bad_endpoints(endpoints: list[str], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        Etcd(endpoints)


def test_endpoints_are_kept_without_a_trailing_slash() -> None:
    assert Etcd(["http://127.0.0.1:2379/", "https://[::1]:2379"]).endpoints == (
        "http://127.0.0.1:2379",
        "https://[::1]:2379",
    )


# on a real etcd (one member for the module; each test under a prefix of its own) ---------------

WAIT = 15.0  # the bound on anything awaited from etcd: generous on a loaded machine


@pytest.fixture
async def etcd(etcd1: EtcdCluster) -> AsyncIterator[Etcd]:
    async with Etcd(etcd1.endpoints) as client:
        yield client


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> bytes:
    return f"/test/{request.node.name}/".encode()


async def test_put_range_delete(etcd: Etcd, prefix: bytes) -> None:
    a, b, c = prefix + b"a", prefix + b"b", prefix + b"c\xff\x00"
    first = await etcd.put(a, b"1")
    assert await etcd.put(b, b"") == first + 1
    assert await etcd.put(c, b"\x00\xff") == first + 2
    assert await etcd.put(a, b"2") == first + 3
    revision, kvs = await etcd.range(a)
    assert revision == first + 3
    assert kvs == [KeyValue(a, b"2", first, first + 3, 2, 0)]
    _, kvs = await etcd.range_prefix(prefix)
    assert [(kv.key, kv.value) for kv in kvs] == [(a, b"2"), (b, b""), (c, b"\x00\xff")]
    _, kvs = await etcd.range_prefix(prefix, keys_only=True, limit=2)
    assert [(kv.key, kv.value) for kv in kvs] == [(a, b""), (b, b"")]
    _, kvs = await etcd.range(a, revision=first)  # history
    assert [kv.value for kv in kvs] == [b"1"]
    _, kvs = await etcd.range(b, c, serializable=True)
    assert [kv.key for kv in kvs] == [b]
    assert await etcd.delete(prefix + b"missing") == (first + 3, 0)  # nothing deleted: no revision
    assert await etcd.delete(a, prefix_end(prefix)) == (first + 4, 3)
    assert await etcd.range_prefix(prefix) == (first + 4, [])


async def test_txn_create_if_absent(etcd: Etcd, prefix: bytes) -> None:
    key = prefix + b"leader"

    async def claim(value: bytes) -> TxnResult:
        return await etcd.txn([Compare.create_revision(key, 0)], [Op.put(key, value)], [Op.range(key)])

    won = await claim(b"a")
    assert won.succeeded and won.responses == (OpResponse("put"),)
    lost = await claim(b"b")
    assert not lost.succeeded and lost.revision == won.revision
    (response,) = lost.responses
    assert [(kv.key, kv.value, kv.mod_revision) for kv in response.kvs] == [(key, b"a", won.revision)]
    # every comparison, and several operations in one revision
    compares = [
        Compare.value(key, b"a"),
        Compare.version(key, 1),
        Compare.mod_revision(key, won.revision),
        Compare.create_revision(key, won.revision),
        Compare.lease(key, 0),
    ]
    both = await etcd.txn(compares, [Op.put(prefix + b"x", b"1"), Op.delete(key), Op.range(prefix, prefix_end(prefix))])
    assert both.succeeded and both.revision == won.revision + 1
    assert [r.kind for r in both.responses] == ["put", "delete", "range"] and both.responses[1].deleted == 1
    assert [kv.key for kv in both.responses[2].kvs] == [prefix + b"x"]
    assert not (await etcd.txn([Compare.value(key, b"a")], [Op.put(key, b"z")])).succeeded  # absent: false
    with pytest.raises(EtcdError, match="duplicate key") as info:
        await etcd.txn([], [Op.put(key, b"1"), Op.delete(key)])
    assert info.value.code == 3


async def test_lease_expiry_deletes_the_key(etcd: Etcd, prefix: bytes) -> None:
    lease = await etcd.grant(2)
    assert lease.ttl == 2
    key = prefix + b"instance"
    revision = await etcd.put(key, b"up", lease=lease.id)
    _, (kv,) = await etcd.range(key)
    assert kv.lease == lease.id
    async with etcd.watch(prefix, revision + 1) as watch:
        with trio.fail_after(WAIT):  # no keepalive: etcd deletes the key when the lease runs out
            batch = await _next_events(watch)
    (event,) = batch.events
    assert (event.type, event.kv.key, event.prev_kv and event.prev_kv.value) == ("delete", key, b"up")
    assert (await etcd.range(key))[1] == []
    with pytest.raises(LeaseNotFound):
        await etcd.keepalive(lease.id)


async def test_keepalive_and_revoke(etcd: Etcd, prefix: bytes) -> None:
    lease = await etcd.grant(30)
    assert 0 < await etcd.keepalive(lease.id) <= 30
    await etcd.put(prefix + b"k", b"v", lease=lease.id)
    await etcd.revoke(lease.id)
    assert (await etcd.range(prefix + b"k"))[1] == []  # revoking deletes the lease's keys
    with pytest.raises(LeaseNotFound, match=f"lease {lease.id:x} not found"):
        await etcd.keepalive(lease.id)
    await etcd.revoke(lease.id)  # gone already: not an error
    with pytest.raises(LeaseNotFound):
        await etcd.put(prefix + b"k", b"v", lease=lease.id)


async def test_a_watch_sees_every_change_once_in_order(etcd: Etcd, prefix: bytes) -> None:
    start = await etcd.put(prefix + b"a", b"1")
    await etcd.put(b"/elsewhere/" + prefix, b"not watched")
    await etcd.txn([], [Op.put(prefix + b"b", b"2"), Op.put(prefix + b"c", b"3")])  # one revision, two events
    await etcd.put(prefix + b"a", b"4")
    last = (await etcd.delete(prefix + b"b"))[0]
    seen: list[tuple[int, str, bytes, bytes | None]] = []
    async with etcd.watch(prefix, start) as watch:
        with trio.fail_after(WAIT):
            while watch.last_revision < last:
                batch = await _next_events(watch)
                seen += [(e.kv.mod_revision, e.type, e.kv.key, e.prev_kv and e.prev_kv.value) for e in batch.events]
                assert batch.revision == watch.last_revision == batch.events[-1].kv.mod_revision
        assert watch.connected and watch.error == ""
    p = prefix
    assert seen == [
        (start, "put", p + b"a", None),
        (start + 2, "put", p + b"b", None),
        (start + 2, "put", p + b"c", None),
        (start + 3, "put", p + b"a", b"1"),
        (start + 4, "delete", p + b"b", b"2"),
    ]
    assert not watch.connected and watch.error == "closed"


async def test_progress_notifications_advance_last_revision(etcd: Etcd, prefix: bytes) -> None:
    start = await etcd.put(prefix + b"a", b"1")
    async with etcd.watch(prefix, start + 1) as watch:
        outside = await etcd.put(b"/elsewhere/" + prefix, b"x")  # etcd moves on; the prefix is idle
        with trio.fail_after(WAIT):  # the fixtures' etcd notifies every second
            async for batch in watch:
                assert batch.events == ()
                if batch.revision >= outside:
                    break
        assert watch.last_revision == batch.revision >= outside


async def test_a_watch_below_the_compaction_raises_compacted(etcd: Etcd, prefix: bytes) -> None:
    start = await etcd.put(prefix + b"a", b"1")
    now = await etcd.put(prefix + b"a", b"2")
    await etcd.compact(now)
    with pytest.raises(Compacted, match="compacted") as info:
        await etcd.range(prefix + b"a", revision=start)
    async with etcd.watch(prefix, start) as watch:
        with pytest.raises(Compacted, match=f"compacted at revision {now}") as info:
            with trio.fail_after(WAIT):
                await watch.__anext__()
    assert info.value.compact_revision == now
    assert not watch.connected
    async with etcd.watch(prefix, now) as watch:  # from the compaction on: fine
        with trio.fail_after(WAIT):
            batch = await _next_events(watch)
        assert [e.kv.value for e in batch.events] == [b"2"]


async def test_a_watch_is_cancellable_and_leaves_nothing_running(etcd: Etcd, prefix: bytes) -> None:
    start = await etcd.put(prefix + b"a", b"1")
    before = _tasks()
    watch = etcd.watch(prefix, start + 1)
    with trio.move_on_after(0.5) as scope:  # nothing comes: the iteration is cancelled
        async for _ in watch:
            pass
    assert scope.cancelled_caught
    await watch.aclose()
    assert [_ async for _ in watch] == []  # closed: ends
    assert _tasks() == before  # no task of its own


async def test_status_of_one_member(etcd: Etcd, etcd1: EtcdCluster) -> None:
    (status,) = await etcd.status()
    assert status.error == "" and status.endpoint == etcd1.endpoints[0]
    assert status.leader == status.member_id and status.version.startswith("3.")
    assert status.revision >= 1 and status.raft_term >= 1 and status.db_size > 0


def _tasks() -> set[trio.lowlevel.Task]:
    found, nurseries = set(), list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            found.add(task)
            nurseries += task.child_nurseries
    return found


async def _next_events(watch: Watch) -> WatchBatch:
    """The next batch with events (progress notifications skipped)."""
    async for batch in watch:
        if batch.events:
            return batch
    raise AssertionError(f"the watch ended: {watch.error}")


async def test_a_closed_client_says_so() -> None:
    etcd = Etcd([A], transport=mock({A: ok()}, []))
    await etcd.aclose()
    with pytest.raises(trio.ClosedResourceError, match="the etcd client is closed"):
        await etcd.range(b"k")


def _stream(*lines: object, end: BaseException | None = None) -> Callable[[httpx.Request], httpx.Response]:
    """A watch stream that sends ``lines`` (JSON objects a line each, or bytes as they are), then ends
    (cleanly, or with ``end`` raised)."""

    async def body() -> AsyncIterator[bytes]:
        for line in lines:
            yield line if isinstance(line, bytes) else orjson.dumps(line) + b"\n"
        if end is not None:
            raise end

    return lambda request: httpx.Response(200, content=body())


def _events(*revisions: int) -> dict[str, Any]:
    kvs = [{"kv": {"key": "YQ==", "mod_revision": str(r), "create_revision": "1", "version": "1"}} for r in revisions]
    return {"result": {"header": {**HDR, "revision": str(max(revisions))}, "events": kvs}}


CREATED = {"result": {"header": HDR, "created": True}}


async def test_a_watch_resumes_on_the_next_member_without_a_gap_or_a_repeat() -> None:
    asked: list[tuple[str, Any, str | None]] = []
    streams = {
        A: _stream(CREATED, _events(5, 6), end=httpx.ReadError("connection reset")),
        B: _stream(CREATED, _events(6, 7), {"result": {"header": {**HDR, "revision": "9"}}}, b"not json\n"),
        C: _stream({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}}),
    }
    order = [A, B, C, A]

    def handle(request: httpx.Request) -> httpx.Response:
        endpoint = f"http://{request.url.host}:{request.url.port}"
        body = orjson.loads(request.content)["create_request"]
        asked.append((endpoint, body["start_revision"], request.headers.get("Grpc-Metadata-hasleader")))
        if len(asked) == len(order):
            return _stream(CREATED, _events(8, 10))(request)
        return streams[endpoint](request)

    etcd = Etcd([A, B, C], transport=httpx.MockTransport(handle))
    batches = []
    async with etcd.watch(b"a", 5, rng=random.Random(0)) as watch:
        with trio.fail_after(10):
            async for batch in watch:
                batches.append((batch.revision, [e.kv.mod_revision for e in batch.events]))
                if watch.last_revision >= 10:
                    break
        assert watch.connected and watch.error == "" and watch.reconnects == 3
    assert asked == [(A, "5", "true"), (B, "7", "true"), (C, "10", "true"), (A, "10", "true")]
    # 6 again from B: dropped; the progress notification at 9 moves on; 8 after it: dropped
    assert batches == [(6, [5, 6]), (7, [7]), (9, []), (10, [10])]
    await etcd.aclose()


async def test_a_watch_reports_why_it_is_not_connected() -> None:
    refusing = Etcd([A, B], transport=mock({A: REFUSED, B: NO_LEADER}, []))
    watch = refusing.watch(b"a", 1, rng=random.Random(0))
    with trio.move_on_after(1):
        await watch.__anext__()
    assert not watch.connected and watch.reconnects >= 2
    assert watch.error in (f"{A}: cannot open a watch (ConnectError: connection refused)", f"{B}: HTTP 503")
    await watch.aclose()
    await refusing.aclose()


async def test_a_watch_message_is_read_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_RESPONSE", 1000)
    for line in (b"x" * 3000, b"x" * 1001 + b"\n"):  # a line too long, whether or not it has ended
        etcd = Etcd([A], transport=httpx.MockTransport(_stream(CREATED, line)))
        async with etcd.watch(b"a", 1) as watch:
            with pytest.raises(EtcdError, match="a watch message larger than 1000 bytes"), trio.fail_after(5):
                await watch.__anext__()
        await etcd.aclose()


async def test_every_member_is_tried_once_while_other_calls_move_the_current_one() -> None:
    """A call that waits on a member while another call succeeds elsewhere still tries each member
    once (it used to recompute from the moved 'current' member: one twice, one never)."""
    asked: list[str] = []
    etcd: Etcd

    def b_times_out_while_another_call_succeeds_on_b(request: httpx.Request) -> httpx.Response:
        etcd._current = 1  # a concurrent call's success on B, during this call's wait on B
        raise httpx.ReadTimeout("read timed out")

    etcd = Etcd(
        [A, B, C], transport=mock({A: REFUSED, B: b_times_out_while_another_call_succeeds_on_b, C: ok()}, asked)
    )
    assert await etcd.put(b"k", b"v") == 7
    assert asked == [A, B, C]
    await etcd.aclose()
