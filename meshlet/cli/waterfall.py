"""A trace as a waterfall, for ``meshlet trace`` (and the dashboard). Pure.

Spans (Zipkin v2 JSON) are put in tree order: each span under its parent, siblings by
start time; a span whose parent is not in the trace (not sampled there, or not reported
yet) starts a tree of its own. Each row has the span's depth, its start as an offset from
the trace's first span, its duration, and a bar of ``width`` cells placed on the trace's
time line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Row:
    depth: int
    service: str
    name: str
    kind: str
    offset_ms: float
    duration_ms: float
    status: str  # the HTTP status, or the error tag, or ""
    error: bool
    bar: str
    span_id: str


def rows(spans: list[dict[str, Any]], width: int = 40) -> list[Row]:
    if not spans:
        return []
    by_id = {s["id"]: s for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span.get("parentId")
        key = parent if parent in by_id and parent != span["id"] else None
        children.setdefault(key, []).append(span)
    for siblings in children.values():
        siblings.sort(key=lambda s: (s.get("timestamp", 0), s.get("kind") != "CLIENT"))
    start = min(s.get("timestamp", 0) for s in spans)
    end = max(s.get("timestamp", 0) + s.get("duration", 0) for s in spans)
    total = max(1, end - start)
    out: list[Row] = []
    seen: set[int] = set()

    def walk(span: dict[str, Any], depth: int) -> None:
        if id(span) in seen:  # a loop in parent ids (a broken reporter) must not hang us
            return
        seen.add(id(span))
        begin = span.get("timestamp", 0) - start
        duration = span.get("duration", 0)
        first = min(width - 1, int(begin * width / total))
        cells = max(1, round(duration * width / total))
        tags = span.get("tags") or {}
        error = "error" in tags
        status = tags.get("http.status_code") or tags.get("error", "")
        out.append(
            Row(
                depth,
                (span.get("localEndpoint") or {}).get("serviceName", "?"),
                span.get("name", ""),
                span.get("kind", ""),
                begin / 1000,
                duration / 1000,
                status,
                error,
                " " * first + "█" * min(cells, width - first),
                span["id"],
            )
        )
        for child in children.get(span["id"], []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    for span in sorted(spans, key=lambda s: s.get("timestamp", 0)):  # parents that loop: shown anyway
        walk(span, 0)
    return out


__all__ = ["Row", "rows"]
