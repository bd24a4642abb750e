"""The resilience layer's explanations (sidecar/layers/explain.py keeps them): what a call
met — the candidates and their scores, the ejected endpoints, the circuit, the budget,
each attempt — and why it stopped, written once the call is over. Only calls worth one
are explained (retried, failed, refused, or asked); their answer carries the request id,
and the one-line summary when it was asked for.
"""

from __future__ import annotations

from typing import Any

from ..core.destination import Destination
from ..core.errors import MeshError
from .base import Request, Response
from .bookkeeping import Attempt
from .call import Call
from .explain import EXPLAIN_HEADER, ID_RESPONSE_HEADER, Explanations, now_wall, summary

Explanation = dict[str, Any]  # the JSON served at /explain (see Explanations)
Row = dict[str, Any]  # one attempt in an explanation's "attempts"


def attempt_row(attempt: Attempt, note: str = "") -> Row:
    """An attempt as an explanation lists it; ``note``: e.g. " (lost the race)"."""
    return {
        "endpoint": attempt.endpoint.address,
        "outcome": attempt.outcome.name + note,
        "ms": round(attempt.elapsed * 1000, 2),
    }


class Explainer:
    __slots__ = ("explanations",)

    def __init__(self, explanations: Explanations) -> None:
        self.explanations = explanations

    def record(
        self,
        destination: Destination,
        request: Request,
        call: Call,
        rows: list[Row],
        stopped: str,
        now: float,
        timeout_fired: str = "",
    ) -> Explanation:
        """Explain a call that is over: ``rows``, its attempts; ``stopped``, why there was
        no other ("success" when none was needed); ``timeout_fired``: which one, if any."""
        settings = destination.settings
        explanations = self.explanations
        explanation = {
            "request_id": call.request_id or explanations.new_id(),
            "at": now_wall(),
            "service": request.service,
            "method": request.head.method.decode("ascii", "replace"),
            # the path only: a query can carry a credential (?token=), and the admin listener shows this
            "target": request.target.partition(b"?")[0].decode("latin-1"),
            "route": request.rule.ref if request.rule is not None else None,
            "subset": dict(request.subset),
            "policy": settings.name or "defaults",
            "load_balancer": settings.load_balancer,
            "candidates": [
                {"endpoint": address, "score": round(score, 6)}
                for address, score in destination.balancer(request.subset).scores(now)
            ],
            "outliers": [e for e in destination.outlier.snapshot(now) if e["state"] != "healthy"],
            "circuit": destination.breaker.snapshot(now),
            "budget": destination.budget.snapshot(now),
            "attempts": rows,
            "stopped": stopped if stopped != "success" else "",
            "result": rows[-1]["outcome"] if rows else stopped,
            "timeout": {
                "overall": call.timeout if call.timeout is not None else request.timeout,
                "per_try": settings.per_try_timeout,
                "fired": timeout_fired,
            },
        }
        explanations.add(explanation)
        return explanation

    def failure(
        self,
        failure: MeshError,
        destination: Destination,
        request: Request,
        call: Call,
        rows: list[Row],
        now: float,
    ) -> MeshError:
        """A call stopped by ``failure`` before an attempt could answer (refused, or no
        endpoint): explained, with the request id in the headers its answer will carry."""
        explanation = self.record(destination, request, call, rows, failure.reason.name, now)
        return with_id(failure, explanation, call)


def id_headers(explanation: Explanation, call: Call) -> list[tuple[bytes, bytes]]:
    """The request id for the response, and the one-line summary if it was asked for."""
    out = [(ID_RESPONSE_HEADER, explanation["request_id"].encode("latin-1", "replace"))]
    if call.explain:
        out.append((EXPLAIN_HEADER, summary(explanation)))
    return out


def with_id(failure: MeshError, explanation: Explanation, call: Call) -> MeshError:
    failure.headers = (*failure.headers, *id_headers(explanation, call))
    return failure


def tag(response: Response, explanation: Explanation, call: Call) -> None:
    """Give an explained response its request id (a pre-serialized one goes as it is)."""
    if response.raw is None:
        response.headers.extend(id_headers(explanation, call))


__all__ = ["Explainer", "Explanation", "Row", "attempt_row", "id_headers", "tag", "with_id"]
