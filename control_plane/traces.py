"""The embedded trace store: Zipkin's v2 API on a bounded in-memory store (docs/tracing.md).
Pure: ``now`` (wall-clock seconds) is passed in.

Sidecars (or any Zipkin client) POST batches of spans (``/api/v2/spans``); ``meshlet
trace``, the dashboard or a Zipkin UI pointed at the control plane read them back through
the query API, in Zipkin's own shapes:

* ``services()`` — ``/api/v2/services``: every service name seen, sorted;
* ``span_names(service)`` — ``/api/v2/spans?serviceName=``: the span names it recorded;
* ``traces(...)`` — ``/api/v2/traces``: traces (each a list of spans) with a span of
  ``service`` (and ``span_name``), whose duration is within ``min_duration`` ..
  ``max_duration`` (µs), that ended within ``lookback`` ms before ``end_ts`` (ms), the
  newest first, at most ``limit``;
* ``trace(id)`` — ``/api/v2/trace/{traceId}``: its spans, or None; ``trace_many(ids)`` —
  ``/api/v2/traceMany?traceIds=``: those of them that are held;
* ``remote_services(service)`` — ``/api/v2/remoteServices?serviceName=``: the services
  its spans name as the other end;
* ``dependencies(...)`` — ``/api/v2/dependencies?endTs=&lookback=``: who calls whom, from
  the traces of that window: a link per caller and callee with its call and error counts
  (Zipkin's ``DependencyLink``). A SERVER span is a call from its parent span's service (or,
  with no parent held, from the service its remote endpoint names); a CLIENT span whose
  callee recorded nothing (no SERVER span under it) is a call to its remote endpoint's
  service. A span tagged ``error`` is an erroneous call.

Bounds: at most ``max_spans`` spans and ``max_age`` seconds. When either is passed, whole
traces go, the least recently written first. A span written twice (the same trace, id
and kind) replaces the earlier copy, as Zipkin merges them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class _Trace:
    spans: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (id, kind) → span
    written: float = 0.0  # when a span of it last arrived (seconds)

    def services(self) -> set[str]:
        return {s["localEndpoint"]["serviceName"] for s in self.spans.values() if s.get("localEndpoint")}

    def bounds(self) -> tuple[int, int]:
        """(the first timestamp, the last end) in µs."""
        starts = [s.get("timestamp", 0) for s in self.spans.values()]
        ends = [s.get("timestamp", 0) + s.get("duration", 0) for s in self.spans.values()]
        return min(starts), max(ends)


class TraceStore:
    def __init__(self, max_spans: int = 100_000, max_age: float = 3600.0) -> None:
        self.max_spans = max_spans
        self.max_age = max_age
        self._traces: OrderedDict[str, _Trace] = OrderedDict()  # least recently written first
        self.span_count = 0
        self.dropped = 0  # spans let go to stay within the bounds

    def add(self, spans: list[dict[str, Any]], now: float) -> int:
        """Store a batch (already validated); returns how many spans were stored."""
        for span in spans:
            trace_id = span["traceId"].rjust(32, "0")  # 64-bit ids join their 128-bit form
            trace = self._traces.get(trace_id)
            if trace is None:
                trace = self._traces[trace_id] = _Trace()
            key = (span["id"], span.get("kind", ""))
            if key not in trace.spans:
                self.span_count += 1
            local = span.get("localEndpoint")
            if local and "serviceName" in local:  # Zipkin keeps service names lower-case
                span = {**span, "localEndpoint": {**local, "serviceName": local["serviceName"].lower()}}
            trace.spans[key] = {**span, "traceId": trace_id}
            trace.written = now
            self._traces.move_to_end(trace_id)
        self._evict(now)
        return len(spans)

    def _evict(self, now: float) -> None:
        traces = self._traces
        while traces:
            oldest_id, oldest = next(iter(traces.items()))
            if self.span_count <= self.max_spans and now - oldest.written <= self.max_age:
                break
            del traces[oldest_id]
            self.span_count -= len(oldest.spans)
            self.dropped += len(oldest.spans)

    def services(self) -> list[str]:
        return sorted({name for trace in self._traces.values() for name in trace.services()})

    def span_names(self, service: str) -> list[str]:
        service = service.lower()
        return sorted(
            {
                s.get("name", "")
                for trace in self._traces.values()
                for s in trace.spans.values()
                if (s.get("localEndpoint") or {}).get("serviceName") == service
            }
        )

    def trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        found = self._traces.get(trace_id.lower().rjust(32, "0"))
        return None if found is None else _ordered(found)

    def trace_many(self, trace_ids: list[str]) -> list[list[dict[str, Any]]]:
        return [spans for trace_id in trace_ids if (spans := self.trace(trace_id)) is not None]

    def remote_services(self, service: str) -> list[str]:
        service = service.lower()
        return sorted(
            {
                remote["serviceName"].lower()
                for trace in self._traces.values()
                for s in trace.spans.values()
                if _service(s) == service and (remote := s.get("remoteEndpoint")) and remote.get("serviceName")
            }
        )

    def dependencies(self, *, end_ts: int, lookback: int | None = None) -> list[dict[str, Any]]:
        """Links ``{parent, child, callCount, errorCount}`` from the traces that overlap the
        ``lookback`` ms (default a day) before ``end_ts`` (ms), sorted by parent then child."""
        end_us = end_ts * 1000
        start_us = end_us - (lookback if lookback is not None else 86_400_000) * 1000
        links: dict[tuple[str, str], list[int]] = {}
        for trace in self._traces.values():
            first, last = trace.bounds()
            if last < start_us or first > end_us:
                continue
            for caller, callee, error in _calls(trace):
                counts = links.setdefault((caller, callee), [0, 0])
                counts[0] += 1
                counts[1] += error
        return [
            {"parent": parent, "child": child, "callCount": calls, "errorCount": errors}
            for (parent, child), (calls, errors) in sorted(links.items())
        ]

    def traces(
        self,
        *,
        service: str | None = None,
        span_name: str | None = None,
        min_duration: int | None = None,
        max_duration: int | None = None,
        end_ts: int | None = None,
        lookback: int | None = None,
        limit: int = 10,
        now: float = 0.0,
    ) -> list[list[dict[str, Any]]]:
        end_us = (end_ts if end_ts is not None else int(now * 1000)) * 1000
        start_us = end_us - (lookback if lookback is not None else 86_400_000) * 1000
        service = service.lower() if service else None
        found: list[tuple[int, list[dict[str, Any]]]] = []
        for trace in reversed(self._traces.values()):
            first, last = trace.bounds()
            if last < start_us or first > end_us:
                continue
            spans = trace.spans.values()
            if service is not None and not any(
                (s.get("localEndpoint") or {}).get("serviceName") == service
                and (span_name is None or s.get("name") == span_name)
                for s in spans
            ):
                continue
            duration = last - first
            if min_duration is not None and duration < min_duration:
                continue
            if max_duration is not None and duration > max_duration:
                continue
            found.append((first, _ordered(trace)))
        found.sort(key=lambda item: item[0], reverse=True)
        return [spans for _, spans in found[:limit]]


def _service(span: dict[str, Any]) -> str | None:
    return (span.get("localEndpoint") or {}).get("serviceName")


def _calls(trace: _Trace) -> list[tuple[str, str, bool]]:
    """(caller, callee, erroneous) for each call in one trace (see ``dependencies``)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for span in trace.spans.values():
        by_id.setdefault(span["id"], []).append(span)
    answered: set[str] = set()  # CLIENT span ids with a SERVER span under them
    calls: list[tuple[str, str, bool]] = []
    for span in trace.spans.values():
        callee = _service(span)
        if span.get("kind") != "SERVER" or not callee:
            continue
        # The caller: the parent span (Zipkin v2 may also share one id between the CLIENT
        # and the SERVER span of a call; then the CLIENT span of that id is the parent).
        parents = [p for p in by_id.get(span.get("parentId", ""), []) if p is not span]
        parents += [p for p in by_id.get(span["id"], []) if p.get("kind") == "CLIENT"]
        caller = next((_service(p) for p in parents if _service(p)), None)
        for parent in parents:
            if parent.get("kind") == "CLIENT":
                answered.add(parent["id"])
        if caller is None:
            caller = ((span.get("remoteEndpoint") or {}).get("serviceName") or "").lower() or None
        if caller is not None and caller != callee:
            calls.append((caller, callee, "error" in (span.get("tags") or {})))
    for span in trace.spans.values():
        caller = _service(span)
        if span.get("kind") != "CLIENT" or span["id"] in answered or not caller:
            continue
        callee = ((span.get("remoteEndpoint") or {}).get("serviceName") or "").lower()
        if callee:
            calls.append((caller, callee, "error" in (span.get("tags") or {})))
    return calls


def _ordered(trace: _Trace) -> list[dict[str, Any]]:
    return sorted(trace.spans.values(), key=lambda s: (s.get("timestamp", 0), s.get("kind") != "CLIENT"))


__all__ = ["TraceStore"]
