"""control_plane.etcd.client: failover and error mapping over a mock transport, then every
operation, leases, compaction and watches on a real etcd (one member; three in
test_etcd_cluster.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from control_plane.etcd import Compacted, Etcd, EtcdError, EtcdUnavailable, LeaseNotFound
from control_plane.etcd import client as client_module

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
