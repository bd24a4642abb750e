"""The compiled hot path and its .py sources are one program (meshlet/compiled.py).

Two real sidecars, one on each build (``MESHLET_NO_EXTENSIONS=1``), get the same corpus
(requests that pass, and the smuggling and framing hazards of the HTTP/1.1 tables) on
their inbound and outbound listeners, against one recording origin: what the origin
received and what the client got back must be the same bytes, and the per-hop counters
the same exact numbers.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import SIDECAR_READY, SidecarProcess, run_meshlet, sample, write_static
from tests.sidecar.core.test_http1 import BODY_HAZARDS, CHUNKED_HEAD, HEAD_HAZARDS
from tests.sidecar.net.test_wire_vectors import Seen, Upstream, ok

CHUNKED = b"POST /up HTTP/1.1\r\nHost: item\r\nTransfer-Encoding: chunked\r\n\r\n"
PASSING = [
    ("get", b"GET /items/1?x=y HTTP/1.1\r\nHost: item\r\nAccept: */*\r\n\r\n"),
    ("http10", b"GET /old HTTP/1.0\r\nHost: item\r\n\r\n"),
    ("post-length", b"POST /form HTTP/1.1\r\nHost: item\r\nContent-Length: 5\r\n\r\nhello"),
    ("post-chunked", CHUNKED + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ("chunk-extension", CHUNKED + b"5;name=value\r\nhello\r\n0\r\n\r\n"),
    ("trailers", CHUNKED + b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"),
    ("expect", b"PUT /up HTTP/1.1\r\nHost: item\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"),
    ("absolute-form", b"GET http://item/abs HTTP/1.1\r\nHost: item\r\n\r\n"),
    (
        "hop-by-hop",
        b"GET /hop HTTP/1.1\r\nHost: item\r\nConnection: x-drop, keep-alive\r\nX-Drop: 1\r\nTE: trailers\r\n\r\n",
    ),
    ("upgrade-refused", b"GET /ws HTTP/1.1\r\nHost: item\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
    ("head", b"HEAD /h HTTP/1.1\r\nHost: item\r\n\r\n"),
    ("mixed-case", b"GET /c HTTP/1.1\r\nhOsT: item\r\nX-Mixed-Case: VaLuE\r\n\r\n"),
]
HAZARDS = [(name, request) for name, request, _ in HEAD_HAZARDS] + [
    (name, CHUNKED_HEAD + body) for name, body in BODY_HAZARDS
]
CORPUS = PASSING + HAZARDS

# What differs between any two runs, whatever the build: ids made per request, the date.
VARYING = re.compile(rb"(?im)^(x-request-id|traceparent|tracestate|b3|x-b3-[a-z]+|date): [^\r\n]*")


class Origin(Upstream):
    """The recording upstream of the wire vectors, answering every target alike (not with
    the connection's number: the sidecar's health probes open connections in their own time)."""

    def __init__(self) -> None:
        super().__init__()
        self.script = _EchoTarget()


class _EchoTarget(dict[bytes, object]):
    def get(self, target: bytes, default: object = None) -> object:
        async def echo(stream: trio.SocketStream, number: int, target: bytes) -> bool:
            await stream.send_all(ok(b"target " + target))
            return True

        return echo


def normal(data: bytes) -> bytes:
    return VARYING.sub(lambda m: m.group(1) + b": *", data)


@asynccontextmanager
async def sidecar(tmp_path: Path, origin: int, *, pure: bool) -> AsyncIterator[SidecarProcess]:
    name = "pure" if pure else "compiled"
    static = write_static(tmp_path / f"{name}.yaml", {"item": {"endpoints": [f"127.0.0.1:{origin}"], "timeout": "2s"}})
    args = ["sidecar", "--service", "item", "--app", f"127.0.0.1:{origin}", "--static", str(static)]
    args += [f"--{listener}=127.0.0.1:0" for listener in ("inbound", "outbound", "admin")]
    prefix = ["env", "MESHLET_NO_EXTENSIONS=1"] if pure else ["env", "-u", "MESHLET_NO_EXTENSIONS"]
    async with run_meshlet(tmp_path, f"sidecar-{name}", args, SIDECAR_READY, prefix=prefix) as process:
        yield process


async def exchange(port: int, request: bytes) -> bytes:
    """The request on a connection of its own, the client's side closed after it: what came
    back until the sidecar closed too (no wait for a keep-alive timeout)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    with trio.fail_after(10):
        await stream.send_all(request)
        await stream.send_eof()
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return bytes(received)


async def run_corpus(process: SidecarProcess, origin: Origin) -> tuple[list[bytes], list[Seen]]:
    """Each request of the corpus, inbound then outbound; what came back."""
    responses = []
    for port in (process.ports["inbound"], process.ports["outbound"]):
        for _, request in CORPUS:
            responses.append(normal(await exchange(port, request)))
    seen = [Seen(0, normal(s.head), s.body) for s in origin.requests()]  # connection numbers vary by timing
    return responses, seen


def which_build(process: SidecarProcess) -> str:
    found = re.search(r"request path: (.*)", process.log())
    assert found, process.log()
    return found.group(1)


async def test_both_builds_give_the_origin_and_the_client_the_same_bytes_and_counts(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    results = {}
    for pure in (False, True):
        origin = Origin()
        port = await nursery.start(origin.serve)
        async with sidecar(tmp_path, port, pure=pure) as process:
            build = which_build(process)
            if not pure and not build.startswith("compiled"):
                if os.environ.get("MESHLET_REQUIRE_ALL"):
                    pytest.fail(f"the hot path is not compiled ({build}): pip install -e . needs gcc and python3-dev")
                pytest.skip(f"the hot path is not compiled here ({build})")
            assert build.startswith("pure Python") == pure, build
            responses, seen = await run_corpus(process, origin)
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(f"http://{process.admin}/metrics")).text
        results[pure] = (responses, seen, metrics)

    (compiled_responses, compiled_seen, compiled_metrics), (pure_responses, pure_seen, pure_metrics) = (
        results[False],
        results[True],
    )
    for (name, _), got, expected in zip(CORPUS * 2, compiled_responses, pure_responses, strict=True):
        assert got == expected, name
    assert compiled_seen == pure_seen
    # The corpus did what it is for: the passing requests reached the origin, the hazards did not.
    assert len(pure_seen) == 2 * len(PASSING)
    refused = {
        direction: sum(r.startswith(b"HTTP/1.1 400 ") for r in answers)
        for direction, answers in (
            ("inbound", pure_responses[: len(CORPUS)]),
            ("outbound", pure_responses[len(CORPUS) :]),
        )
    }
    assert min(refused.values()) >= len(HAZARDS) - 3  # a few are refused otherwise (505, an HTTP/2 preface)

    # Exact counters in both builds: as many as were sent, of each outcome, on the request path
    # or refused by the listener before it.
    assert counters(compiled_metrics) == counters(pure_metrics)
    for metrics in (compiled_metrics, pure_metrics):
        for direction in ("inbound", "outbound"):
            assert sample(metrics, "meshlet_requests_total", direction=direction, code="200") == len(PASSING)
            refused_here = sample(metrics, "meshlet_requests_total", direction=direction, code="400") + sample(
                metrics, "meshlet_downstream_requests_rejected_total", listener=direction, code="400"
            )
            assert refused_here == refused[direction], direction


COUNTED = ("meshlet_requests_total", "meshlet_downstream_requests_rejected_total")


def counters(metrics: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (found.name, tuple(sorted(found.labels.items()))): found.value
        for family in text_string_to_metric_families(metrics)
        for found in family.samples
        if found.name in COUNTED
    }
