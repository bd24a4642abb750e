"""Route tables: which rule of a ``Route`` policy a request matches, and which weighted
destination it goes to. Pure: no clock, no randomness (the split is a smooth weighted
round robin, exact over every cycle of the weights' sum, as nginx's upstream weights).

Compiled once per policy version from the validated document (meshlet/schema.py);
matching works on the request head's bytes, as the data path has them:

* rules are tried by priority (higher first), then in the order written;
* ``path``: ``exact`` and ``prefix`` compare the path (the target before ``?``, normalised
  by the router first: meshlet/paths.py),
  ``regex`` must match the whole path (Envoy's and Istio's semantics);
* ``headers``: the values of a field, joined by ``,`` (one field, RFC 9110 §5.3), then
  ``exact`` / ``prefix`` / ``regex`` (whole value) / ``present``;
* ``query``: the first value of the parameter, compared the same way;
* ``methods``: any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from .paths import BadPath, normalise_target

if TYPE_CHECKING:
    from meshlet.schema import Route, Rule, StringMatch


@dataclass(frozen=True, slots=True)
class _Text:
    """One string condition, on bytes already decoded as latin-1 (no surprise on odd bytes)."""

    kind: str  # exact | prefix | regex | present
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def holds(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.kind == "exact":
            return value == self.value
        if self.kind == "prefix":
            return value.startswith(self.value)
        if self.kind == "regex":
            assert self.pattern is not None
            return self.pattern.fullmatch(value) is not None
        return True  # present


def _text(match: StringMatch | Any) -> _Text:
    for kind in ("exact", "prefix", "regex"):
        value = getattr(match, kind, None)
        if value is not None:
            return _Text(kind, value, re.compile(value) if kind == "regex" else None)
    return _Text("present")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a matched request goes: a service, and the labels its endpoint must carry."""

    service: str
    subset: tuple[tuple[str, str], ...] = ()
    weight: int = 1


@dataclass(slots=True)
class CompiledRule:
    name: str
    ref: str  # ROUTE/RULE, as a DestinationPolicy's ``rule`` names it
    priority: int
    order: int
    rule: Rule | Any  # the document's rule: actions read their settings from it
    path: _Text | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, _Text], ...] = ()
    query: tuple[tuple[str, _Text], ...] = ()
    targets: tuple[Target, ...] = ()
    # Header changes, as bytes: (name, value) to set, and names to drop (set names included).
    request_set: tuple[tuple[bytes, bytes], ...] = ()
    request_drop: frozenset[bytes] = frozenset()
    response_set: tuple[tuple[bytes, bytes], ...] = ()
    response_drop: frozenset[bytes] = frozenset()
    rewrite_prefix: tuple[bytes, bytes] | None = None  # (the matched prefix, what replaces it)
    rewrite_path: bytes | None = None  # the whole path instead
    _current: list[int] = field(default_factory=list)  # smooth weighted round robin state

    def rewrite(self, target: bytes) -> bytes:
        """The origin-form target after this rule's rewrite (the query is kept)."""
        path, mark, query = target.partition(b"?")
        if self.rewrite_prefix is not None:
            matched, replacement = self.rewrite_prefix
            path = replacement + path[len(matched) :]
        elif self.rewrite_path is not None:
            path = self.rewrite_path
        else:
            return target
        return path + mark + query

    def matches(self, method: str, path: str, query: str, headers: list[tuple[bytes, bytes]]) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path is not None and not self.path.holds(path):
            return False
        for name, condition in self.headers:
            if not condition.holds(_header(headers, name)):
                return False
        if self.query:
            params: dict[str, str] = {}
            for key, value in parse_qsl(query, keep_blank_values=True):
                params.setdefault(key, value)
            for key, condition in self.query:
                if not condition.holds(params.get(key)):
                    return False
        return True

    def pick(self) -> Target:
        """The next destination of the split (smooth weighted round robin)."""
        targets = self.targets
        if len(targets) == 1:
            return targets[0]
        current = self._current
        if not current:
            current.extend(0 for _ in targets)
        total = 0
        best = -1
        for i, target in enumerate(targets):
            current[i] += target.weight
            total += target.weight
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        return targets[best]


