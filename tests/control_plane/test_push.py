"""What the control plane decides to push (SessionView): full snapshots, deltas,
removals, and never re-pushing a version a sidecar rejected."""

from __future__ import annotations

from control_plane import wire
from control_plane.push import SessionView


def _ep(i: int) -> dict[str, object]:
    return wire.endpoint(f"item-{i}", f"127.0.0.1:{9000 + i}")


def _resource(body: list[dict[str, object]]) -> tuple[str, list[dict[str, object]]]:
    return wire.content_version(body), body


def test_first_full_push_sends_everything_and_removes_what_is_gone() -> None:
    view = SessionView.from_hello({"old": "aaaaaaaaaaaa", "user": wire.content_version([_ep(5)])})
    wanted = {"item": _resource([_ep(1)]), "user": _resource([_ep(5)])}
    resources, removed = view.plan(wanted, None, full=True)
    assert [r.name for r in resources] == ["item"]  # user: the sidecar has it at this version
    assert removed == ("old",)
    view.sent(resources, removed, wanted)
    assert view.plan(wanted, None, full=True) == ((), ())


def test_endpoint_changes_go_as_deltas_that_the_sidecar_can_verify() -> None:
    view = SessionView()
    before = [_ep(i) for i in range(1, 6)]
    wanted = {"item": _resource(before)}
    view.sent(*view.plan(wanted, None, full=True), wanted)
    after = [_ep(i) for i in range(1, 7)]  # one more instance
    wanted = {"item": _resource(after)}
    (resource,), removed = view.plan(wanted, {"item"}, full=False)
    assert removed == ()
    assert resource.is_delta and resource.add == (_ep(6),) and resource.remove == ()
    assert wire.apply_endpoint_delta(before, resource) == after


def test_a_delta_no_smaller_than_the_whole_is_sent_whole() -> None:
    view = SessionView()
    wanted = {"item": _resource([_ep(1)])}
    view.sent(*view.plan(wanted, None, full=True), wanted)
    wanted = {"item": _resource([_ep(2)])}
    (resource,), _ = view.plan(wanted, {"item"}, full=False)
    assert not resource.is_delta and resource.body == [_ep(2)]


def test_a_reconnecting_sidecar_without_bodies_gets_whole_resources() -> None:
    view = SessionView.from_hello({"item": "000000000000"})
    wanted = {"item": _resource([_ep(1), _ep(2)])}
    (resource,), _ = view.plan(wanted, None, full=True)
    assert not resource.is_delta


def test_a_rejected_version_is_not_pushed_again_but_the_next_one_is() -> None:
    view = SessionView()
    good = {"item": _resource([_ep(1)])}
    view.sent(*view.plan(good, None, full=True), good)
    bad = {"item": ("badbadbadbad", [{"id": "x", "address": "nowhere"}])}
    resources, removed = view.plan(bad, {"item"}, full=False)
    previous = {"item": view.held["item"]}
    view.sent(resources, removed, bad)
    view.nacked(["item"], previous, {"item": "badbadbadbad"})
    assert view.held["item"] == good["item"]  # the sidecar still runs the good one
    assert view.plan(bad, {"item"}, full=False) == ((), ())
    newer = {"item": _resource([_ep(1), _ep(3)])}
    (resource,), _ = view.plan(newer, {"item"}, full=False)
    assert resource.version == newer["item"][0]


def test_type_version_follows_what_the_sidecar_holds() -> None:
    view = SessionView()
    assert view.type_version() == ""
    wanted = {"item": _resource([_ep(1)])}
    view.sent(*view.plan(wanted, None, full=True), wanted)
    assert view.type_version() == wire.type_version({"item": wanted["item"][0]})
