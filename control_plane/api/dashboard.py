"""The dashboard: one page, no build step, nothing fetched from elsewhere (control_plane/static),
and /v1/dashboard, everything it draws in one answer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .. import golden
from ..scraper import Scraper
from ..server import PushServer
from ..traces import TraceStore
from .policies import policies_push_version
from .registry import endpoints_json
from .replies import JSON
from .status import sessions_json

DASHBOARD_HTML = (Path(__file__).parent.parent / "static" / "dashboard.html").read_text()

WINDOW = 30.0  # seconds the dashboard's golden metrics and circuit states are computed over


class Dashboard:
    def __init__(self, push: PushServer, traces: TraceStore, scraper: Scraper | None) -> None:
        self.push = push
        self.traces = traces
        self.scraper = scraper

    async def page(self, request: Request) -> Response:
        return HTMLResponse(DASHBOARD_HTML)

    async def data(self, request: Request) -> Response:
        # The page asks every 2 s while it is open.
        push, scraper = self.push, self.scraper
        services = endpoints_json(push.registry, push.registry.services())
        data: JSON = {
            "services": services,
            "sidecars": sessions_json(push, trio.current_time()),
            "policy_version": push.policies.version if push.policies is not None else "",
            # the same policy as the sidecars name it in their ACKs (their "policies" version)
            "policy_push_version": policies_push_version(push),
            "window_seconds": WINDOW,
            "traces": [trace_summary(t) for t in self.traces.traces(limit=12, now=time.time())],
        }
        if scraper is not None:
            scraper.wanted()
            windows = scraper.windows(WINDOW)  # once: both groupings are sums of the same windows
            data["stat"] = {by: [row.to_json() for row in golden.rows(windows, by)] for by in ("service", "edge")}
            data["health"] = scraper.health(WINDOW)
            data["warming_up"] = not windows and bool(services)
        return JSONResponse(data)


def trace_summary(spans: list[dict[str, Any]]) -> JSON:
    """One line of the dashboard's recent traces: where it entered, how long, any error."""
    root = next((s for s in spans if not s.get("parentId")), spans[0])
    start = min(s.get("timestamp", 0) for s in spans)
    end = max(s.get("timestamp", 0) + s.get("duration", 0) for s in spans)
    return {
        "traceId": root["traceId"],
        "service": (root.get("localEndpoint") or {}).get("serviceName", ""),
        "name": root.get("name", ""),
        "timestamp": start,
        "duration": end - start,
        "spans": len(spans),
        "error": any("error" in (s.get("tags") or {}) for s in spans),
    }
