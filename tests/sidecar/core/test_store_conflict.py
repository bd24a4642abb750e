"""Which policies a push from another store may remove (sidecar/core/store_conflict.py): none
of those held from the old store until the new one lists them; everything else applies."""

from __future__ import annotations

import pytest

from meshlet import wire
from sidecar.core.store_conflict import conflict_message, decide, unvouched

DENY = "AccessPolicy/item-callers"
ROUTE = "Route/item"
NEW = "Route/pay"


def _resource(name: str, version: str = "v2") -> wire.Resource:
    return wire.Resource(name, version, {"kind": name.split("/")[0]})


def _push(*resources: wire.Resource, removed: tuple[str, ...] = (), full: bool = False) -> wire.Push:
    return wire.Push(wire.POLICIES, "tv", "1", resources, removed, full)


@pytest.mark.parametrize(
    "held_store, session_store, held, expected",
    [
        ("", "b", (), set()),  # a fresh sidecar: nothing to vouch for, it adopts any store
        ("a", "a", (DENY, ROUTE), set()),  # the store its policies came from
        ("a", "b", (DENY, ROUTE), {DENY, ROUTE}),  # another store: everything held
        ("", "b", (DENY,), {DENY}),  # held from a store not known (persisted by an older build)
        ("a", "", (DENY,), {DENY}),  # a control plane that names no store
        ("", "", (DENY,), set()),  # neither knows store ids: as before them
    ],
)
def test_what_a_session_must_vouch_for(
    held_store: str, session_store: str, held: tuple[str, ...], expected: set[str]
) -> None:
    assert unvouched(held_store, session_store, held) == expected


@pytest.mark.parametrize(
    "case, push, unvouched_before, applied_resources, applied_removed, kept, adopt",
    [
        (
            "same store: a removal is a removal",
            _push(removed=(DENY,), full=True),
            set(),
            (),
            (DENY,),
            (),
            True,
        ),
        (
            "other store, full push removing what it lacks: kept, the rest applied",
            _push(_resource(NEW), removed=(DENY,), full=True),
            {DENY, ROUTE},
            (NEW,),
            (),
            (DENY, ROUTE),  # ROUTE neither listed nor removed: not vouched for either
            False,
        ),
        (
            "other store, full push listing everything held: adopted",
            _push(_resource(DENY, "v1"), _resource(ROUTE), full=True),
            {DENY, ROUTE},
            (DENY, ROUTE),
            (),
            (),
            True,
        ),
        (
            "other store, a change is applied, only the removal refused",
            _push(_resource(ROUTE, "v9"), removed=(DENY,)),
            {DENY, ROUTE},
            (ROUTE,),
            (),
            (DENY,),
            False,
        ),
        (
            "other store, a resource without a body is a removal too",
            _push(wire.Resource(DENY, "", None)),
            {DENY},
            (),
            (),
            (DENY,),
            False,
        ),
        (
            "mixed: a vouched name may be removed, an unvouched one not",
            _push(removed=(NEW, DENY)),
            {DENY},
            (),
            (NEW,),
            (DENY,),
            False,
        ),
        (
            "other store, the last unvouched one listed: adopted",
            _push(_resource(DENY)),
            {DENY},
            (DENY,),
            (),
            (),
            True,
        ),
        (
            "other store, a push that touches none of them: still kept",
            _push(_resource(NEW)),
            {DENY},
            (NEW,),
            (),
            (DENY,),
            False,
        ),
    ],
)
def test_decide(
    case: str,
    push: wire.Push,
    unvouched_before: set[str],
    applied_resources: tuple[str, ...],
    applied_removed: tuple[str, ...],
    kept: tuple[str, ...],
    adopt: bool,
) -> None:
    decision = decide(push, frozenset(unvouched_before))
    assert tuple(r.name for r in decision.push.resources) == applied_resources, case
    assert decision.push.removed == applied_removed, case
    assert decision.kept == kept, case
    assert decision.adopt is adopt, case
    assert decision.unvouched == set(kept), case
    assert (decision.push.version, decision.push.nonce, decision.push.full) == (push.version, push.nonce, push.full)


def test_the_message_names_both_stores_and_the_kept_policies() -> None:
    message = conflict_message((DENY, ROUTE), "a" * 32, "b" * 32)
    assert message.startswith(f"{wire.STORE_CONFLICT}: kept {DENY}, {ROUTE}: ")
    assert "a" * 32 in message and "b" * 32 in message
    assert "(unknown)" in conflict_message((DENY,), "", "b")