def _header(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    wanted = name.encode("latin-1")
    values = [v for k, v in headers if k.lower() == wanted]
    if not values:
        return None
    return b",".join(v.strip() for v in values).decode("latin-1")


class RouteTable:
    """One host's rules, in the order they are tried."""

    def __init__(self, route: Route | Any) -> None:
        self.route = route
        self.host: str = route.host
        self.name: str = route.name
        self.shadow = route.mode == "shadow"
        compiled = [_compile(rule, order, route.name) for order, rule in enumerate(route.rules)]
        self.rules: tuple[CompiledRule, ...] = tuple(sorted(compiled, key=lambda r: (-r.priority, r.order)))

    def match(
        self, method: bytes | str, target: bytes | str, headers: list[tuple[bytes, bytes]]
    ) -> CompiledRule | None:
        """The rule that decides this request, or None (404 no-route)."""
        if isinstance(method, bytes):
            method = method.decode("latin-1")
        if isinstance(target, bytes):
            target = target.decode("latin-1")
        path, _, query = target.partition("?")
        for rule in self.rules:
            if rule.matches(method, path, query, headers):
                return rule
        return None


def change_headers(
    headers: list[tuple[bytes, bytes]], set_: tuple[tuple[bytes, bytes], ...], drop: frozenset[bytes]
) -> None:
    """Drop the named fields (any case), then append the ones set; in place."""
    headers[:] = [(k, v) for k, v in headers if k.lower() not in drop]
    headers.extend(set_)


def _changes(changes: Any) -> tuple[tuple[tuple[bytes, bytes], ...], frozenset[bytes]]:
    set_ = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in changes.add.items())
    drop = frozenset(k.encode("latin-1") for k in changes.remove) | {k for k, _ in set_}
    return set_, drop


def _compile(rule: Rule | Any, order: int, route: str = "") -> CompiledRule:
    match: Any = rule.match
    request_set, request_drop = _changes(rule.headers.request)
    response_set, response_drop = _changes(rule.headers.response)
    rewrite: Any = rule.rewrite
    rewrite_prefix = rewrite_path = None
    if rewrite is not None and rewrite.prefix is not None:  # the schema requires match.path.prefix then
        rewrite_prefix = (match.path.prefix.encode("latin-1"), rewrite.prefix.encode("latin-1"))
    elif rewrite is not None:
        rewrite_path = rewrite.path.encode("latin-1")
    targets = tuple(
        Target(d.service, tuple(sorted(d.subset.items())), d.weight) for d in (rule.destinations or ()) if d.weight
    )
    return CompiledRule(
        name=rule.name,
        ref=f"{route}/{rule.name}",
        priority=rule.priority,
        order=order,
        rule=rule,
        path=None if match.path is None else _text(match.path),
        methods=None if match.methods is None else frozenset(match.methods),
        headers=tuple((name, _text(m)) for name, m in match.headers.items()),
        query=tuple((name, _text(m)) for name, m in match.query.items()),
        targets=targets,
        request_set=request_set,
        request_drop=request_drop,
        response_set=response_set,
        response_drop=response_drop,
        rewrite_prefix=rewrite_prefix,
        rewrite_path=rewrite_path,
    )


def run_tests(route: Route | Any) -> list[tuple[int, str]]:
    """The route's embedded tests: (index, what failed) for each one that fails."""
    table = RouteTable(route)
    failures: list[tuple[int, str]] = []
    for i, test in enumerate(route.tests):
        request, expect = test.request, test.expect
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        try:  # as the sidecar does before matching
            target = normalise_target(request.path.encode("ascii"))
        except BadPath as exc:
            failures.append((i, f"the sidecar refuses this path (400 bad-request): it has {exc}"))
            continue
        rule = table.match(request.method, target, headers)
        got = "no rule (404)" if rule is None else f"rule {rule.name!r}"
        if expect.rule is not None and (rule is None or rule.name != expect.rule):
            failures.append((i, f"expected rule {expect.rule!r}, got {got}"))
            continue
        if expect.service is not None:
            services = sorted({t.service for t in rule.targets}) if rule is not None else []
            if expect.service not in services:
                where = f"{got} sends to {', '.join(services)}" if services else f"{got} sends to no service"
                failures.append((i, f"expected service {expect.service!r}, but {where}"))
                continue
        if expect.status is not None:
            status = _status(rule)
            if status != expect.status:
                shown = "a forwarded response (no fixed status)" if status is None else str(status)
                failures.append((i, f"expected status {expect.status}, {got} gives {shown}"))
    return failures


def _status(rule: CompiledRule | None) -> int | None:
    if rule is None:
        return 404
    if rule.rule.redirect is not None:
        return int(rule.rule.redirect.status)
    if rule.rule.direct_response is not None:
        return int(rule.rule.direct_response.status)
    return None


__all__ = ["CompiledRule", "RouteTable", "Target", "change_headers", "run_tests"]
