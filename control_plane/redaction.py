"""What a reader without the write token may see of the policy. Pure: data in, data out.

A policy can hold secrets: an ``Authorization`` header a route adds for its upstream, a
cookie a direct response sets, a route that matches on an API key. The read API
(``/v1/policies``, ``/v1/explain``) answers a reader that did not present the write token
with these values replaced by :data:`REDACTED`; the sidecars still receive them whole.

Redacted, in a document's JSON (as applied, or as ``model_dump`` writes it):

* every header VALUE a policy writes: a Route rule's ``headers.request.add`` and
  ``headers.response.add``, its ``direct_response.headers``, a DestinationPolicy's
  ``fallback.headers`` (the names stay: they say what the rule does);
* what a rule's ``match`` compares a credential-like header or query parameter with
  (:func:`credential_like`: ``authorization``, ``cookie``, names with ``token``, ``key``,
  ``secret``...), and the same headers of a Route's embedded tests;
* the userinfo and the query of MeshConfig's ``tracing.collector`` URL.

Kept: bodies (a direct response's or a fallback's is sent to whoever calls), redirect
locations, paths, and every other match. A policy text is redacted by reading its YAML,
redacting each document and writing it out again (its comments are dropped: they may say
anything).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

REDACTED = "<redacted>"

# Parts of a header or query parameter name that say its value is a credential.
_CREDENTIAL_PARTS = ("auth", "token", "secret", "key", "password", "passwd", "cookie", "session", "credential")
_MATCH_VALUES = ("exact", "prefix", "regex")  # what a StringMatch compares with (`present` is kept)


def credential_like(name: object) -> bool:
    """Does a header or query parameter of this name carry a credential?"""
    lowered = str(name).lower()
    return any(part in lowered for part in _CREDENTIAL_PARTS)


def redact_headers(headers: object) -> object:
    """A header map a policy writes (name → value): every value redacted."""
    if not isinstance(headers, dict):
        return headers
    return dict.fromkeys(headers, REDACTED)


def redact_header_actions(actions: object) -> object:
    """A rule's ``headers`` (``request``/``response``, each ``add`` and ``remove``)."""
    return _each(actions, lambda side: _at(side, "add", redact_headers))


def redact_match(match: object) -> object:
    """A rule's ``match``: the values compared with credential-like headers and query parameters."""
    return _at(_at(match, "headers", _credential_matches), "query", _credential_matches)


def redact_direct_response(response: object) -> object:
    return _at(response, "headers", redact_headers)


def redact_collector(url: object) -> object:
    """A collector URL without its userinfo and its query (either can hold a credential)."""
    if not isinstance(url, str):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_document(document: object) -> object:
    """One policy document (a mapping with ``kind``), redacted; anything else is returned as is."""
    if not isinstance(document, dict):
        return document
    redact = _BY_KIND.get(document.get("kind"))
    return document if redact is None else redact(document)


def redact_policy_text(text: str) -> str:
    """A policy file's text with its documents redacted (comments dropped). Text that is not
    YAML (it was validated when applied, so not expected) is withheld whole."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return f"# {REDACTED}: this file could not be read to redact it\n"
    kept = [redact_document(d) for d in documents if d is not None]
    shown: str = yaml.safe_dump_all(kept, sort_keys=False, allow_unicode=False)
    return shown


# --- by kind ---------------------------------------------------------------------------------


def _route(document: dict[str, Any]) -> Any:
    return _at(_at(document, "rules", lambda rules: _each(rules, _rule)), "tests", lambda tests: _each(tests, _test))


def _rule(rule: object) -> object:
    rule = _at(rule, "headers", redact_header_actions)
    rule = _at(rule, "direct_response", redact_direct_response)
    return _at(rule, "match", redact_match)


def _test(test: object) -> object:
    return _at(test, "request", lambda request: _at(request, "headers", _credential_values))


def _destination_policy(document: dict[str, Any]) -> Any:
    return _at(document, "fallback", lambda fallback: _at(fallback, "headers", redact_headers))


def _mesh_config(document: dict[str, Any]) -> Any:
    return _at(document, "tracing", lambda tracing: _at(tracing, "collector", redact_collector))


_BY_KIND: dict[object, Callable[[dict[str, Any]], Any]] = {
    "Route": _route,
    "DestinationPolicy": _destination_policy,
    "MeshConfig": _mesh_config,
}


# --- helpers: a copy with one part changed, whatever shape the input has -----------------------


def _at(mapping: Any, key: str, change: Callable[[Any], Any]) -> Any:
    """``mapping`` with ``mapping[key]`` changed (a copy), or ``mapping`` if it has no such key."""
    if not isinstance(mapping, dict) or key not in mapping:
        return mapping
    return {**mapping, key: change(mapping[key])}


def _each(items: Any, change: Callable[[Any], Any]) -> Any:
    """Every value of a list, or of a mapping, changed."""
    if isinstance(items, list):
        return [change(item) for item in items]
    if isinstance(items, dict):
        return {name: change(value) for name, value in items.items()}
    return items


def _credential_matches(matches: object) -> object:
    """name → StringMatch: the compared values of credential-like names redacted."""
    if not isinstance(matches, dict):
        return matches
    return {name: _redact_string_match(match) if credential_like(name) else match for name, match in matches.items()}


def _redact_string_match(match: object) -> object:
    if not isinstance(match, dict):
        return REDACTED
    return {key: REDACTED if key in _MATCH_VALUES and value is not None else value for key, value in match.items()}


def _credential_values(headers: object) -> object:
    if not isinstance(headers, dict):
        return headers
    return {name: REDACTED if credential_like(name) else value for name, value in headers.items()}


__all__ = [
    "REDACTED",
    "credential_like",
    "redact_collector",
    "redact_direct_response",
    "redact_document",
    "redact_header_actions",
    "redact_headers",
    "redact_match",
    "redact_policy_text",
]
