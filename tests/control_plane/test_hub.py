"""The hub: which sessions a change reaches (the subscription index) and how pushes go
out: written at once, one in flight per type, changes merged while one is."""

from __future__ import annotations

from typing import Any

import trio

from control_plane.push import Hub, Session, SessionView
from meshlet import wire


class Recorder:
    """A channel that keeps what was written."""

    blocked_since: float | None = None

    def __init__(self) -> None:
        self.frames: list[wire.Message] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.frames += wire.FrameDecoder().feed(data)

    def close(self) -> None:
        self.closed = True


def _world() -> tuple[dict[str, tuple[str, Any]], Hub]:
    state: dict[str, tuple[str, Any]] = {}
    return state, Hub(lambda type: state if type == wire.ENDPOINTS else {})


def _session(hub: Hub, node: str, watch: set[str] | None) -> tuple[Session, Recorder]:
    channel = Recorder()
    conn = wire.ServerConnection("cp")
    session = Session(
        node=node,
        service="svc",
        instance_id=node,
        conn=conn,
        views={wire.ENDPOINTS: SessionView(watch=watch), wire.POLICIES: SessionView()},
        connected_at=0.0,
        last_seen=0.0,
        channel=channel,
    )
    hub.add(session)
    return session, channel


def _set(state: dict[str, tuple[str, Any]], name: str, *ports: int) -> None:
    body = [wire.endpoint(f"{name}-{p}", f"127.0.0.1:{p}") for p in ports]
    state[name] = (wire.content_version(body), body)


def _pushes(channel: Recorder) -> list[wire.Push]:
    return [m for m in channel.frames if isinstance(m, wire.Push) and m.type == wire.ENDPOINTS]


def test_the_index_finds_watchers_and_wildcards_and_forgets_closed_sessions() -> None:
    _, hub = _world()
    a, _ = _session(hub, "a", {"item"})
    b, _ = _session(hub, "b", {"item", "pay"})
    c, _ = _session(hub, "c", None)
    assert hub.subscribers(wire.ENDPOINTS, {"item"}) == {a, b, c}
    assert hub.subscribers(wire.ENDPOINTS, {"pay"}) == {b, c}
    assert hub.subscribers(wire.ENDPOINTS, {"user"}) == {c}
    assert hub.watched(wire.ENDPOINTS) == 2
    hub.remove(b)
    assert hub.subscribers(wire.ENDPOINTS, {"pay"}) == {c}
    assert hub.watched(wire.ENDPOINTS) == 1
    assert set(hub.sessions) == {"a", "c"}


async def test_a_change_reaches_only_its_watchers_and_merges_behind_the_push_in_flight() -> None:
    state, hub = _world()
    _set(state, "item", 1)
    _set(state, "pay", 2)
    a, a_out = _session(hub, "a", {"item"})
    b, b_out = _session(hub, "b", {"pay"})
    hub.push_first(a)
    hub.push_first(b)
    (first_a,) = _pushes(a_out)
    assert first_a.full and [r.name for r in first_a.resources] == ["item"]
    await hub._publish({wire.ENDPOINTS: {"pay"}}, 0.0)
    assert len(_pushes(a_out)) == 1  # a does not watch pay: nothing for it
    assert len(_pushes(b_out)) == 1  # b's first push is not answered yet: the change waits
    _set(state, "pay", 2, 3)
    await hub._publish({wire.ENDPOINTS: {"pay"}}, 0.0)
    hub.answered(b, wire.ENDPOINTS, trio.current_time())
    first_b, second_b = _pushes(b_out)
    (resource,) = second_b.resources
    assert resource.name == "pay" and resource.is_delta and resource.version == state["pay"][0]


async def test_subscribing_answers_at_once_with_the_resource_or_its_absence() -> None:
    state, hub = _world()
    _set(state, "item", 1)
    a, out = _session(hub, "a", set())
    hub.push_first(a)
    hub.answered(a, wire.ENDPOINTS, trio.current_time())
    hub.subscribe(a, wire.ENDPOINTS, ("item", "nope"), (), trio.current_time())
    push = _pushes(out)[-1]
    assert [(r.name, r.missing) for r in push.resources] == [("item", False), ("nope", True)]
    hub.answered(a, wire.ENDPOINTS, trio.current_time())
    _set(state, "nope", 9)  # it appears: the watcher gets it
    await hub._publish({wire.ENDPOINTS: {"nope"}}, 0.0)
    push = _pushes(out)[-1]
    assert [(r.name, r.missing) for r in push.resources] == [("nope", False)]
    hub.subscribe(a, wire.ENDPOINTS, (), ("nope",), trio.current_time())
    assert hub.subscribers(wire.ENDPOINTS, {"nope"}) == set()
