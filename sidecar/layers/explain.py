"""Why the sidecar did what it did with a request (every decision explainable, docs/policy.md).

The resilience layer writes an explanation for the requests worth one: those that asked
(``x-meshlet-explain: 1``) and those where something happened — a retry, a failure, a
rejection (circuit open, overloaded, rate limited). A request that went through on its
first try costs nothing here. Explanations are kept in a ring of the last
:data:`KEPT`, by request id (the client's ``x-request-id``, or one we make), and served
at ``/explain?request_id=`` on the admin port; the ids of the recent ones at ``/explain``.
A request that asked also gets a one-line summary in the ``x-meshlet-explain`` response
header, and every explained response carries ``x-meshlet-request-id``.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from typing import Any

from meshlet.headers import EXPLAIN_HEADER, ID_RESPONSE_HEADER

KEPT = 512
REQUEST_ID_HEADER = b"x-request-id"


class Explanations:
    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self.by_id: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._prefix = os.urandom(4).hex()
        self._numbers = itertools.count(1)

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._numbers)}"

    def add(self, explanation: dict[str, Any]) -> None:
        by_id = self.by_id
        by_id[explanation["request_id"]] = explanation
        by_id.move_to_end(explanation["request_id"])
        while len(by_id) > self.kept:
            by_id.popitem(last=False)

    def get(self, request_id: str | None) -> Any:
        """One explanation, or (no id) the recent ones in brief, newest first."""
        if request_id:
            return self.by_id.get(request_id)
        return [
            {"request_id": e["request_id"], "at": e["at"], "service": e["service"], "result": e["result"]}
            for e in reversed(self.by_id.values())
        ]


def summary(explanation: dict[str, Any]) -> bytes:
    """The ``x-meshlet-explain`` header: the explanation on one line."""
    parts = [
        f"route={explanation['route'] or '-'}",
        f"policy={explanation['policy']}",
        f"lb={explanation['load_balancer']}",
    ]
    tries = explanation["attempts"]
    if tries:
        shown = "; ".join(f"{t['endpoint']} {t['outcome']} {t['ms']:g}ms" for t in tries)
        parts.append(f"attempts={len(tries)} ({shown})")
    if explanation["stopped"]:
        parts.append(f"stopped={explanation['stopped']}")
    circuit = explanation["circuit"]
    parts.append(f"circuit={circuit['state']} {circuit['failures']}/{circuit['calls']} failed")
    parts.append(f"budget={explanation['budget']['remaining']:g} retries left")
    parts.append(f"timeout={explanation['timeout']['overall']:g}s")
    if explanation["timeout"]["fired"]:
        parts.append(f"fired={explanation['timeout']['fired']}")
    return " ".join(parts).encode("latin-1", "replace")


def now_wall() -> float:
    return round(time.time(), 3)


__all__ = ["EXPLAIN_HEADER", "ID_RESPONSE_HEADER", "REQUEST_ID_HEADER", "Explanations", "summary"]
