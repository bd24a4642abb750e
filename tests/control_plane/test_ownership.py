"""Who may register what (control_plane/ownership.py): claims on instance ids and nodes, and
which admin addresses the control plane may fetch. Pure: no sockets, no clock."""

from __future__ import annotations

import pytest

from control_plane.ownership import (
    ADMIN_REFUSED,
    BURST_QUIET,
    Burst,
    Claims,
    Owner,
    admin_refusal,
    admin_target,
    session_owner,
)

ITEM = Owner("item", "127.0.0.1")


@pytest.mark.parametrize(
    ("claim", "holder", "live", "refused"),
    [
        (ITEM, None, False, None),  # nobody holds it
        (ITEM, ITEM, False, None),  # the same identity after its session ended: a restart
        (Owner("item", "10.0.0.9"), ITEM, False, None),  # restarted elsewhere: the identity is what counts
        (Owner("evil", "127.0.0.1"), ITEM, False, "registered by another identity until its lease runs out"),
        (ITEM, ITEM, True, "held by a live session"),  # even the same identity: the live one stays
        (Owner("evil", "127.0.0.1"), ITEM, True, "held by a live session"),
    ],
)
def test_who_may_claim_what_another_session_registered(
    claim: Owner, holder: Owner | None, live: bool, refused: str | None
) -> None:
    session = object()
    claims = Claims()
    if live:
        claims.hold(session, "item-1", "node-1")
    why = claims.refusal(claim, "item-1", "node-9", holder)
    assert why == (None if refused is None else f"instance 'item-1': {refused}")


def test_a_live_node_is_refused_and_released_only_by_its_session() -> None:
    claims, first, second = Claims(), object(), object()
    claims.hold(first, "item-1", "node-1")
    assert claims.refusal(ITEM, "item-2", "node-1", None) == "node 'node-1': held by a live session"
    claims.release(second, "item-1", "node-1")  # another session's end frees nothing of this one
    assert claims.refusal(ITEM, "item-2", "node-1", None) is not None
    claims.release(first, "item-1", "node-1")
    assert claims.refusal(ITEM, "item-1", "node-1", ITEM) is None


@pytest.mark.parametrize(
    ("admin", "peer", "target"),
    [
        ("127.0.0.1:15090", "127.0.0.1", "127.0.0.1:15090"),
        ("127.0.0.2:15090", "127.0.0.1", None),  # loopback, but not the session's address
        ("10.0.0.5:15090", "10.0.0.5", "10.0.0.5:15090"),
        ("10.0.0.5:15090", "::ffff:10.0.0.5", "10.0.0.5:15090"),  # an IPv4 peer on a dual-stack socket
        ("[::1]:15090", "::1", "[::1]:15090"),
        ("[0:0:0:0:0:0:0:1]:15090", "::1", "[0:0:0:0:0:0:0:1]:15090"),
        ("169.254.169.254:80", "127.0.0.1", None),  # the cloud's metadata service
        ("0.0.0.0:15090", "10.0.0.5", None),
        # A name is never resolved (it could name any host): its port, on the session's address.
        ("item-1:15090", "172.18.0.4", "172.18.0.4:15090"),
        ("metadata.google.internal:80", "10.0.0.5", "10.0.0.5:80"),
        ("localhost:15090", "::1", "[::1]:15090"),
        ("127.0.0.1:0", "127.0.0.1", None),  # ports are 1-65535
        ("127.0.0.1:65536", "127.0.0.1", None),
        ("item-1:0", "127.0.0.1", None),
        ("127.0.0.1", "127.0.0.1", None),
    ],
)
def test_only_the_sessions_host_is_fetched(admin: str, peer: str, target: str | None) -> None:
    owner = session_owner("item", peer)
    assert admin_target(admin, owner) == target
    assert admin_refusal(admin, owner) == (ADMIN_REFUSED if target is None else None)


def test_an_admin_address_registered_without_a_session_is_never_fetched() -> None:
    assert admin_refusal("127.0.0.1:15090", None) == ADMIN_REFUSED


def test_a_burst_of_refusals_is_logged_once_and_counted_whole() -> None:
    burst = Burst()
    logged = [burst.starts(t) for t in (0.0, 1.0, 30.0, 30.0 + BURST_QUIET, 200.0)]
    assert logged == [True, False, False, False, True]  # the burst ends after a quiet minute
    assert burst.count == 5
