"""Policies from one store are not removed by a control plane on another. Pure.

A control plane started on an empty data directory (a lost volume, a relative ``--data-dir``
from another working directory) or on another mesh's store has none of the policies the
sidecars hold. Applied as they come, its pushes would remove every AccessPolicy: callers that
were denied would get in. So a sidecar remembers which store its policies came from (the
store id the control plane names in ``welcome``), and on a session with another store:

* a held policy counts as *unvouched* until a push of this session lists it (a resource with
  a body, whatever its version): a full push's "neither listed nor removed means current" is
  not taken from a store the policy did not come from;
* removing an unvouched policy (``rm``, or a resource with no body) is refused: it is kept,
  and the push is answered with a ``store-conflict`` NACK naming every unvouched policy
  still held; everything else in the push (adds, changes, policies the store did list) is
  applied;
* once nothing held is unvouched the sidecar adopts the session's store.

Only removals are refused. A change comes from a store that holds a policy of that name,
written there through the API's write token: an intended edit. A removal is what an empty
store produces by itself, with nobody having decided anything. A sidecar that holds no
policy adopts any store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

from meshlet import wire
from meshlet.wire import STORE_CONFLICT  # the NACK message's first word (docs/protocol.md)


def unvouched(held_store: str, session_store: str, held: Collection[str]) -> frozenset[str]:
    """At a session's start: the held policies its store must list before the sidecar adopts it
    (none when the store is the one they came from)."""
    return frozenset() if held_store == session_store else frozenset(held)


@dataclass(frozen=True, slots=True)
class Decision:
    push: wire.Push  # what to apply: the push without the removals refused
    kept: tuple[str, ...]  # unvouched policies still held after it, by name: the NACK's names
    unvouched: frozenset[str]  # what the next push finds unvouched

    @property
    def adopt(self) -> bool:
        """Whether the sidecar now takes the session's store as its policies' store."""
        return not self.unvouched


def decide(push: wire.Push, unvouched: frozenset[str]) -> Decision:
    """What to apply of a policies ``push`` on a session where ``unvouched`` are not vouched for."""
    if not unvouched:
        return Decision(push, (), unvouched)
    listed = {r.name for r in push.resources if not r.missing}
    left = unvouched - listed
    resources = tuple(r for r in push.resources if not (r.missing and r.name in left))
    removed = tuple(name for name in push.removed if name not in left)
    if len(resources) != len(push.resources) or len(removed) != len(push.removed):
        push = dataclasses.replace(push, resources=resources, removed=removed)
    return Decision(push, tuple(sorted(left)), left)


def conflict_message(kept: tuple[str, ...], held_store: str, session_store: str) -> str:
    """The NACK's message: ``store-conflict: ...`` (the names travel in the NACK's names)."""
    return (
        f"{STORE_CONFLICT}: kept {', '.join(kept)}: they came from store {held_store or '(unknown)'} and "
        f"this control plane's store {session_store or '(unnamed)'} does not have them"
    )


__all__ = ["STORE_CONFLICT", "Decision", "conflict_message", "decide", "unvouched"]
