"""One attempt's accounts (sidecar/layers/bookkeeping.py): what the balancer and the
outlier detector hear at its start and its end, and the Attempt it ends with."""

from __future__ import annotations

import random

import pytest

from sidecar.core import errors
from sidecar.core.balance import Balancer, make_balancer
from sidecar.core.errors import MeshError
from sidecar.core.outcome import Outcome
from sidecar.core.outlier import OutlierConfig, OutlierDetector
from sidecar.core.services import Endpoint
from sidecar.layers.base import Response
from sidecar.layers.bookkeeping import Bookkeeping

A = Endpoint("10.0.0.1", 80)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def accounts() -> tuple[Bookkeeping, Clock, Balancer, OutlierDetector]:
    clock = Clock()
    balancer = make_balancer("least_request", [A], random.Random(1))
    outlier = OutlierDetector(OutlierConfig(consecutive_failures=2, max_ejected_percent=100), [A])
    return Bookkeeping(clock, clock), clock, balancer, outlier


def mesh_response(status: int, reason: str) -> Response:
    response = Response(status, b"", [])
    response.mesh_error = reason
    return response


@pytest.mark.parametrize(
    ("answer", "outcome", "failed"),
    [
        (Response(200, b"OK", []), Outcome(200), False),
        (Response(404, b"", []), Outcome(404), False),
        (Response(503, b"", []), Outcome(503), True),
        (Response(700, b"", []), Outcome(700), True),  # past the made-once outcomes
        (mesh_response(503, "circuit-open"), Outcome(503, "circuit-open"), True),  # the next sidecar's
        (
            MeshError(errors.CONNECT_FAILED, "no", cause="refused"),
            Outcome(503, "connect-failed", True, "refused"),
            True,
        ),
        (MeshError(errors.BAD_REQUEST, "no"), Outcome(400, "bad-request", True), False),
    ],
)
def test_an_answer_is_classified_once_into_the_attempt(
    answer: Response | MeshError, outcome: Outcome, failed: bool
) -> None:
    book, clock, balancer, outlier = accounts()
    sent = book.start(balancer, outlier, A, clock.now)
    assert balancer.states.in_flight(A) == 1
    clock.now += 0.25
    attempt = book.end(balancer, outlier, A, sent, answer)
    assert (attempt.endpoint, attempt.outcome, attempt.failed) == (A, outcome, failed)
    assert (attempt.elapsed, attempt.ended) == (0.25, 100.25)
    if isinstance(answer, MeshError):
        assert (attempt.response, attempt.error) == (None, answer)
    else:
        assert (attempt.response, attempt.error) == (answer, None)
    assert balancer.states.in_flight(A) == 0


def test_the_detector_hears_each_end_and_nothing_of_an_abandoned_attempt() -> None:
    book, clock, balancer, outlier = accounts()
    for _ in range(3):  # abandoned (cancelled) attempts: no verdict on the endpoint
        sent = book.start(balancer, outlier, A, clock.now)
        book.abandon(balancer, outlier, A, sent)
    assert outlier.available(clock.now) == ((A,), False)
    assert balancer.states.in_flight(A) == 0
    for _ in range(2):  # two failures in a row: ejected
        sent = book.start(balancer, outlier, A, clock.now)
        book.end(balancer, outlier, A, sent, Response(503, b"", []))
    assert outlier.available(clock.now) == ((A,), True)  # the only one, ejected: panic
