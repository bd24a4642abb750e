"""The push side of the control plane: one session per connected sidecar, and the hub
that turns registry changes into debounced, merged pushes.

Pipeline (Istio's push pipeline): a change is recorded once →
the hub's debouncer waits until changes have been quiet for ``DEBOUNCE_QUIET`` (but
never longer than ``DEBOUNCE_MAX`` after the first one) → the batch marks every session
dirty → each session sends one push per type, carrying everything dirty, merged → the
next push of that type waits for the sidecar's answer. Endpoint changes go as deltas
against what the sidecar holds.

Time: the hub reads ``trio.current_time()`` only in its tasks; the bookkeeping that
decides what to push (:class:`SessionView`) is pure and tested without sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from meshlet import wire
from meshlet.wire import ENDPOINTS, Resource

from .registry import Instance

log = logging.getLogger("meshlet.cp.push")

DEBOUNCE_QUIET = 0.1  # docs/protocol.md: 100 ms of quiet before a push
DEBOUNCE_MAX = 10.0  # ... but never more than 10 s after the first change
PING_INTERVAL = 5.0  # docs/protocol.md: a dead peer is detected in < 3 intervals
ANSWER_TIMEOUT = 3 * PING_INTERVAL  # a push nobody answers: the session is stuck, close it


@dataclass
class SessionView:
    """What one sidecar holds of one resource type (name → (version, body)), what it
    rejected (name → version), which names it watches (None: all of them) and which
    watched names it was told do not exist. Pure: decides the next push from the
    wanted state."""

    held: dict[str, tuple[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    watch: set[str] | None = None
    missing: set[str] = field(default_factory=set)
    # Held from another store (the sidecar's hello named another): listed in the next push even
    # at the version held, since the sidecar takes nothing as current from a store that has not
    # said so; and those of them this store lacks, which the sidecar keeps: never removed.
    unvouched: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)

    @classmethod
    def from_hello(cls, have: dict[str, str], watch: set[str] | None = None) -> SessionView:
        """A reconnecting sidecar says what it has; bodies are unknown (no deltas on them)."""
        return cls({name: (version, None) for name, version in have.items()}, watch=watch)

    def subscribe(self, names: Iterable[str]) -> set[str]:
        """Watch more names; returns those to answer in the next push. An added name is
        answered even if the view says the sidecar has it: it may have dropped it."""
        names = set(names)
        if self.watch is None:
            return names
        self.watch |= names
        for name in names:
            self.held.pop(name, None)
            self.missing.discard(name)
        return names

    def unsubscribe(self, names: Iterable[str]) -> None:
        if self.watch is None:
            return
        for name in names:
            self.watch.discard(name)
            self.held.pop(name, None)  # the sidecar drops it: nothing to push
            self.missing.discard(name)
            self.rejected.pop(name, None)

    def plan(
        self,
        wanted: dict[str, tuple[str, Any]],
        names: Iterable[str] | None,
        *,
        full: bool,
        keep: Container[str] = (),
    ) -> tuple[tuple[Resource, ...], tuple[str, ...]]:
        """The resources and removals that bring the sidecar to ``wanted`` for ``names``
        (all names when None or ``full``), limited to what it watches. A watched name
        that does not exist is answered once as a resource without a body. Versions it
        rejected are not sent again. Names in ``keep`` that the sidecar holds and
        ``wanted`` lacks are not removed (a control plane warming up after a restart does
        not know yet whether they still exist), nor are those the sidecar keeps from another
        store (``kept``)."""
        watch = self.watch
        if full or names is None:
            names = set(self.held) | (set(wanted) if watch is None else watch)
        resources: list[Resource] = []
        removed: list[str] = []
        for name in sorted(names):
            want = wanted.get(name) if watch is None or name in watch else None
            have = self.held.get(name)
            if want is None:
                if have is not None:
                    if name not in keep and name not in self.kept:
                        removed.append(name)
                elif watch is not None and name in watch and name not in self.missing:
                    resources.append(Resource(name, "", None))  # does not exist (yet)
                continue
            version, body = want
            if have is not None and have[0] == version and name not in self.unvouched:
                continue
            if self.rejected.get(name) == version:
                continue
            if have is not None and have[1] is not None and isinstance(body, list):
                resources.append(_delta(name, have, version, body))
            else:
                resources.append(Resource(name, version, body))
        return tuple(resources), tuple(removed)

    def sent(self, resources: Iterable[Resource], removed: Iterable[str], wanted: dict[str, tuple[str, Any]]) -> None:
        """Record a push as applied (optimistic: a nack undoes the rejected names)."""
        for resource in resources:
            if resource.missing:
                self.missing.add(resource.name)
            else:
                self.held[resource.name] = wanted[resource.name]
                self.missing.discard(resource.name)
                self.unvouched.discard(resource.name)  # this store has it: the sidecar takes it from here
                self.kept.discard(resource.name)
        for name in removed:
            self.held.pop(name, None)
            if self.watch is not None and name in self.watch:
                self.missing.add(name)  # a removal tells a watcher it no longer exists

    def nacked(self, names: Iterable[str], previous: dict[str, tuple[str, Any]], attempted: dict[str, str]) -> None:
        for name in names:
            if name in attempted:
                self.rejected[name] = attempted[name]
            if name in previous:
                self.held[name] = previous[name]
            else:
                self.held.pop(name, None)

    def foreign(self, held_store: str, store: str, wanted: Container[str]) -> None:
        """The sidecar's policies came from ``held_store``, not this control plane's ``store``:
        everything held is unvouched, and what ``wanted`` lacks it will keep."""
        if held_store != store:
            self.unvouched = set(self.held)
            self.kept = {name for name in self.held if name not in wanted}

    def refused_removal(self, names: Iterable[str], previous: dict[str, tuple[str, Any]]) -> None:
        """A ``store-conflict`` NACK: the sidecar keeps ``names`` (held from another store). Only
        names it holds count: a NACK cannot make the view grow."""
        for name in names:
            if name in previous:
                self.held[name] = previous[name]  # the removal pushed did not happen
            elif name not in self.held:
                continue
            self.unvouched.add(name)
            self.kept.add(name)

    def type_version(self) -> str:
        key = tuple(sorted((name, version) for name, (version, _) in self.held.items()))
        cached = _TYPE_VERSIONS.get(key)
        if cached is None:
            if len(_TYPE_VERSIONS) >= _MEMO_MAX:
                _TYPE_VERSIONS.clear()
            cached = _TYPE_VERSIONS[key] = wire.type_version(dict(key))
        return cached


# Thousands of sessions hold the same state and get the same change: the type version
# and the endpoint delta are computed once per distinct input, not once per session.
_MEMO_MAX = 4096
_TYPE_VERSIONS: dict[tuple[tuple[str, str], ...], str] = {}
_DELTAS: dict[tuple[str, str, str], Resource] = {}


def _delta(name: str, have: tuple[str, Any], version: str, body: list[dict[str, Any]]) -> Resource:
    key = (name, have[0], version)
    cached = _DELTAS.get(key)
    if cached is None:
        if len(_DELTAS) >= _MEMO_MAX:
            _DELTAS.clear()
        cached = _DELTAS[key] = _compute_delta(name, have, version, body)
    return cached


def _compute_delta(name: str, have: tuple[str, Any], version: str, body: list[dict[str, Any]]) -> Resource:
    old = {e["id"]: e for e in have[1]}
    new = {e["id"]: e for e in body}
    add = tuple(e for i, e in new.items() if old.get(i) != e)
    remove = tuple(i for i in old if i not in new)
    if len(add) + len(remove) >= len(body):  # a delta no smaller than the whole: send the whole
        return Resource(name, version, body)
    return Resource(name, version, None, have[0], add, remove)


class Hub:
    """Knows every session and what each watches; debounces changes once for all.

    ``changed`` only records names (O(1) per change, however many sidecars); the
    debouncer publishes the accumulated batch when changes have been quiet for
    ``DEBOUNCE_QUIET`` or ``DEBOUNCE_MAX`` after the first one (Istio's debounce sits in
    front of the push queue in the same way). A batch reaches only the sessions that
    watch one of its names (an index name → sessions: identical subscriptions are one
    set, Consul's coalescing), and each of those gets its push written at once, in the
    debouncer's loop: no task per sidecar wakes up to send it.

    ``wanted(type)`` returns the state every sidecar should reach: name → (version, body).
    """

    def __init__(self, wanted: Callable[[str], dict[str, tuple[str, Any]]]) -> None:
        self.wanted = wanted
        self.sessions: dict[str, Session] = {}  # node id → session
        # Sidecars whose channel closed, kept for `meshlet status` while their lease lives.
        self.departed: dict[str, Session] = {}
        self.pushes_total = 0
        self.nacks_total = 0
        self.convergence: list[float] = []  # seconds from change to ACK, per session and push (bounded)
        self._wildcard: dict[str, set[Session]] = {t: set() for t in wire.RESOURCE_TYPES}
        self._watchers: dict[str, dict[str, set[Session]]] = {t: {} for t in wire.RESOURCE_TYPES}
        # Until this time (trio clock) the registry is still being rebuilt after a start:
        # pushes remove nothing a sidecar holds (Linkerd: never "no endpoints" just before
        # an "add"); at its end every session is re-checked. See PushServer.warm_up.
        self.warm_until = 0.0
        self.seen: set[str] = set()  # names changed since the start: what the registry knows
        self._pending: dict[str, set[str]] = {}
        self._first_change = 0.0
        self._last_change = 0.0
        self._kick = trio.Event()

    # sessions and their subscriptions ----------------------------------------------------
    def add(self, session: Session) -> None:
        self.sessions[session.node] = session
        self.departed.pop(session.node, None)
        for type, view in session.views.items():
            if view.watch is None:
                self._wildcard[type].add(session)
            else:
                self._index(session, type, view.watch)

    def remove(self, session: Session) -> None:
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]
            self.departed[session.node] = session
        for type, view in session.views.items():
            self._wildcard[type].discard(session)
            if view.watch is not None:
                self._unindex(session, type, view.watch)

    def subscribe(self, session: Session, type: str, add: Iterable[str], remove: Iterable[str], now: float) -> None:
        """A ``watch`` message: index the names, answer the added ones in the next push."""
        view = session.views.setdefault(type, SessionView(watch=set()))
        if view.watch is None:
            return  # a wildcard already has everything
        remove = set(remove)
        view.unsubscribe(remove)
        self._unindex(session, type, remove)
        answer = view.subscribe(set(add) - remove)
        self._index(session, type, answer)
        if answer:
            session.mark(type, answer, now)
            self.push_due(session)

    def _index(self, session: Session, type: str, names: Iterable[str]) -> None:
        watchers = self._watchers[type]
        for name in names:
            watchers.setdefault(name, set()).add(session)

    def _unindex(self, session: Session, type: str, names: Iterable[str]) -> None:
        watchers = self._watchers[type]
        for name in names:
            sessions = watchers.get(name)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del watchers[name]

    def subscribers(self, type: str, names: Iterable[str]) -> set[Session]:
        """The sessions a change of ``names`` concerns."""
        out = set(self._wildcard[type])
        watchers = self._watchers[type]
        for name in names:
            out |= watchers.get(name, set())
        return out

    def watched(self, type: str) -> int:
        """How many names of ``type`` at least one sidecar watches."""
        return len(self._watchers[type])

    # pushing -----------------------------------------------------------------------------
    def keeping(self) -> Container[str]:
        """Names a push must not remove: while warming up, those not seen since the start."""
        if trio.current_time() < self.warm_until:
            return _Unseen(self.seen)
        return ()

    async def end_warm_up(self) -> None:
        """At the end of the warm-up, what was kept may be removed: re-check everything
        every session holds or watches."""
        await trio.sleep_until(self.warm_until)
        for type in wire.RESOURCE_TYPES:
            names: set[str] = set()
            for session in self.sessions.values():
                view = session.views.get(type)
                if view is not None:
                    names |= set(view.held) | (view.watch or set())
            self.changed(type, names)

    def push_due(self, session: Session) -> None:
        """Write the next push of every type that has changes and no push in flight."""
        keep = self.keeping()
        for type in session.due():
            built = build_push(session, type, self.wanted(type), full=False, keep=keep)
            if built is not None:
                self.pushes_total += 1
                session.write(built[1])

    def push_first(self, session: Session) -> None:
        """The first push of every type on a new channel: full."""
        keep = self.keeping()
        for type in wire.RESOURCE_TYPES:
            built = build_push(session, type, self.wanted(type), full=True, keep=keep)
            if built is not None:
                self.pushes_total += 1
                session.write(built[1])

    def answered(self, session: Session, type: str, now: float) -> None:
        """An ACK or NACK: the next push of that type may go (with what merged meanwhile)."""
        push = session.in_flight.pop(type, None)
        if push is not None:
            self.observe_convergence(now - push.changed_at)
        self.push_due(session)

    # debouncing --------------------------------------------------------------------------
    def changed(self, type: str, names: Iterable[str]) -> None:
        names = set(names)
        if not names:
            return
        now = trio.current_time()
        if not self._pending:
            self._first_change = now
        self._last_change = now
        self._pending.setdefault(type, set()).update(names)
        self.seen |= names
        self._kick.set()

    async def serve_debounce(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            while self._pending:
                at = min(self._last_change + DEBOUNCE_QUIET, self._first_change + DEBOUNCE_MAX)
                now = trio.current_time()
                if now < at:
                    await trio.sleep(at - now)
                    continue  # more changes may have come meanwhile
                batch, first = self._pending, self._first_change
                self._pending = {}
                await self._publish(batch, first)

    async def _publish(self, batch: dict[str, set[str]], first: float) -> None:
        targets: dict[Session, list[tuple[str, set[str]]]] = {}
        for type, names in batch.items():
            for session in self.subscribers(type, names):
                targets.setdefault(session, []).append((type, names))
        for count, (session, marks) in enumerate(targets.items(), 1):
            if session.closed:
                continue
            for type, names in marks:
                session.mark(type, names, first)
            self.push_due(session)
            if count % PUBLISH_SLICE == 0:
                await trio.lowlevel.checkpoint()  # let answers and new sidecars in between slices

    def observe_convergence(self, seconds: float) -> None:
        self.convergence.append(seconds)
        if len(self.convergence) > 10_000:
            del self.convergence[:5_000]


class _Unseen:
    """Every name not in ``seen``."""

    __slots__ = ("seen",)

    def __init__(self, seen: set[str]) -> None:
        self.seen = seen

    def __contains__(self, name: object) -> bool:
        return name not in self.seen


PUBLISH_SLICE = 256  # sessions pushed to between two checkpoints of the debouncer


@dataclass(slots=True)
class InFlight:
    """A push awaiting the sidecar's answer."""

    changed_at: float  # the oldest change it carries: convergence is measured from here
    sent_at: float  # a sidecar is judged stuck from here
    previous: dict[str, tuple[str, Any]]  # what it held of the pushed names before (restored on NACK)
    attempted: dict[str, str]  # name → the version pushed


class Writer(Protocol):
    """A session's outgoing side (channel.Channel): writes never wait."""

    blocked_since: float | None

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


STORE_CONFLICT_HINT = (
    "this control plane's store lacks policies the sidecar holds from another store (an empty or foreign "
    "data dir?): re-apply them here (from git, or `meshlet get policies -o yaml` against a copy of the old "
    "data dir); the sidecar then adopts this store (docs/security.md)"
)


@dataclass(frozen=True, slots=True)
class Certified:
    """The certificate the control plane last issued to a session (``meshlet check`` reads its
    expiry): the SPIFFE ID it names and its validity, in seconds since the epoch."""

    spiffe_id: str
    not_before: float
    not_after: float

    def to_json(self) -> dict[str, Any]:
        return {"spiffe_id": self.spiffe_id, "not_before": self.not_before, "not_after": self.not_after}


@dataclass(eq=False)
class Session:
    """One sidecar's channel, as the control plane sees it."""

    node: str
    service: str
    instance_id: str
    conn: wire.ServerConnection
    views: dict[str, SessionView]
    connected_at: float
    last_seen: float
    channel: Writer
    dirty: dict[str, set[str]] = field(default_factory=dict)  # debounced, waiting to be pushed
    first_change: dict[str, float] = field(default_factory=dict)  # type → time of the oldest unpushed change
    in_flight: dict[str, InFlight] = field(default_factory=dict)  # type → the push awaiting an answer
    last_nack: wire.Nack | None = None
    ready: bool = False
    closed: bool = False
    next_ping: float = 0.0
    instance: Instance | None = None  # what its hello registered: restored if its lease runs out while it lives
    store: str = ""  # the store the sidecar's policies come from (its hello's; this one's once it adopts it)
    certified: Certified | None = None  # the certificate last issued to it (welcome, or a renewal)
    last_answer: dict[str, str] = field(default_factory=dict)  # type → "ack" or "nack", the latest answer

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.channel.write(data)

    def mark(self, type: str, names: set[str], changed_at: float) -> None:
        self.dirty.setdefault(type, set()).update(names)
        self.first_change.setdefault(type, changed_at)

    def due(self) -> list[str]:
        """Types with debounced changes and no push of theirs awaiting an answer (one push
        in flight per type; what arrives meanwhile merges into the next)."""
        return [t for t in wire.RESOURCE_TYPES if t in self.dirty and t not in self.in_flight]

    def to_json(self, now: float, registered: bool = True) -> dict[str, Any]:
        """``registered``: whether the registry holds its instance; one it does not is never shown
        ready (nobody is sent there)."""
        nack = self.last_nack
        return {
            "node": self.node,
            "service": self.service,
            "instance": self.instance_id,
            "connected": not self.closed,
            "registered": registered,
            "last_seen_s": round(max(0.0, now - self.last_seen), 3),  # seconds since its last message
            "ready": self.ready and registered,
            "versions": {t: v.type_version() for t, v in self.views.items()},
            "acked": dict(self.conn.acked),
            "watching": {t: None if v.watch is None else sorted(v.watch) for t, v in self.views.items()},
            "last_nack": None
            if nack is None
            else {"type": nack.type, "message": nack.message, "names": list(nack.names), "nonce": nack.nonce},
            "policies_store": self.store,
            "store_conflict": self.store_conflict(),
            "last_answer": dict(self.last_answer),
            "identity": None if self.certified is None else self.certified.to_json(),
        }

    def store_conflict(self) -> dict[str, Any] | None:
        """The policies this sidecar keeps because this control plane's store lacks them."""
        view = self.views.get(wire.POLICIES)
        if view is None or not view.kept:
            return None
        return {"kept": sorted(view.kept), "hint": STORE_CONFLICT_HINT}


def build_push(
    session: Session, type: str, wanted: dict[str, tuple[str, Any]], *, full: bool, keep: Container[str] = ()
) -> tuple[wire.Push, bytes] | None:
    """The next push of ``type`` for ``session`` (None: nothing to send), recorded as
    sent. Clears the dirty names it covers."""
    view = session.views.setdefault(type, SessionView())
    names = None if full else session.dirty.get(type, set())
    session.dirty.pop(type, None)
    first = session.first_change.pop(type, None)
    resources, removed = view.plan(wanted, names, full=full, keep=keep)
    if not resources and not removed and not full:
        return None
    previous = {r.name: view.held[r.name] for r in resources if r.name in view.held}
    previous.update({name: view.held[name] for name in removed if name in view.held})
    attempted = {r.name: r.version for r in resources}
    view.sent(resources, removed, wanted)
    push, data = session.conn.push(type, view.type_version(), resources, removed, full=full)
    sent_at = trio.current_time()
    session.in_flight[type] = InFlight(first if first is not None else sent_at, sent_at, previous, attempted)
    return push, data


__all__ = ["ENDPOINTS", "Certified", "Hub", "InFlight", "Session", "SessionView", "Writer", "build_push"]
