"""``--allowed-collector HOST[:PORT]``: the span collectors a MeshConfig may name. Pure.

Every sidecar POSTs its spans to MeshConfig's ``tracing.collector``: whoever may apply policy
can make every sidecar send requests to a host of their choosing (and the spans' paths and
timings with them). An operator who wants that bounded lists the collectors allowed; a
policy naming another is refused when applied. With no list, any http(s) URL is accepted
(meshlet/schema.py refuses every other scheme).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the CLI checks the flag with parse_allowed, without loading the schema (pydantic)
    from meshlet.schema import Document

FLAG = "--allowed-collector"


def parse_allowed(text: str) -> tuple[str, int | None]:
    """``HOST`` (any port) or ``HOST:PORT``; an IPv6 host in brackets. ValueError says why not."""
    entry = text.strip()
    if not entry or any(c in entry for c in "/@?# "):
        raise ValueError(f"{text!r}: expected HOST or HOST:PORT, e.g. zipkin:9411")
    try:
        parts = urlsplit(f"//{entry}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r}: expected HOST or HOST:PORT ({exc})") from None
    if not parts.hostname:
        raise ValueError(f"{text!r}: expected HOST or HOST:PORT, e.g. zipkin:9411")
    return parts.hostname.lower(), port


def _where(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def allowed(url: str, allow: Sequence[tuple[str, int | None]]) -> bool:
    host, port = _where(url)
    return any(host == h and (p is None or p == port) for h, p in allow)


def collector_problems(documents: Iterable[Document], allow: Sequence[tuple[str, int | None]]) -> list[str]:
    """Why these documents may not run here: a MeshConfig's collector that ``allow`` does not
    list (nothing when ``allow`` is empty: every http(s) collector is accepted)."""
    if not allow:
        return []
    problems = []
    for document in documents:
        collector = document.tracing.collector if document.kind == "MeshConfig" else None
        if collector is not None:
            host, port = _where(collector)
            if not allowed(collector, allow):
                listed = ", ".join(h if p is None else f"{h}:{p}" for h, p in allow)
                problems.append(
                    f"MeshConfig/{document.name}: tracing.collector: {host}:{port} is not a collector this control "
                    f"plane allows ({FLAG}: {listed})"
                )
    return problems


__all__ = ["FLAG", "allowed", "collector_problems", "parse_allowed"]
