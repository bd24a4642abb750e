"""Hedging: the first attempt, and after ``hedge_after`` without an answer a second one to
another endpoint (if the retry budget has one to spend); the first good answer wins, the
other attempt is cancelled (its connection closed). Only a first attempt is hedged, and
only a request without a body (sidecar/layers/attempts.py decides when).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import trio

from ..core.attempts import pick
from ..core.balance import Balancer
from ..core.destination import Destination
from ..core.errors import MeshError
from ..core.services import Endpoint
from .base import Handler, Request
from .bookkeeping import Attempt, Bookkeeping
from .call import ATTEMPT_HEADER

_SECOND = (ATTEMPT_HEADER, b"2")


class Race(NamedTuple):
    winner: Attempt  # the first good answer, else the last answer
    losers: list[Attempt]  # the others that ended with an answer (a cancelled one has none)
    hedged: bool  # a second attempt was sent


class Hedging:
    """``on_hedged(service)``: a second attempt was sent."""

    __slots__ = ("inner", "book", "clock", "on_hedged")

    def __init__(
        self, inner: Handler, book: Bookkeeping, clock: Callable[[], float], on_hedged: Callable[[str], None]
    ) -> None:
        self.inner = inner
        self.book = book
        self.clock = clock
        self.on_hedged = on_hedged

    async def race(
        self,
        destination: Destination,
        balancer: Balancer,
        request: Request,
        first: Endpoint,
        tried: list[Endpoint],
        hedge_after: float,
    ) -> Race:
        """Send ``request`` to ``first``, hedged after ``hedge_after`` seconds; the second
        endpoint goes into ``tried``. The losers' responses are closed, never reused."""
        clock, book, inner = self.clock, self.book, self.inner
        outlier = destination.outlier
        answers: list[Attempt] = []
        running = 0
        hedged = False

        async def attempt(req: Request, endpoint: Endpoint, scope: trio.CancelScope) -> None:
            nonlocal running
            running += 1
            sent = book.start(balancer, outlier, endpoint, clock())
            try:
                response = await inner(req)
            except MeshError as exc:
                answer = book.end(balancer, outlier, endpoint, sent, exc)
            except BaseException:  # cancelled: it lost
                book.abandon(balancer, outlier, endpoint, sent)
                raise
            else:
                answer = book.end(balancer, outlier, endpoint, sent, response)
            answers.append(answer)
            if not answer.failed or running == len(answers):
                scope.cancel()  # a good answer (or the last one): the race is over

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, request, first, nursery.cancel_scope)
            await trio.sleep(hedge_after)
            now = clock()
            second = pick(destination, balancer, tried, now)
            if second is not None and second != first and destination.budget.try_spend(now):
                self.on_hedged(request.service)
                hedged = True
                tried.append(second)
                nursery.start_soon(attempt, _copy_for(request, second), second, nursery.cancel_scope)
            else:
                await trio.sleep_forever()  # no hedge: wait for the first attempt
        winner = next((a for a in answers if not a.failed), answers[-1])
        losers = [a for a in answers if a is not winner]
        for loser in losers:
            if loser.response is not None:
                loser.response.finish(False)  # the loser's answer: dropped, its connection closed
        return Race(winner, losers, hedged)


def _copy_for(request: Request, endpoint: Endpoint) -> Request:
    """The same request for a hedged attempt: its own head (its own attempt header)."""
    headers = [h for h in request.head.headers if h[0] is not ATTEMPT_HEADER]
    headers.append(_SECOND)
    head = dataclasses.replace(request.head, headers=headers)
    copy = Request(head, None, request.peer_ip)
    copy.attempt = 2
    copy.trace = request.trace
    for name in (
        "service",
        "target",
        "authority",
        "nursery",
        "source",
        "connect_timeout",
        "timeout",
        "rule",
        "subset",
        "deadline",
    ):
        setattr(copy, name, getattr(request, name))
    copy.direction = request.direction
    copy.endpoint = endpoint
    return copy


__all__ = ["Hedging", "Race"]
