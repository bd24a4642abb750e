"""What a call gets when the circuit is open (at its first attempt, or opened by the
attempts before): the policy's fallback answer, or its fallback service, or 503
``circuit-open`` with when the next trial is due — at once, without waiting for a timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from meshlet.headers import FALLBACK_HEADER

from ..core import errors
from ..core.destination import Destination, Destinations
from ..core.errors import MeshError, policy_response
from .base import Request, Response
from .call import Call
from .explainer import Explainer, Row, id_headers, with_id

_CIRCUIT_OPEN = b"circuit-open"

# The attempts of a call to a destination (sidecar/layers/attempts.py): the fallback
# service gets them too. (destination, request, call, now) → the answer.
RunAttempts = Callable[[Destination, Request, Call, float], Awaitable[Response]]
# Looks up a service this sidecar does not know yet (raises MeshError when it cannot).
Discover = Callable[[str], Awaitable[object]]


class CircuitOpen:
    __slots__ = ("destinations", "explainer", "clock", "discover", "attempts")

    def __init__(
        self,
        destinations: Destinations,
        explainer: Explainer,
        clock: Callable[[], float],
        discover: Discover | None,
        attempts: RunAttempts,
    ) -> None:
        self.destinations = destinations
        self.explainer = explainer
        self.clock = clock
        self.discover = discover
        self.attempts = attempts

    async def answer(
        self, destination: Destination, request: Request, call: Call, rows: list[Row], now: float
    ) -> Response:
        """The answer to a call whose circuit is open; ``rows``: its attempts so far."""
        explanation = self.explainer.record(destination, request, call, rows, "circuit-open", now)
        fallback = destination.settings.fallback
        if fallback is not None and fallback.status is not None:
            response = Response(fallback.status, b"", [])
            headers = [*fallback.headers, (FALLBACK_HEADER, _CIRCUIT_OPEN), *id_headers(explanation, call)]
            response.raw = policy_response(fallback.status, headers, fallback.body)
            return response
        if fallback is not None and fallback.service is not None and not call.fell_back:
            return await self._fall_back(fallback.service, request, call)
        wait = destination.breaker.retry_after(now)
        failure = MeshError(
            errors.CIRCUIT_OPEN,
            f"the circuit to {request.service} is open (too many failures); next trial in {wait:.1f}s",
        )
        raise with_id(failure, explanation, call)

    async def _fall_back(self, service: str, request: Request, call: Call) -> Response:
        """The request goes to the fallback service instead (once: a fallback's own
        fallback is not followed)."""
        call.fell_back = True
        if call.replay is not None:  # attempts read some of the body: the fallback gets it whole
            cursor = call.replay.cursor()
            if cursor is None:
                raise MeshError(errors.CIRCUIT_OPEN, f"the circuit is open and the body is too large for {service}")
            request.body = cursor
        if service not in self.destinations.services and self.discover is not None:
            try:
                await self.discover(service)  # a fallback the app never called: look it up
            except MeshError:
                pass  # then it has no endpoint: 503 below, explained
        request.service = service
        request.subset = ()
        request.rule = None
        request.authority = service.encode()
        now = self.clock()
        response = await self.attempts(self.destinations.get(service, None, now), request, call, now)
        if response.raw is None:
            response.headers.append((FALLBACK_HEADER, _CIRCUIT_OPEN))
        return response


__all__ = ["FALLBACK_HEADER", "CircuitOpen", "Discover", "RunAttempts"]
