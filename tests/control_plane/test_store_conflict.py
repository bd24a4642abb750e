"""A control plane whose store lacks policies a sidecar holds from another store
(control_plane/push.py, server.py): it says so in status and its metric from the hello on, never
pushes their removal, and lists what it has even at the version held so the sidecar can adopt it;
once the sidecar holds nothing this store lacks, the conflict is gone and the store is the
sidecar's."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from control_plane.api import build_api
from control_plane.policies import PolicyStore
from control_plane.push import Session, SessionView
from control_plane.registry import Registry
from control_plane.server import CONFLICTS_LOGGED, PushServer
from control_plane.store import MemoryStore
from meshlet import wire
from tests.helpers import in_process_joins

from .test_hub import Recorder

OLD = "a" * 32
DENY = "AccessPolicy/item-callers"
ROUTE = "Route/item"
DENY_YAML = "kind: AccessPolicy\nname: item-callers\nservice: item\nrules:\n  - sources: [user]\n"
ROUTE_YAML = "kind: Route\nname: item\nhost: item\nrules:\n  - {name: all, destinations: [{service: item}]}\n"


def _wanted(*names: str) -> dict[str, tuple[str, Any]]:
    return {name: ("v1", {"name": name}) for name in names}


def test_a_view_from_another_store_lists_what_it_has_and_removes_nothing_held() -> None:
    view = SessionView.from_hello({DENY: "v1", ROUTE: "v1"})
    wanted = _wanted(ROUTE, "Route/new")
    view.foreign(OLD, "b" * 32, wanted)
    assert view.kept == {DENY} and view.unvouched == {DENY, ROUTE}
    resources, removed = view.plan(wanted, None, full=True)
    assert [r.name for r in resources] == ["Route/item", "Route/new"]  # Route/item too, at the version held
    assert removed == ()  # DENY is the sidecar's to keep
    view.sent(resources, removed, wanted)
    assert view.unvouched == {DENY} and view.kept == {DENY}
    assert view.plan(wanted, {DENY}, full=False) == ((), ())  # a later change of DENY: still nothing
    wanted[DENY] = ("v1", {"name": DENY})  # re-applied here: listed, and the conflict is over
    resources, removed = view.plan(wanted, {DENY}, full=False)
    assert [r.name for r in resources] == [DENY] and removed == ()
    view.sent(resources, removed, wanted)
    assert view.unvouched == set() and view.kept == set()


def test_the_same_store_is_no_conflict() -> None:
    view = SessionView.from_hello({DENY: "v1"})
    view.foreign(OLD, OLD, {})
    assert view.kept == set() and view.unvouched == set()
    assert view.plan({}, None, full=True) == ((), (DENY,))


def test_a_refused_removal_is_restored_and_never_pushed_again() -> None:
    """A removal that went out anyway (the sidecar knew more than its hello said) and came
    back in a store-conflict NACK."""
    view = SessionView.from_hello({DENY: "v1"})
    previous = dict(view.held)
    resources, removed = view.plan({}, None, full=True)
    assert removed == (DENY,)
    view.sent(resources, removed, {})
    view.refused_removal([DENY], previous)
    assert view.held == previous and view.kept == {DENY}
    assert view.plan({}, {DENY}, full=False) == ((), ())


async def _read(stream: trio.SocketStream, conn: wire.ClientConnection, want: int) -> list[wire.Message]:
    messages: list[wire.Message] = []
    with trio.fail_after(10):
        while len(messages) < want:
            messages += [m for m in conn.receive_data(await stream.receive_some()) if not isinstance(m, wire.Ping)]
    return messages


async def test_a_sidecar_holding_policies_from_another_store(nursery: trio.Nursery) -> None:
    store = MemoryStore()
    policies = PolicyStore(store)
    await policies.apply([("route.yaml", ROUTE_YAML)], source="test", now=0.0)
    joins, token = in_process_joins()
    push = PushServer(Registry(), policies=policies, store_id=store.id, joins=joins)
    port = await nursery.start(push.serve, "127.0.0.1", 0)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, build_api(push, token="t"), config))  # type: ignore[arg-type]
    api = httpx.AsyncClient(base_url=binds[0], timeout=10)

    held = {DENY: "0123456789ab", ROUTE: push.wanted(wire.POLICIES)[ROUTE][0]}
    hello = wire.Hello(
        (1, 2),
        "item-1",
        "item",
        {"instance_id": "item-1", "address": "127.0.0.1:9", "admin": "127.0.0.1:10"},
        {wire.POLICIES: held},
        store=OLD,
        token=token,
    )
    conn = wire.ClientConnection(hello)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(conn.hello())
    welcome, *pushes = await _read(stream, conn, 3)
    assert isinstance(welcome, wire.Welcome) and welcome.store == store.id
    [first] = [p for p in pushes if isinstance(p, wire.Push) and p.type == wire.POLICIES]
    assert first.full and [r.name for r in first.resources] == [ROUTE] and first.removed == ()

    # Known from the hello, before any answer.
    [session] = push.hub.sessions.values()
    status = (await api.get("/v1/status")).json()
    assert (status["store"], status["store_conflicts"]) == (store.id, 1)
    [sidecar] = status["sidecars"]
    assert sidecar["policies_store"] == OLD
    assert sidecar["store_conflict"]["kept"] == [DENY] and "re-apply" in sidecar["store_conflict"]["hint"]
    assert "meshlet_cp_store_conflicts 1.0" in (await api.get("/metrics")).text

    # The sidecar keeps DENY and says so; nothing is pushed again for it.
    message = f"{wire.STORE_CONFLICT}: kept {DENY}: ..."
    await stream.send_all(conn.nack(first, "", message, (DENY,)))
    for other in pushes:
        if isinstance(other, wire.Push) and other is not first:
            await stream.send_all(conn.ack(other))
    await trio.sleep(0.3)  # a debounce and more: a push for DENY would be out by then
    assert session.store_conflict() is not None and push.store_conflicts() == 1
    assert push.hub.nacks_total == 1 and session.in_flight == {}

    # The policy applied to this store too: listed, ACKed, and the sidecar's store is this one.
    before = push.wanted(wire.POLICIES)
    await policies.apply([("all.yaml", DENY_YAML + "---\n" + ROUTE_YAML)], source="test", now=1.0)
    push.policies_changed(before)
    [again] = await _read(stream, conn, 1)
    assert isinstance(again, wire.Push) and [r.name for r in again.resources] == [DENY] and again.removed == ()
    await stream.send_all(conn.ack(again))
    with trio.fail_after(5):
        while session.store != store.id:  # noqa: ASYNC110 - the server's reader task
            await trio.sleep(0.01)
    status = (await api.get("/v1/status")).json()
    assert status["store_conflicts"] == 0 and status["sidecars"][0]["store_conflict"] is None
    assert status["sidecars"][0]["policies_store"] == store.id
    assert "meshlet_cp_store_conflicts 0.0" in (await api.get("/metrics")).text
    await stream.aclose()
    await api.aclose()


def test_a_nack_cannot_make_the_view_grow() -> None:
    view = SessionView.from_hello({DENY: "v1"})
    view.refused_removal([DENY, "AccessPolicy/never-held", "x" * 1000], {})
    assert view.kept == {DENY} and set(view.held) == {DENY}


def test_one_log_line_per_set_of_policies_kept(caplog: pytest.LogCaptureFixture) -> None:
    push = PushServer(Registry(), store_id="b" * 32)

    def session(node: str, held: dict[str, str]) -> Session:
        view = SessionView.from_hello(held)
        view.foreign(OLD, push.store_id, {})
        conn = wire.ServerConnection("cp")
        return Session(node, "item", node, conn, {wire.POLICIES: view}, 0.0, 0.0, Recorder(), store=OLD)

    with caplog.at_level(logging.WARNING, "meshlet.cp.server"):
        for node in ("item-1", "item-2", "item-3"):
            push._log_conflict(session(node, {DENY: "v1"}))  # a restart on an empty store: all alike
        push._log_conflict(session("user-1", {DENY: "v1", ROUTE: "v1"}))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "sidecar item-1 keeps AccessPolicy/item-callers from store" in lines[0]
    assert f"{DENY}, {ROUTE}" in lines[1]
    for n in range(CONFLICTS_LOGGED + 5):
        push._log_conflict(session(f"n-{n}", {f"AccessPolicy/p{n}": "v1"}))
    assert len(push._conflicts_logged) == CONFLICTS_LOGGED  # bounded
