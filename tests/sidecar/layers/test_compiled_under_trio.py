"""Compiled coroutines under trio: what Cython may change and trio relies on.

sidecar.layers.errors and sidecar.layers.metrics are compiled where the build could
(setup.py); here their handlers are awaited, cancelled and made to fail under trio, on
whichever build this process runs (``make test`` runs this file on both)."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Coroutine

import pytest
import trio

from sidecar.core.http1 import RequestHead
from sidecar.layers.base import Request, Response
from sidecar.layers.errors import errors_layer
from sidecar.layers.metrics import metrics_layer
from sidecar.telemetry import Telemetry


def request() -> Request:
    return Request(RequestHead(b"GET", b"/x", [], host=b"item"), None, b"127.0.0.1")


async def test_a_compiled_handler_is_a_coroutine_function_trio_runs_and_cancels() -> None:
    started, cancelled = trio.Event(), []

    async def forever(request: Request) -> Response:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise
        raise AssertionError("not reached")  # pragma: no cover

    handle = errors_layer(metrics_layer(forever, Telemetry(), "outbound", "client"))
    assert inspect.iscoroutinefunction(handle)
    coroutine = handle(request())
    assert isinstance(coroutine, Coroutine)
    coroutine.close()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, request())
        await started.wait()
        nursery.cancel_scope.cancel()
    assert cancelled == [True]


async def test_an_exception_through_compiled_frames_keeps_its_traceback() -> None:
    async def broken(request: Request) -> Response:
        raise KeyError("boom")

    telemetry = Telemetry()
    handle = metrics_layer(broken, telemetry, "outbound", "client")
    with pytest.raises(KeyError) as caught:
        await handle(request())
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-1] == "broken" and "handle" in frames
    assert telemetry.inflight["outbound"] == 0  # the compiled except clause ran


async def test_the_errors_layer_answers_what_failed_under_it() -> None:
    async def broken(request: Request) -> Response:
        raise KeyError("boom")

    response = await errors_layer(broken)(request())
    assert response.status == 500
