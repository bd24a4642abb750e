"""Access tables: may this caller call this service, on this path, with this method? Pure.

Compiled once per policy version from a validated ``AccessPolicy`` (meshlet/schema.py)
and asked by the inbound sidecar for every request (docs/policy.md), and by ``meshlet explain``
(control_plane/explain.py), so both give the same answer:

* the rules are tried in the order written; the first whose ``sources``, ``paths`` and
  ``methods`` all hold allows the request; when none does, ``default`` decides;
* ``sources``: calling services by name (``unauthenticated`` for plaintext callers), ``"*"``
  for any caller (an unauthenticated one too);
* ``paths``: prefixes by whole segments, so ``/items`` allows ``/items`` and ``/items/42``
  but not ``/items-admin`` (a prefix ending in ``/`` is taken as written); the path is
  compared normalised (meshlet/paths.py: ``/items/../admin`` is ``/admin``), which is
  the path the inbound sidecar forwards to the app; one that cannot be normalised safely
  is allowed by no rule (the inbound sidecar refuses it with 400 before asking);
* ``methods``: any of them (none listed: every method).

An opaque TCP connection (a ``tcp`` service) has no path and no method: only rules that
name neither can allow it (:meth:`AccessTable.check_connection`).

The caller's identity is the service its verified mTLS certificate names, or
``unauthenticated`` (meshlet.identity.UNAUTHENTICATED) for a plaintext caller: set by the
inbound sidecar from the connection (sidecar/net/inbound.py), never from a request header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .paths import BadPath, path_of
from .paths import normalise_path as _normalise

if TYPE_CHECKING:
    from meshlet.schema import AccessPolicy, AccessRule

ANY = "*"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    rule: str  # "rules[i]" of the rule that allowed it, or "default"


@dataclass(frozen=True, slots=True)
class _Rule:
    sources: frozenset[str]
    prefixes: tuple[bytes, ...]  # normalised (the schema insists); a prefix ends with "/" or matches a whole segment
    methods: frozenset[bytes]

    @classmethod
    def compile(cls, rule: AccessRule) -> _Rule:
        return cls(
            frozenset(rule.sources),
            tuple(p.encode("ascii") for p in rule.paths),
            frozenset(m.encode("ascii") for m in rule.methods),
        )

    def holds(self, source: str, method: bytes, path: bytes | None) -> bool:
        if ANY not in self.sources and source not in self.sources:
            return False
        if self.methods and method not in self.methods:
            return False
        if self.prefixes:
            assert path is not None
            return any(_under(path, prefix) for prefix in self.prefixes)
        return True


class AccessTable:
    """One service's compiled ``AccessPolicy``."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.name = policy.name
        self.service = policy.service
        self.mode = policy.mode
        self.default_allows = policy.default == "allow"
        self.rules = tuple(_Rule.compile(rule) for rule in policy.rules)
        self._paths = any(rule.prefixes for rule in self.rules)  # else the path is never decoded

    def check(self, source: str, method: bytes, target: bytes) -> Verdict:
        """``target``: the request target (origin or absolute form, query and all);
        normalised here too (a no-op on what the inbound sidecar normalised already)."""
        path = None
        if self._paths:
            try:
                path = _normalise(path_of(target))
            except BadPath:
                path = b""  # under no prefix: only a rule without paths lets it in
        for i, rule in enumerate(self.rules):
            if rule.holds(source, method, path):
                return Verdict(True, f"rules[{i}]")
        return Verdict(self.default_allows, "default")

    def check_connection(self, source: str) -> Verdict:
        """May ``source`` open an opaque TCP connection (a ``tcp`` service)? A connection has
        no path and no method: a rule that names paths or methods never allows it (fail
        closed); one that names only sources does; else ``default`` decides."""
        for i, rule in enumerate(self.rules):
            if not rule.prefixes and not rule.methods and rule.holds(source, b"", None):
                return Verdict(True, f"rules[{i}]")
        return Verdict(self.default_allows, "default")


def normalise_path(path: str) -> str:
    """The path as the access check compares it (for display: one that cannot be
    normalised is returned as it is)."""
    try:
        return _normalise(path.encode("latin-1")).decode("latin-1")
    except (BadPath, UnicodeEncodeError):
        return path


def _under(path: bytes, prefix: bytes) -> bool:
    if prefix.endswith(b"/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + b"/")


__all__ = ["AccessTable", "Verdict", "normalise_path"]
