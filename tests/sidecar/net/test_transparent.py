"""The outbound listener in transparent mode (sidecar/net/transparent.py), on loopback with
the kernel's answer to SO_ORIGINAL_DST given by the test: the real thing needs root and
iptables (tests/integration/test_transparent.py)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from meshlet.io import Deadlines
from sidecar.core.destination import Destinations
from sidecar.core.interception import ALLOW_ANY, REGISTRY_ONLY, AddressMap
from sidecar.core.services import Endpoint, ServiceConfig
from sidecar.core.tcp import TcpStats
from sidecar.layers.base import Handler, Request, Response
from sidecar.net import transparent
from sidecar.net.admin import json_response
from sidecar.net.downstream import Timeouts
from sidecar.net.listeners import serve_http
from sidecar.net.tcp_proxy import TcpProxy
from sidecar.net.transparent import Interceptor

from ...helpers import raw_exchange

GET = b"GET /x HTTP/1.1\r\nhost: somewhere\r\n\r\n"
ITEM = ("10.0.0.7", 8080)


@dataclass
class Outbound:
    """The interceptor on a listener, and what the test decides the kernel says."""

    port: int
    interceptor: Interceptor
    original: dict[str, tuple[str, int] | None] = field(default_factory=lambda: {"to": None})
    counted: list[tuple[str, str]] = field(default_factory=list)


def _stack(name: str) -> Handler:
    async def handle(request: Request) -> Response:
        return json_response({"stack": name, "service": request.service})

    return handle


@pytest.fixture
async def outbound(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Outbound]:
    deadlines = Deadlines(tick=0.05)
    await nursery.start(deadlines.serve)
    counted: list[tuple[str, str]] = []
    interceptor = Interceptor(_stack("first"), Timeouts(deadlines, header=1.0), lambda *key: counted.append(key))
    original: dict[str, tuple[str, int] | None] = {"to": None}
    monkeypatch.setattr(transparent, "original_destination", lambda sock: original["to"])
    port = await nursery.start(
        partial(serve_http, "127.0.0.1", 0, _stack("unused"), interceptor.timeouts, accept=interceptor)
    )
    yield Outbound(port, interceptor, original, counted)


async def _refused(port: int, *, source_port: int = 0) -> bytes:
    """Connect (from ``source_port`` if given), send a request, read until the sidecar
    closes; b"" when it reset the connection without a word."""
    sock = trio.socket.socket()
    with sock:
        await sock.bind(("127.0.0.1", source_port))
        received = b""
        with trio.fail_after(5):
            await sock.connect(("127.0.0.1", port))
            try:
                await sock.send(GET)
                while data := await sock.recv(65536):
                    received += data
            except OSError:  # ECONNRESET, EPIPE: the reset came first
                pass
        return received


def _body(answer: bytes) -> dict[str, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    return json.loads(body)  # type: ignore[no-any-return]


async def test_a_connection_made_to_the_listener_on_purpose_is_served_as_usual(outbound: Outbound) -> None:
    answer = await raw_exchange(outbound.port, GET, read_until_close=False)
    assert _body(answer) == {"stack": "first", "service": ""}
    assert outbound.counted == []


async def test_a_service_address_goes_to_the_outbound_stack_for_that_service(outbound: Outbound) -> None:
    outbound.interceptor.use(_stack("second"), AddressMap({ITEM: "item"}), ALLOW_ANY)
    outbound.original["to"] = ITEM
    answer = await raw_exchange(outbound.port, GET, read_until_close=False)
    assert _body(answer) == {"stack": "second", "service": "item"}  # not the Host header's
    assert outbound.counted == [("service", "item")]


async def test_an_unknown_address_is_passed_through_as_bytes(outbound: Outbound, nursery: trio.Nursery) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(b"echo:" + data)

    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    destination = listeners[0].socket.getsockname()
    outbound.original["to"] = (destination[0], destination[1])
    answer = await raw_exchange(outbound.port, b"not http at all", read_until_close=False)
    assert answer == b"echo:not http at all"
    assert outbound.counted == [("passthrough", "")]


async def test_registry_only_refuses_an_unknown_address_and_logs_it_once(
    outbound: Outbound, caplog: pytest.LogCaptureFixture
) -> None:
    outbound.interceptor.use(_stack("second"), AddressMap({ITEM: "item"}), REGISTRY_ONLY)
    outbound.original["to"] = ("10.9.9.9", 443)
    for _ in range(2):
        assert await _refused(outbound.port) == b""
    assert outbound.counted == [("blocked", ""), ("blocked", "")]
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refused) == 1
    assert "10.9.9.9:443" in refused[0] and "REGISTRY_ONLY" in refused[0]


async def test_its_own_passthrough_connection_coming_back_is_refused_whatever_the_policy(
    outbound: Outbound, caplog: pytest.LogCaptureFixture
) -> None:
    outbound.original["to"] = ("10.9.9.9", 443)
    with socket.socket() as probe:  # a free source port, recorded as relay() records its own
        probe.bind(("127.0.0.1", 0))
        source_port = probe.getsockname()[1]
    outbound.interceptor.passthrough.sources.add(source_port)
    assert await _refused(outbound.port, source_port=source_port) == b""
    assert outbound.counted == [("loop", "")]
    assert any("--proxy-uid" in r.getMessage() for r in caplog.records)


async def test_a_tcp_service_address_is_spliced_to_one_of_its_endpoints(
    outbound: Outbound, nursery: trio.Nursery
) -> None:
    """A redirected connection to a tcp service's address: bytes, to an endpoint the balancer
    picks (here the only one), never parsed as HTTP."""

    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(b"echo:" + data)

    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    endpoint = Endpoint("127.0.0.1", listeners[0].socket.getsockname()[1], protocol="tcp")
    services = {"db": ServiceConfig("db", (endpoint,), protocol="tcp")}
    destinations = Destinations()
    destinations.configure(services, {}, {}, 0.0)
    deadlines = outbound.interceptor.timeouts.deadlines
    proxy = TcpProxy("user", destinations, deadlines, TcpStats())
    proxy.use(services, None)
    outbound.interceptor.opaque = proxy
    outbound.interceptor.use(_stack("second"), AddressMap({ITEM: "db"}), ALLOW_ANY)
    outbound.original["to"] = ITEM
    answer = await raw_exchange(outbound.port, b"not http at all", read_until_close=False)
    assert answer == b"echo:not http at all"
    assert outbound.counted == [("service", "db")]
