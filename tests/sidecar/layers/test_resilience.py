"""The resilience layer (sidecar/layers/resilience.py) against scripted upstreams, on
trio's fake clock: retries go to another endpoint and stop where docs/policy.md says, the
budget caps them, the breaker opens and answers fast, then recovers; fallbacks, rate
limits, bulkheads, deadlines, and bodies that are replayed or never sent twice."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
import trio
import trio.testing

from sidecar.core import errors
from sidecar.core.breaker import BreakerConfig, State
from sidecar.core.destination import DEFAULTS, Destinations, Fallback, Settings
from sidecar.core.errors import MeshError
from sidecar.core.http1 import RequestHead
from sidecar.core.outcome import RetryOn
from sidecar.core.services import Endpoint, ServiceConfig
from sidecar.layers.base import WOULD_BLOCK, Request, Response
from sidecar.layers.errors import errors_layer
from sidecar.layers.explain import Explanations
from sidecar.layers.resilience import resilience_layer

A, B, C = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)

# endpoint → what it does: an int status, "refused", "reset", "hang", or a callable
Behaviour = Callable[[Request], object]


class Upstreams:
    """The forwarder's stand-in: each endpoint answers as scripted; every call is logged."""

    def __init__(self, **script: object) -> None:
        self.script = {A: 200, B: 200, C: 200}
        self.script.update({globals()[k]: v for k, v in script.items()})
        self.calls: list[tuple[Endpoint, dict[bytes, bytes], bytes]] = []
        self.finished: list[bool] = []
        self.gate: trio.Event | None = None  # when set: every call waits for it first

    async def __call__(self, request: Request) -> Response:
        assert request.endpoint is not None
        if self.gate is not None:
            await self.gate.wait()
        body = b""
        if request.body is not None:
            while (piece := await request.body.read()) is not None:
                body += piece
        self.calls.append((request.endpoint, dict(request.head.headers), body))
        what = self.script[request.endpoint]
        if callable(what):
            what = what(request)
        if what == "refused":
            raise MeshError(errors.CONNECT_FAILED, "refused", cause="refused")
        if what == "reset":
            raise MeshError(errors.UPSTREAM_RESET, "reset")
        if isinstance(what, float):  # a slow answer, in seconds
            await trio.sleep(what)
            what = 200
        if what == "hang":
            await trio.sleep(request.timeout)
            raise MeshError(errors.TIMEOUT, "no response")
        if isinstance(what, tuple):
            status, headers = what
        else:
            status, headers = what, []
        response = Response(int(status), b"", list(headers))
        response.on_finish = self.finished.append
        return response

    def hits(self) -> Counter[Endpoint]:
        return Counter(endpoint for endpoint, _, _ in self.calls)


