"""What the control plane decides to push (SessionView): full snapshots, deltas,
removals, and never re-pushing a version a sidecar rejected."""

from __future__ import annotations

from control_plane.push import SessionView
from meshlet import wire


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


# --- subscriptions (protocol version 2) ---------------------------------------------------


def test_a_scoped_view_gets_only_what_it_watches_and_hears_once_about_what_is_missing() -> None:
    view = SessionView(watch={"item", "pay"})
    wanted = {"item": _resource([_ep(1)]), "user": _resource([_ep(5)])}
    resources, removed = view.plan(wanted, None, full=True)
    assert [(r.name, r.missing) for r in resources] == [("item", False), ("pay", True)]
    assert removed == ()
    view.sent(resources, removed, wanted)
    assert view.missing == {"pay"}
    assert view.plan(wanted, {"pay", "user"}, full=False) == ((), ())  # told once; user not watched
    wanted["pay"] = _resource([_ep(7)])
    (resource,), _ = view.plan(wanted, {"pay"}, full=False)
    assert resource.name == "pay" and not resource.missing and not resource.is_delta
    view.sent((resource,), (), wanted)
    assert view.missing == set() and set(view.held) == {"item", "pay"}


def test_a_watched_name_that_goes_away_is_removed_and_comes_back_when_it_returns() -> None:
    view = SessionView(watch={"item"})
    wanted = {"item": _resource([_ep(1)])}
    view.sent(*view.plan(wanted, None, full=True), wanted)
    resources, removed = view.plan({}, {"item"}, full=False)
    assert resources == () and removed == ("item",)
    view.sent(resources, removed, {})
    assert view.missing == {"item"} and view.plan({}, {"item"}, full=False) == ((), ())
    (resource,), _ = view.plan(wanted, {"item"}, full=False)
    assert resource.body == wanted["item"][1]


def test_subscribing_again_answers_even_a_name_the_sidecar_holds() -> None:
    view = SessionView(watch={"item"})
    wanted = {"item": _resource([_ep(1)])}
    view.sent(*view.plan(wanted, None, full=True), wanted)
    answer = view.subscribe({"item", "pay"})
    assert answer == {"item", "pay"}
    resources, _ = view.plan(wanted, answer, full=False)
    assert [(r.name, r.missing) for r in resources] == [("item", False), ("pay", True)]


def test_unsubscribed_names_are_forgotten_and_no_longer_pushed() -> None:
    view = SessionView(watch={"item", "pay"})
    wanted = {"item": _resource([_ep(1)]), "pay": _resource([_ep(2)])}
    view.sent(*view.plan(wanted, None, full=True), wanted)
    view.unsubscribe({"pay"})
    assert set(view.held) == {"item"} and view.watch == {"item"}
    wanted["pay"] = _resource([_ep(3)])
    assert view.plan(wanted, {"pay"}, full=False) == ((), ())


def test_a_wildcard_view_ignores_subscriptions() -> None:
    view = SessionView()
    assert view.subscribe({"x"}) == {"x"}
    assert view.watch is None
    wanted = {"a": _resource([_ep(1)])}
    (resource,), _ = view.plan(wanted, None, full=True)
    assert resource.name == "a"


def test_names_kept_while_warming_up_are_not_removed() -> None:
    view = SessionView.from_hello({"item": "0123456789ab"}, watch={"item", "pay"})
    resources, removed = view.plan({}, None, full=True, keep={"item", "pay"})
    assert removed == ()  # the control plane does not know yet whether item still exists
    assert [(r.name, r.missing) for r in resources] == [("pay", True)]  # it holds no pay: nothing to lose
    resources, removed = view.plan({}, None, full=True)
    assert removed == ("item",) and [(r.name, r.missing) for r in resources] == [("pay", True)]
