"""The waterfall of a trace (control_plane/waterfall.py): tree order, offsets, bars."""

from __future__ import annotations

from typing import Any

from meshlet.cli.waterfall import rows

T = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(i: int, parent: int | None, service: str, kind: str, start: int, duration: int, **tags: str) -> dict[str, Any]:
    made: dict[str, Any] = {
        "traceId": T,
        "id": f"{i:016x}",
        "kind": kind,
        "name": f"op{i}",
        "timestamp": 1_000_000 + start,
        "duration": duration,
        "localEndpoint": {"serviceName": service},
        "tags": {"http.status_code": "200", **tags},
    }
    if parent is not None:
        made["parentId"] = f"{parent:016x}"
    return made


def test_spans_in_tree_order_with_offsets_and_bars() -> None:
    spans = [
        span(5, 3, "user", "CLIENT", 3_000, 5_000),  # the retry: after the failed attempt
        span(3, 2, "user", "SERVER", 1_000, 8_000),
        span(4, 3, "user", "CLIENT", 1_500, 1_000, **{"http.status_code": "503", "error": "503"}),
        span(2, 1, "gateway", "CLIENT", 500, 9_000),
        span(1, None, "gateway", "SERVER", 0, 10_000),
        span(9, 77, "item", "SERVER", 4_000, 2_000),  # its parent was not reported: a tree of its own
    ]
    out = rows(spans, width=10)
    assert [(r.depth, r.span_id[-1], r.service) for r in out] == [
        (0, "1", "gateway"),
        (1, "2", "gateway"),
        (2, "3", "user"),
        (3, "4", "user"),
        (3, "5", "user"),
        (0, "9", "item"),
    ]
    first = out[0]
    assert (first.offset_ms, first.duration_ms, first.bar) == (0.0, 10.0, "█" * 10)
    failed = out[3]
    assert (failed.offset_ms, failed.status, failed.error, failed.bar) == (1.5, "503", True, " █")
    assert out[4].bar == "   █████" and not out[4].error


def test_nothing_and_a_loop_in_parent_ids() -> None:
    assert rows([]) == []
    looped = [span(1, 2, "a", "SERVER", 0, 10), span(2, 1, "b", "SERVER", 0, 10)]
    # every span has a parent in the trace, so no root: shown anyway, and no endless walk
    assert [(r.depth, r.service) for r in rows(looped)] == [(0, "a"), (1, "b")]