class Body:
    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    async def read(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else None

    def read_nowait(self) -> object:
        return WOULD_BLOCK


def mesh(
    upstreams: Upstreams,
    settings: Settings = DEFAULTS,
    endpoints: tuple[Endpoint, ...] = (A, B, C),
    lb: str = "round_robin",
    zone: str | None = None,
    shadow: Settings | None = None,
) -> tuple[Callable[..., object], Destinations]:
    from dataclasses import replace

    destinations = Destinations(random.Random(1), local_zone=zone)
    destinations.configure(
        {"item": ServiceConfig("item", endpoints)},
        {} if settings.mode == "shadow" else {("item", None): replace(settings, load_balancer=lb)},
        {("item", None): shadow} if shadow is not None else {},
        trio.current_time(),
    )
    retries: list[str] = []
    shadowed: list[tuple[str, str]] = []
    explanations = Explanations()
    handler = errors_layer(
        resilience_layer(
            upstreams,
            destinations,
            rng=random.Random(2),
            on_retry=lambda _s, o: retries.append(o),
            explanations=explanations,
            timer=trio.current_time,  # latencies on the fake clock too
            on_shadow=lambda policy, _d, decision: shadowed.append((policy, decision)),
        )
    )

    async def call(method: bytes = b"GET", body: Body | None = None, **headers: str) -> Response:
        head = RequestHead(method, b"/x", [(k.encode(), v.encode()) for k, v in headers.items()])
        request = Request(head, body, b"127.0.0.1")
        request.service = "item"
        return await handler(request)

    call.retries = retries  # type: ignore[attr-defined]
    call.explanations = explanations  # type: ignore[attr-defined]
    call.shadowed = shadowed  # type: ignore[attr-defined]
    return call, destinations


async def test_a_503_is_retried_on_another_endpoint_with_attempt_and_deadline_headers(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstreams = Upstreams(A=503)
    call, _ = mesh(upstreams)
    response = await call()
    assert response.status == 200
    (first, h1, _), (second, h2, _) = upstreams.calls
    assert (first, second) == (A, B)
    assert (h1[b"x-meshlet-attempt"], h2[b"x-meshlet-attempt"]) == (b"1", b"2")
    assert int(h1[b"x-meshlet-deadline-ms"]) == 15_000 and 14_700 < int(h2[b"x-meshlet-deadline-ms"]) < 15_000
    assert upstreams.finished == [False]  # the 503 given up: its connection closed, never reused
    assert call.retries == ["retried"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("failure", "retried"),
    [("refused", True), ("reset", True), (503, True), (500, False), (502, False), (404, False), (429, False)],
)
async def test_the_default_conditions(failure: object, retried: bool, autojump_clock: trio.abc.Clock) -> None:
    upstreams = Upstreams(A=failure)
    call, _ = mesh(upstreams)
    await call()
    assert len(upstreams.calls) == (2 if retried else 1)


async def test_non_idempotent_methods_are_not_retried_unless_allowed(autojump_clock: trio.abc.Clock) -> None:
    upstreams = Upstreams(A=503, B=503, C=503)
    call, _ = mesh(upstreams)
    assert (await call(b"POST")).status == 503 and len(upstreams.calls) == 1
    from dataclasses import replace

    call, _ = mesh(upstreams, replace(DEFAULTS, non_idempotent=True))
    await call(b"POST")
    assert len(upstreams.calls) == 1 + 3  # the first try and two retries


async def test_attempts_end_with_the_last_answer(autojump_clock: trio.abc.Clock) -> None:
    upstreams = Upstreams(A=503, B=503, C=503)
    call, _ = mesh(upstreams)
    response = await call()
    assert response.status == 503 and upstreams.hits() == {A: 1, B: 1, C: 1}
    assert upstreams.finished == [False, False]  # the two given up; the third is the caller's


async def test_retry_after_is_honoured_and_a_long_one_ends_the_retries(autojump_clock: trio.abc.Clock) -> None:
    upstreams = Upstreams(A=(503, [(b"retry-after", b"2")]))
    call, _ = mesh(upstreams)
    start = trio.current_time()
    assert (await call()).status == 200
    assert trio.current_time() - start == pytest.approx(2, abs=0.01)
    upstreams = Upstreams(A=(503, [(b"retry-after", b"60")]))  # past the 15 s deadline
    call, _ = mesh(upstreams)
    assert (await call()).status == 503 and len(upstreams.calls) == 1


async def test_a_per_try_timeout_is_retried_under_gateway_error_within_the_overall_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    from dataclasses import replace

    settings = replace(DEFAULTS, per_try_timeout=1.0, timeout=2.5, retry_on=RetryOn(["gateway-error"]), attempts=5)
    upstreams = Upstreams(A="hang", B="hang", C="hang")
    call, _ = mesh(upstreams, settings)
    start = trio.current_time()
    response = await call()
    assert response.status == 504 and response.mesh_error == "timeout"
    assert len(upstreams.calls) == 3  # 1 s + 1 s + the 0.5 s left: the overall timeout covers them all
    assert trio.current_time() - start <= 2.5 + 0.01


async def test_the_budget_caps_retries_at_the_floor_plus_twenty_percent(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    settings = replace(DEFAULTS, budget_min_per_second=1, budget_window=10, breaker=BreakerConfig(force="closed"))
    upstreams = Upstreams(A=503, B=503, C=503)
    call, _ = mesh(upstreams, settings)
    for _ in range(100):
        await call()
    retried = Counter(call.retries)  # type: ignore[attr-defined]
    assert retried["retried"] == 10 + 20  # floor 1/s × 10 s, and 0.2 × 100 requests
    assert len(upstreams.calls) == 100 + 30  # the upstream saw 30 % extra, not 200 %


async def test_the_breaker_opens_answers_fast_then_half_opens_and_closes(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    settings = replace(DEFAULTS, attempts=0, breaker=BreakerConfig(min_requests=20, open_for=5))
    upstreams = Upstreams(A=500, B=500, C=500)
    call, destinations = mesh(upstreams, settings)
    statuses = [(await call()).status for _ in range(25)]
    assert statuses[:20] == [500] * 20
    assert {r for r in statuses[20:]} == {503}
    assert len(upstreams.calls) == 20  # open: nothing reached the upstream
    rejected = await call()
    assert rejected.mesh_error == "circuit-open" and rejected.raw is not None and b"next trial in" in rejected.raw
    upstreams.script = {A: 200, B: 200, C: 200}  # recovered
    await trio.sleep(5)
    assert (await call()).status == 200  # the trial
    assert destinations.get("item", None, trio.current_time()).breaker.state == 0
    assert all([(await call()).status == 200 for _ in range(10)])


async def test_an_open_circuit_answers_with_the_fallback(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    fallback = Fallback(200, ((b"content-type", b"application/json"),), b'{"items": []}')
    settings = replace(DEFAULTS, attempts=0, breaker=BreakerConfig(force="open"), fallback=fallback)
    upstreams = Upstreams()
    call, _ = mesh(upstreams, settings)
    response = await call()
    assert response.status == 200 and response.raw is not None
    assert response.raw.endswith(b'{"items": []}') and b"x-meshlet-fallback: circuit-open" in response.raw
    assert upstreams.calls == []


async def test_rate_limit_answers_429_with_retry_after(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    call, _ = mesh(Upstreams(), replace(DEFAULTS, rate_limit=(2.0, 3)))
    statuses = [(await call()).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = await call()
    assert limited.raw is not None and b"retry-after: 1" in limited.raw and limited.mesh_error == "rate-limited"
    await trio.sleep(0.5)
    assert (await call()).status == 200  # 2 a second: one more token after 0.5 s


async def test_the_bulkhead_queues_then_rejects(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    upstreams = Upstreams()
    upstreams.gate = trio.Event()
    call, _ = mesh(upstreams, replace(DEFAULTS, max_inflight=2, max_pending=1))
    responses: list[Response] = []

    async def one() -> None:
        responses.append(await call())

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        # 2 under way, 1 waiting for a place, the 4th rejected at once
        assert [r.mesh_error for r in responses] == ["overloaded"] and len(upstreams.calls) == 0
        upstreams.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [r.status for r in responses] == [503, 200, 200]  # the third still waits: none has finished
        responses[1].finish(True)  # a place frees when a response has gone through whole
        await trio.testing.wait_all_tasks_blocked()
    assert [r.status for r in responses] == [503, 200, 200, 200]


async def test_a_small_body_is_replayed_whole_a_large_one_never_sent_twice(autojump_clock: trio.abc.Clock) -> None:
    upstreams = Upstreams(A=503)
    call, _ = mesh(upstreams)
    assert (await call(b"PUT", Body(b"ab", b"cd"))).status == 200
    assert [body for _, _, body in upstreams.calls] == [b"abcd", b"abcd"]

    upstreams = Upstreams(A=503)
    call, _ = mesh(upstreams)
    big = [b"x" * 40_000, b"y" * 40_000]  # 80 KB: over the 64 KiB replay buffer
    response = await call(b"PUT", Body(*big))
    assert response.status == 503 and [body for _, _, body in upstreams.calls] == [b"".join(big)]

    from dataclasses import replace

    upstreams = Upstreams(A=503)
    call, _ = mesh(upstreams, replace(DEFAULTS, replay_limit=4))  # retries.buffer_bytes: 4
    assert (await call(b"PUT", Body(b"abc"))).status == 200 and len(upstreams.calls) == 2
    upstreams = Upstreams(A=503)
    call, _ = mesh(upstreams, replace(DEFAULTS, replay_limit=4))
    assert (await call(b"PUT", Body(b"abc", b"de"))).status == 503 and len(upstreams.calls) == 1


async def test_a_deadline_the_app_passed_on_is_kept(autojump_clock: trio.abc.Clock) -> None:
    upstreams = Upstreams()
    call, _ = mesh(upstreams)
    await call(**{"x-meshlet-deadline-ms": "1200", "x-meshlet-attempt": "7"})
    ((_, headers, _),) = upstreams.calls
    assert headers[b"x-meshlet-deadline-ms"] == b"1200" and headers[b"x-meshlet-attempt"] == b"1"


async def test_what_happened_is_explained_by_request_id(autojump_clock: trio.abc.Clock) -> None:
    upstreams = Upstreams()
    call, _ = mesh(upstreams)
    explanations = call.explanations  # type: ignore[attr-defined]
    fine = await call()  # a first try that went through (A): nothing recorded, nothing added
    assert fine.status == 200 and explanations.by_id == {} and fine.headers == []
    upstreams.script[B] = 503
    retried = await call(**{"x-request-id": "abc"})
    assert dict(retried.headers)[b"x-meshlet-request-id"] == b"abc"
    explained = explanations.get("abc")
    assert [(t["endpoint"], t["outcome"]) for t in explained["attempts"]] == [
        ("10.0.0.2:80", "503"),
        ("10.0.0.3:80", "200"),
    ]
    assert explained["policy"] == "defaults" and explained["circuit"]["state"] == "closed"
    assert explained["circuit"]["calls"] == 3 and explained["circuit"]["failures"] == 1
    assert explained["budget"]["remaining"] > 0 and explained["stopped"] == "" and explained["result"] == "200"
    assert [c["endpoint"] for c in explained["candidates"]] == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    assert [e["request_id"] for e in explanations.get(None)] == ["abc"]

    asked = await call(**{"x-meshlet-explain": "1"})  # asked for: explained even when it went fine
    summary = dict(asked.headers)[b"x-meshlet-explain"].decode()
    assert summary.startswith("route=- policy=defaults lb=round_robin attempts=1") and "timeout=15s" in summary


async def test_a_refusal_is_explained_too(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    call, _ = mesh(Upstreams(), replace(DEFAULTS, breaker=BreakerConfig(force="open")))
    response = await call(**{"x-meshlet-explain": "1"})
    assert response.raw is not None and b"x-meshlet-request-id: " in response.raw
    assert b"stopped=circuit-open" in response.raw
    (explained,) = call.explanations.by_id.values()  # type: ignore[attr-defined]
    assert explained["result"] == "circuit-open" and explained["attempts"] == []


async def test_the_local_zone_first_and_the_others_when_it_fails(autojump_clock: trio.abc.Clock) -> None:
    here = Endpoint("10.0.0.1", 80, labels={"zone": "a"})
    there = Endpoint("10.0.0.2", 80, labels={"zone": "b"})
    upstreams = Upstreams()
    upstreams.script = {here: 200, there: 200}
    call, _ = mesh(upstreams, endpoints=(here, there), lb="ewma", zone="a")
    for _ in range(20):
        await call()
    assert upstreams.hits() == {here: 20}
    upstreams.script[here] = "refused"  # our zone's only endpoint fails: the retry crosses over
    assert (await call()).status == 200 and upstreams.hits()[there] == 1


async def test_hedging_cuts_the_tail_when_an_endpoint_stalls(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    def p99(latencies: list[float]) -> float:
        return sorted(latencies)[int(len(latencies) * 0.99) - 1]

    async def run(settings: Settings) -> tuple[float, Upstreams, list[str]]:
        counter = iter(range(10**6))
        jitter = random.Random(3)
        upstreams = Upstreams()

        def fast(_request: Request) -> float:
            return jitter.uniform(0.005, 0.015)

        # A stalls for 2 s on one request in ten; the others take 5-15 ms.
        upstreams.script = {A: lambda r: 2.0 if next(counter) % 10 == 0 else fast(r), B: fast, C: fast}
        call, _ = mesh(upstreams, settings)
        took = []
        for _ in range(600):
            start = trio.current_time()
            assert (await call()).status == 200
            took.append(trio.current_time() - start)
        return p99(took), upstreams, call.retries  # type: ignore[attr-defined]

    plain, _, _ = await run(DEFAULTS)
    hedged, upstreams, retries = await run(replace(DEFAULTS, hedge_delay="p95"))
    assert plain == pytest.approx(2.0, abs=0.01)  # 1 in 30 requests stalls: the p99
    assert hedged < 0.05, f"p99 {hedged * 1000:.0f} ms with hedging, {plain * 1000:.0f} ms without"
    hedges = retries.count("hedged")
    assert 20 <= hedges <= 80, hedges  # the stalled ones, and the slowest 5 % of the others
    assert len(upstreams.calls) == 600 + hedges


async def test_a_first_try_under_a_hedging_policy_is_explained_only_when_a_hedge_went(
    autojump_clock: trio.abc.Clock,
) -> None:
    from dataclasses import replace

    upstreams = Upstreams()
    call, _ = mesh(upstreams, replace(DEFAULTS, hedge_delay=0.05))
    explanations = call.explanations  # type: ignore[attr-defined]
    fine = await call()  # answered before the hedge was due: a clean first try
    assert fine.status == 200 and fine.headers == [] and explanations.by_id == {}
    upstreams.script[B] = 1.0  # B stalls: a hedge goes to C and wins
    hedged = await call(**{"x-request-id": "h"})
    assert hedged.status == 200 and dict(hedged.headers)[b"x-meshlet-request-id"] == b"h"
    assert [t["endpoint"] for t in explanations.get("h")["attempts"]] == ["10.0.0.3:80"]
    assert call.retries == ["hedged"]  # type: ignore[attr-defined]


async def test_a_hedged_trial_cancelled_by_the_caller_frees_its_half_open_slot(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    breaker = BreakerConfig(min_requests=5, open_for=5, half_open_requests=1)
    upstreams = Upstreams(A=500, B=500, C=500)
    call, destinations = mesh(upstreams, replace(DEFAULTS, hedge_delay=0.05, breaker=breaker))
    assert [(await call()).status for _ in range(5)] == [500] * 5
    assert destinations.get("item", None, trio.current_time()).breaker.state == State.OPEN
    await trio.sleep(5)
    upstreams.script = {A: 200, B: 200, C: 200}
    upstreams.gate = trio.Event()  # the trial and its hedge wait...
    with trio.move_on_after(1) as scope:
        await call()  # ...until the caller gives up
    assert scope.cancelled_caught and len(upstreams.calls) == 5
    upstreams.gate.set()
    assert (await call()).status == 200  # the slot the cancelled trial held is free again
    assert destinations.get("item", None, trio.current_time()).breaker.state == State.CLOSED


async def test_a_shadow_policy_is_counted_and_changes_nothing(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    strict = replace(DEFAULTS, name="strict", mode="shadow", rate_limit=(1.0, 2))
    upstreams = Upstreams()
    call, _ = mesh(upstreams, shadow=strict)
    assert [(await call()).status for _ in range(5)] == [200] * 5  # served by the defaults
    assert Counter(call.shadowed) == {("strict", "allow"): 2, ("strict", "rate-limited"): 3}  # type: ignore[attr-defined]

    closed = replace(DEFAULTS, name="closed", mode="shadow", attempts=0, breaker=BreakerConfig(min_requests=5))
    upstreams = Upstreams(A=500, B=500, C=500)
    call, _ = mesh(upstreams, replace(DEFAULTS, attempts=0, breaker=BreakerConfig(force="closed")), shadow=closed)
    statuses = [(await call()).status for _ in range(8)]
    assert statuses == [500] * 8 and len(upstreams.calls) == 8  # nothing refused for real
    decisions = [d for _, d in call.shadowed]  # type: ignore[attr-defined]
    assert decisions == ["allow"] * 5 + ["circuit-open"] * 3  # its breaker would have opened after 5


async def test_an_open_circuit_sends_the_request_to_the_fallback_service(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    cache = Endpoint("10.0.9.9", 80)
    upstreams = Upstreams()
    upstreams.script[cache] = 200
    settings = replace(DEFAULTS, breaker=BreakerConfig(force="open"), fallback=Fallback(service="item-cache"))
    destinations = Destinations(random.Random(1))
    destinations.configure(
        {"item": ServiceConfig("item", (A,)), "item-cache": ServiceConfig("item-cache", (cache,))},
        {("item", None): settings, ("item-cache", None): replace(settings, fallback=Fallback(service="item"))},
        {},
        trio.current_time(),
    )
    handler = errors_layer(resilience_layer(upstreams, destinations))
    request = Request(RequestHead(b"PUT", b"/x", []), Body(b"kept"), b"127.0.0.1")
    request.service = "item"
    response = await handler(request)
    # item-cache's own circuit is open too: its fallback (back to item) is not followed
    assert response.status == 503 and response.mesh_error == "circuit-open" and upstreams.calls == []

    destinations.configure(
        destinations.services, {("item", None): settings}, {}, trio.current_time()
    )  # item-cache healthy now
    request = Request(RequestHead(b"PUT", b"/x", []), Body(b"kept"), b"127.0.0.1")
    request.service = "item"
    response = await handler(request)
    assert response.status == 200 and (b"x-meshlet-fallback", b"circuit-open") in response.headers
    assert [(endpoint, body) for endpoint, _, body in upstreams.calls] == [(cache, b"kept")]


async def test_a_failing_endpoint_is_ejected_then_given_one_request_to_come_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    from dataclasses import replace

    from sidecar.core.outlier import OutlierConfig

    settings = replace(DEFAULTS, attempts=0, outlier=OutlierConfig(consecutive_failures=3, base_ejection=10.0))
    upstreams = Upstreams(A=500)
    call, destinations = mesh(upstreams, settings, endpoints=(A, B))
    for _ in range(6):  # round robin: A, B, A, B, A (its 3rd failure in a row: ejected), B
        await call()
    assert upstreams.hits() == {A: 3, B: 3}
    for _ in range(10):
        await call()
    assert upstreams.hits()[A] == 3  # ejected: no traffic
    assert destinations.get("item", None, trio.current_time()).outlier.counts(trio.current_time())["ejected"] == 1
    upstreams.script[A] = 200
    await trio.sleep(10)  # the ejection is over: A is in probation, one request at a time
    for _ in range(4):
        await call()
    assert upstreams.hits()[A] == 5  # back: it passed its one real request


class _Rule:
    """What the layer reads of a matched Route rule."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.rule = type("Spec", (), {"timeout": None})()


async def test_a_policy_for_one_route_rule_has_its_own_breaker(autojump_clock: trio.abc.Clock) -> None:
    from dataclasses import replace

    upstreams = Upstreams(A=500, B=500, C=500)
    destinations = Destinations(random.Random(1))
    general = replace(DEFAULTS, attempts=0, breaker=BreakerConfig(min_requests=5))
    beta = replace(general, name="item-beta", breaker=BreakerConfig(force="closed"))
    destinations.configure(
        {"item": ServiceConfig("item", (A, B, C))},
        {("item", None): general, ("item", "item/beta"): beta},
        {},
        trio.current_time(),
    )
    handler = errors_layer(resilience_layer(upstreams, destinations))

    async def call(rule: str | None) -> Response:
        request = Request(RequestHead(b"GET", b"/x", []), None, b"127.0.0.1")
        request.service = "item"
        request.rule = _Rule(rule) if rule else None
        return await handler(request)

    assert [(await call(None)).mesh_error for _ in range(7)] == [""] * 5 + ["circuit-open"] * 2
    assert [(await call("item/beta")).status for _ in range(7)] == [500] * 7  # its breaker: forced closed
    assert [(await call("item/other")).mesh_error for _ in range(2)] == ["circuit-open"] * 2  # the service's
