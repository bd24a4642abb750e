"""The sidecars' golden metrics, read by the control plane's scraper (control_plane/golden.py):
/v1/stat for `meshlet stat` and `top`, and /v1/stream, Hystrix's event stream (what Hystrix
dashboards and Turbine read)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import golden
from ..scraper import Scraper
from .replies import JSON, bad, no_metrics

HYSTRIX_WINDOW = 10.0  # seconds: Hystrix's metrics.rollingStats.timeInMilliseconds default


class StatView:
    """``scraper``: None when this control plane does not read sidecar metrics (both answer 404)."""

    def __init__(self, scraper: Scraper | None) -> None:
        self.scraper = scraper

    async def stat(self, request: Request) -> Response:
        # Golden metrics over a window, from the sidecars' own counters.
        by = request.query_params.get("by", "service")
        if by not in golden.BY:
            return bad(f"by must be one of {', '.join(golden.BY)}")
        try:
            window = float(request.query_params.get("window", "30"))
        except ValueError:
            return bad("window must be a number of seconds")
        if not 1 <= window <= 300:
            return bad("window must be between 1 and 300 seconds")
        if self.scraper is None:
            return no_metrics()
        return JSONResponse(self.scraper.stat(by, window))

    async def stream(self, request: Request) -> Response:
        # Every second, per destination, a HystrixCommand event with the circuit state and the
        # rolling counts of the last 10 s (Hystrix's default rolling window), over every
        # calling sidecar.
        if self.scraper is None:
            return no_metrics()
        return StreamingResponse(
            _hystrix_stream(self.scraper),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )


async def _hystrix_stream(scraper: Scraper) -> AsyncIterator[str]:
    while True:
        scraper.wanted()
        for event in hystrix_events(scraper, HYSTRIX_WINDOW):
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
        yield ": ping\n\n"  # a comment line: keeps proxies from closing an idle stream
        await trio.sleep(1.0)


def hystrix_events(scraper: Scraper, window: float) -> list[JSON]:
    """One HystrixCommand event per destination the sidecars call (hystrix-core's
    HystrixStreamingOutputProvider fields a dashboard needs)."""
    health = scraper.health(window)
    out = []
    for row in golden.rows(scraper.windows(window), "destination"):
        state = health.get(row.name, {})
        requests = int(row.requests)
        failures = requests - round(requests * (row.success if row.success is not None else 1.0))
        latencies = {"50": row.p50, "90": row.p95, "99": row.p99}  # 90: nearest we keep (p95)
        reasons = row.reasons
        out.append(
            {
                "type": "HystrixCommand",
                "name": row.name,
                "group": "meshlet",
                "currentTime": int(time.time() * 1000),
                "isCircuitBreakerOpen": bool(state.get("open")),
                "circuitOpenOn": state.get("open", 0),  # sidecars (each keeps its own breaker)
                "errorPercentage": round(100 * failures / requests) if requests else 0,
                "errorCount": failures,
                "requestCount": requests,
                "rollingCountSuccess": requests - failures,
                "rollingCountFailure": failures,
                "rollingCountShortCircuited": int(reasons.get("circuit-open", 0)),
                "rollingCountTimeout": int(reasons.get("timeout", 0)),
                "rollingCountThreadPoolRejected": 0,  # no thread pools: bulkheads are semaphores
                "rollingCountSemaphoreRejected": int(reasons.get("overloaded", 0)),
                "latencyTotal_mean": round((row.p50 or 0) * 1000),
                "latencyTotal": {k: round((v or 0) * 1000) for k, v in latencies.items()},
                "reportingHosts": 1,
                "propertyValue_metricsRollingStatisticalWindowInMilliseconds": int(window * 1000),
                "rollingRps": round(row.rps, 3),
            }
        )
    return out
