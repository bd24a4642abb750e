"""The HTTP/2 client pool, driven through the Forwarder with direct calls (the HTTP/2 server
side of a listener is not needed): against a raw h2 server each test scripts
(tests/h2_server.py), over h2c and over mTLS with ALPN h2. Real sockets on 127.0.0.1."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from h2.errors import ErrorCodes

from meshlet.io import Deadlines
from sidecar.core import errors
from sidecar.core.credentials import CredentialHolder
from sidecar.core.errors import MeshError
from sidecar.core.http1 import RequestHead
from sidecar.core.services import Endpoint
from sidecar.layers.base import WOULD_BLOCK, BodyPiece, Request, Response
from sidecar.net.h2_pool import STREAM_WINDOW
from sidecar.net.tls import MeshTLS
from sidecar.net.upstream import Forwarder, UpstreamBodyError, UpstreamPools
from sidecar.telemetry import Telemetry, render
from tests.certs import TestCA, context, write_credentials
from tests.h2_server import H2Server, ServerStream
from tests.helpers import sample

Handler = Callable[[ServerStream], Awaitable[None]]


class Body:
    """A request body of ``pieces``; with ``gate``, pieces past the first wait for it."""

    def __init__(self, pieces: list[bytes], *, gate: trio.Event | None = None) -> None:
        self.pieces = deque(pieces)
        self.taken = 0  # bytes handed out
        self.gate = gate

    def read_nowait(self) -> BodyPiece:
        if self.gate is not None and not self.gate.is_set() and self.taken:
            return WOULD_BLOCK
        return self._next()

    async def read(self) -> bytes | None:
        if self.gate is not None and self.taken:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        return self._next()

    def _next(self) -> bytes | None:
        if not self.pieces:
            return None
        piece = self.pieces.popleft()
        self.taken += len(piece)
        return piece


class Rig:
    def __init__(self, nursery: trio.Nursery, deadlines: Deadlines, tls: MeshTLS | None = None) -> None:
        self.nursery = nursery
        self.deadlines = deadlines
        self.pools = UpstreamPools(clock=deadlines.clock, tls=tls)
        self.pools.nursery = nursery
        self.forwarder = Forwarder(self.pools, deadlines)

    def request(
        self,
        port: int,
        method: bytes = b"GET",
        path: bytes = b"/",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: Body | None = None,
        *,
        version: str = "2",
        protocol: str = "",
        mtls: bool = False,
        timeout: float = 5.0,
        service: str = "app",
    ) -> Request:
        head = RequestHead(method, path, list(headers or []), http_version=version, host=b"app.test")
        if body is not None:
            head.chunked = True
        request = Request(head, body, b"10.1.2.3")
        request.endpoint = Endpoint("127.0.0.1", port, protocol=protocol, mtls=mtls)
        request.service = service
        request.timeout = timeout
        request.nursery = self.nursery
        return request

    async def call(self, request: Request) -> Response:
        return await self.forwarder(request)


@pytest.fixture
async def rig(nursery: trio.Nursery) -> Rig:
    deadlines = Deadlines(tick=0.02)
    await nursery.start(deadlines.serve)
    return Rig(nursery, deadlines)


async def serve(nursery: trio.Nursery, handler: Handler, **kwargs: object) -> H2Server:
    server = H2Server(handler, **kwargs)  # type: ignore[arg-type]
    await server.start(nursery)
    return server


async def body_of(response: Response) -> bytes:
    out = bytearray()
    complete = False
    try:
        assert response.body is not None
        while (piece := await response.body.read()) is not None:
            out += piece
        complete = True
    finally:
        response.finish(complete)
    return bytes(out)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait, bounded, for a count kept by another task (the server's, the pool's)."""
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - state of other tasks, no event to wait on
            await trio.sleep(0.01)


async def hello(stream: ServerStream) -> None:
    await stream.read_body()
    await stream.respond(200, [(b"content-type", b"text/plain"), (b"content-length", b"5")])
    await stream.send(b"hello", end=True)


async def test_a_request_goes_as_one_stream_with_the_forwarding_fields(rig: Rig, nursery: trio.Nursery) -> None:
    server = await serve(nursery, hello)
    headers = [(b"x-app", b"1"), (b"te", b"trailers, deflate"), (b"connection", b"x-drop"), (b"x-drop", b"2")]
    request = rig.request(server.port, b"GET", b"/a?b=1", headers)
    request.head.connection = frozenset({b"x-drop"})
    response = await rig.call(request)
    assert (response.status, response.reason, response.framing, response.content_length) == (200, b"OK", "length", 5)
    assert (b"via", b"1.1 meshlet") in response.headers
    assert await body_of(response) == b"hello"
    (stream,) = server.streams
    fields = stream.headers
    assert fields[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"app.test"),
        (b":path", b"/a?b=1"),
    ]
    names = [name for name, _ in fields]
    assert (b"x-app", b"1") in fields and (b"te", b"trailers") in fields
    assert (b"x-forwarded-for", b"10.1.2.3") in fields and (b"via", b"1.1 meshlet") in fields
    assert b"connection" not in names and b"x-drop" not in names and b"host" not in names
    assert len(server.connections) == 1


async def test_an_http1_request_goes_in_http2_to_an_app_that_declared_it(rig: Rig, nursery: trio.Nursery) -> None:
    server = await serve(nursery, hello)
    request = rig.request(server.port, headers=[(b"host", b"app.test")], version="1.1", protocol="http2")
    assert await body_of(await rig.call(request)) == b"hello"
    assert len(server.streams) == 1
    # To a sidecar, an HTTP/1.1 request stays HTTP/1.1 (here: the h2 server reads our request as garbage).
    request = rig.request(server.port, headers=[(b"host", b"app.test")], version="1.1", protocol="grpc", mtls=True)
    with pytest.raises(MeshError):
        await rig.call(request)
    assert len(server.streams) == 1 and not rig.pools.pools[("127.0.0.1", server.port)].idle


async def test_a_body_of_unknown_length_is_chunked_and_trailers_reach_the_response(
    rig: Rig, nursery: trio.Nursery
) -> None:
    async def with_trailers(stream: ServerStream) -> None:
        body = await stream.read_body()
        await stream.respond(200, [(b"content-type", b"application/grpc")])
        await stream.send(body[::-1])
        await stream.trailers([(b"grpc-status", b"0"), (b"grpc-message", b"ok"), (b"x-bin", b"AP8=")])

    server = await serve(nursery, with_trailers)
    response = await rig.call(rig.request(server.port, b"POST", body=Body([b"abc", b"def"])))
    assert response.framing == "chunked" and response.trailers is None
    assert await body_of(response) == b"fedcba"
    assert response.trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok"), (b"x-bin", b"AP8=")]
    assert server.streams[0].field(b"content-length") is None


async def test_informational_responses_are_skipped_and_a_bodiless_end_is_length_zero(
    rig: Rig, nursery: trio.Nursery
) -> None:
    async def early_hints(stream: ServerStream) -> None:
        await stream.respond(103, [(b"link", b"</a.css>; rel=preload")])
        await stream.respond(201, [(b"grpc-status", b"5")], end=True)  # a Trailers-Only shape

    server = await serve(nursery, early_hints)
    response = await rig.call(rig.request(server.port))
    assert (response.status, response.framing, response.content_length, response.body) == (201, "length", 0, None)
    assert (b"grpc-status", b"5") in response.headers
    response.finish(True)
    assert not rig.pools.h2_pools[("127.0.0.1", server.port)].conns[0].streams


async def test_streams_share_a_connection_up_to_the_peer_limit_then_another_opens(
    rig: Rig, nursery: trio.Nursery
) -> None:
    release = trio.Event()

    async def held(stream: ServerStream) -> None:
        await release.wait()
        await hello(stream)

    server = await serve(nursery, held, max_streams=3)
    bodies: list[bytes] = []

    async def one() -> None:
        bodies.append(await body_of(await rig.call(rig.request(server.port))))

    async with trio.open_nursery() as calls:
        for _ in range(7):
            calls.start_soon(one)
        await until(lambda: len(server.streams) == 7)
        assert len(server.connections) == 3  # 3 + 3 + 1
        pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
        assert sorted(len(c.streams) for c in pool.conns) == [1, 3, 3]
        assert dict(pool.stats()) == {"active": 3, "idle": 0}
        release.set()
    assert bodies == [b"hello"] * 7
    assert dict(pool.stats()) == {"active": 0, "idle": 3}
    # Once idle past the idle timeout, they are closed (GOAWAY, then FIN).
    assert pool.expire_idle(rig.deadlines.clock() + pool.idle_timeout + 1) == 3
    assert pool.conns == [] and pool.closes == {"idle": 3}


async def test_many_concurrent_requests_are_multiplexed_on_one_connection(rig: Rig, nursery: trio.Nursery) -> None:
    server = await serve(nursery, hello)
    bodies: list[bytes] = []

    async def one() -> None:
        bodies.append(await body_of(await rig.call(rig.request(server.port))))

    async with trio.open_nursery() as calls:
        for _ in range(100):
            calls.start_soon(one)
    assert bodies == [b"hello"] * 100
    assert len(server.connections) == 1 and len(server.streams) == 100


@pytest.mark.parametrize("body", [None, [b"x" * 1000, b"y" * 1000]], ids=["no-body", "body"])
async def test_streams_above_a_goaway_go_again_on_a_new_connection(
    rig: Rig, nursery: trio.Nursery, body: list[bytes] | None
) -> None:
    async def going_away(stream: ServerStream) -> None:
        if len(stream.conn.server.connections) == 1:
            await stream.conn.goaway(last_stream_id=0)  # processed nothing
            return
        data = await stream.read_body()
        await stream.respond(200, [(b"content-length", b"%d" % len(data))])
        await stream.send(data, end=True)

    server = await serve(nursery, going_away)
    method = b"GET" if body is None else b"POST"
    response = await rig.call(rig.request(server.port, method, body=None if body is None else Body(body)))
    assert await body_of(response) == b"".join(body or [])
    pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
    assert len(server.connections) == 2 and pool.retries == 1
    assert pool.closes == {"goaway": 1} and len(pool.conns) == 1


async def test_a_stream_below_the_goaway_finishes_and_no_new_stream_goes_there(rig: Rig, nursery: trio.Nursery) -> None:
    async def last_one(stream: ServerStream) -> None:
        if len(stream.conn.server.connections) == 1:
            await stream.conn.goaway(last_stream_id=stream.id)
        await hello(stream)

    server = await serve(nursery, last_one)
    assert await body_of(await rig.call(rig.request(server.port))) == b"hello"
    assert await body_of(await rig.call(rig.request(server.port))) == b"hello"
    assert len(server.connections) == 2
    assert rig.pools.h2_pools[("127.0.0.1", server.port)].retries == 0


async def test_refused_stream_goes_again_once_then_502(rig: Rig, nursery: trio.Nursery) -> None:
    refusals = [1]

    async def refusing(stream: ServerStream) -> None:
        if refusals[0] > 0:
            refusals[0] -= 1
            await stream.reset_stream(ErrorCodes.REFUSED_STREAM)
            return
        await hello(stream)

    server = await serve(nursery, refusing)
    assert await body_of(await rig.call(rig.request(server.port))) == b"hello"
    pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
    assert pool.retries == 1 and pool.resets == {"refused-stream": 1} and len(server.connections) == 1
    refusals[0] = 2
    with pytest.raises(MeshError) as info:
        await rig.call(rig.request(server.port))
    assert info.value.reason is errors.UPSTREAM_RESET
    assert pool.retries == 2 and pool.resets == {"refused-stream": 3}


async def test_other_resets_are_502_upstream_reset_and_a_cut_body(rig: Rig, nursery: trio.Nursery) -> None:
    async def resetting(stream: ServerStream) -> None:
        if stream.field(b":path") == b"/mid-body":
            await stream.respond(200, [(b"content-length", b"100000")])
            await stream.send(b"x" * 1000)
        await stream.reset_stream(ErrorCodes.INTERNAL_ERROR)

    server = await serve(nursery, resetting)
    with pytest.raises(MeshError) as info:
        await rig.call(rig.request(server.port))
    assert info.value.reason is errors.UPSTREAM_RESET and "INTERNAL_ERROR" in info.value.detail
    response = await rig.call(rig.request(server.port, path=b"/mid-body"))
    with pytest.raises(UpstreamBodyError):
        await body_of(response)
    pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
    assert pool.retries == 0 and pool.resets == {"internal-error": 2} and len(pool.conns) == 1


async def test_an_app_that_dies_mid_body_cuts_the_body(rig: Rig, nursery: trio.Nursery) -> None:
    async def dying(stream: ServerStream) -> None:
        if stream.field(b":path") == b"/before":
            await stream.conn.drop()
            return
        await stream.respond(200, [(b"content-length", b"100000")])
        await stream.send(b"x" * 5000)
        await stream.conn.drop()

    server = await serve(nursery, dying)
    response = await rig.call(rig.request(server.port))
    with pytest.raises(UpstreamBodyError):
        await body_of(response)
    with pytest.raises(MeshError) as info:
        await rig.call(rig.request(server.port, path=b"/before"))
    assert info.value.reason is errors.UPSTREAM_RESET
    pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
    assert pool.closes == {"peer-closed": 2} and pool.conns == []


async def test_past_the_deadline_the_stream_is_cancelled_504_or_a_cut_body(rig: Rig, nursery: trio.Nursery) -> None:
    async def slow(stream: ServerStream) -> None:
        if stream.field(b":path") == b"/slow-body":
            await stream.respond(200)
            await stream.send(b"x" * 10)
        await trio.sleep_forever()

    server = await serve(nursery, slow)
    with pytest.raises(MeshError) as info:
        await rig.call(rig.request(server.port, timeout=0.2))
    assert info.value.reason is errors.TIMEOUT
    response = await rig.call(rig.request(server.port, path=b"/slow-body", timeout=0.2))
    with pytest.raises(UpstreamBodyError, match="timeout"):
        await body_of(response)
    await until(lambda: len(server.resets) == 2)
    assert server.resets == [ErrorCodes.CANCEL, ErrorCodes.CANCEL]
    pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
    assert len(pool.conns) == 1 and not pool.conns[0].streams  # the connection lives on


async def test_a_client_that_goes_away_cancels_the_stream(rig: Rig, nursery: trio.Nursery) -> None:
    async def endless(stream: ServerStream) -> None:
        await stream.respond(200)
        await stream.send(b"x" * 10_000_000)

    server = await serve(nursery, endless)
    response = await rig.call(rig.request(server.port))
    assert response.body is not None
    assert await response.body.read()
    response.finish(False)
    await until(lambda: len(server.resets) == 1)
    assert server.resets == [ErrorCodes.CANCEL]
    # The connection window of what was never read is given back: the connection still carries.
    server.handler = hello
    assert await body_of(await rig.call(rig.request(server.port))) == b"hello"
    assert len(server.connections) == 1


async def test_a_slow_reader_holds_the_upstream_at_the_stream_window(rig: Rig, nursery: trio.Nursery) -> None:
    sent = [0]

    async def big(stream: ServerStream) -> None:
        await stream.respond(200)
        for _ in range(100):
            await stream.send(b"z" * 65536)
            sent[0] += 65536
        await stream.send(b"", end=True)

    server = await serve(nursery, big)
    response = await rig.call(rig.request(server.port))
    (upstream,) = rig.pools.h2_pools[("127.0.0.1", server.port)].conns
    (stream,) = upstream.streams.values()
    # Nothing taken downstream: the server's window runs out.
    await until(lambda: sum(length for _, length in stream.pieces) == STREAM_WINDOW)
    assert server.connections[0].h2.local_flow_control_window(stream.id) == 0
    assert sent[0] <= STREAM_WINDOW  # held there: memory bounded by the window
    assert len(await body_of(response)) == 100 * 65536


async def test_a_request_body_waits_for_the_window(rig: Rig, nursery: trio.Nursery) -> None:
    arrived, go = trio.Event(), trio.Event()

    async def not_reading(stream: ServerStream) -> None:
        while len(stream.body) < 65535:
            await stream.more.wait()
        arrived.set()
        await go.wait()
        stream.conn.h2.acknowledge_received_data(65535, stream.id)
        stream.auto_ack = True
        await stream.conn.flush()
        body = await stream.read_body()
        await stream.respond(200, [(b"x-received", b"%d" % len(body))], end=True)

    server = await serve(nursery, not_reading, auto_ack=False)  # the window stays shut after 65,535 bytes
    body = Body([b"u" * 16384] * 64)  # 1 MiB
    async with trio.open_nursery() as call:
        responses: list[Response] = []

        async def put() -> None:
            responses.append(await rig.call(rig.request(server.port, b"PUT", body=body)))

        call.start_soon(put)
        with trio.fail_after(5):
            await arrived.wait()
        (upstream,) = rig.pools.h2_pools[("127.0.0.1", server.port)].conns
        await until(lambda: upstream.h2.local_flow_control_window(1) == 0)
        assert len(server.streams[0].body) == 65535
        assert body.taken <= 65535 + 16384  # one piece read beyond the window at most
        go.set()
    (response,) = responses
    assert (b"x-received", b"1048576") in response.headers
    response.finish(True)
    assert not server.handler_errors


async def test_an_http1_server_is_an_upstream_protocol_error(rig: Rig, nursery: trio.Nursery) -> None:
    async def http1(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, http1, listeners)
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(MeshError) as info:
        await rig.call(rig.request(port))
    assert info.value.reason is errors.UPSTREAM_PROTOCOL_ERROR
    # undeclared, the request went on in HTTP/2: the answer says how to send HTTP/1.1 instead
    assert "--app-protocol http1" in info.value.detail
    with pytest.raises(MeshError) as info:
        await rig.call(rig.request(port, protocol="http2"))
    assert info.value.reason is errors.UPSTREAM_PROTOCOL_ERROR
    assert "--app-protocol" not in info.value.detail  # declared http2: the app is wrong, not the config


async def test_connect_refused_is_connect_failed(rig: Rig) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MeshError) as info:
        await rig.call(rig.request(port))
    assert info.value.reason is errors.CONNECT_FAILED and info.value.cause == "refused"


# mTLS with ALPN h2 -------------------------------------------------------------------------


def tls_server_context(authority: TestCA, service: str, tmp_path: Path, alpn: list[str]) -> ssl.SSLContext:
    if service == "refuses-us":  # its certificate is good, but it trusts another CA for ours
        cert, key, _ = write_credentials(tmp_path / "refuses", authority.credentials("app"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cadata=TestCA(seed=2).bundle.decode())
    else:
        ctx = context(authority.credentials(service), tmp_path, server_side=True)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@pytest.mark.parametrize(
    ("serves", "alpn", "reason"),
    [
        ("app", ["h2", "http/1.1"], None),
        ("other", ["h2"], errors.PEER_IDENTITY_MISMATCH),
        ("app", ["http/1.1"], errors.UPSTREAM_PROTOCOL_ERROR),
        ("refuses-us", ["h2"], errors.TLS_HANDSHAKE_FAILED),
    ],
    ids=["h2", "wrong-identity", "no-h2", "our-certificate-refused"],
)
async def test_to_a_sidecar_over_mtls_with_alpn_h2(
    nursery: trio.Nursery, tmp_path: Path, serves: str, alpn: list[str], reason: errors.Reason | None
) -> None:
    authority = TestCA()
    deadlines = Deadlines(tick=0.02)
    await nursery.start(deadlines.serve)
    handshakes: list[tuple[str, bool]] = []
    tls = MeshTLS(CredentialHolder(authority.credentials("web")), on_handshake=lambda s, r: handshakes.append((s, r)))
    rig = Rig(nursery, deadlines, tls)
    server = await serve(nursery, hello, ssl_context=tls_server_context(authority, serves, tmp_path, alpn))
    request = rig.request(server.port, mtls=True)
    if reason is not None:
        with pytest.raises(MeshError) as info:
            await rig.call(request)
        assert info.value.reason is reason
        assert server.streams == []
        return
    assert await body_of(await rig.call(request)) == b"hello"
    pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
    pool.close_all()
    assert await body_of(await rig.call(rig.request(server.port, mtls=True))) == b"hello"
    assert handshakes == [("client", False), ("client", True)]  # the second one resumed the session
    assert len(server.connections) == 2


async def test_the_pools_metrics(rig: Rig, nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def refuse_then_hold(stream: ServerStream) -> None:
        if stream.id == 1:
            await stream.reset_stream(ErrorCodes.REFUSED_STREAM)
            return
        await release.wait()
        await hello(stream)

    server = await serve(nursery, refuse_then_hold)
    telemetry = Telemetry()
    telemetry.connection_stats = rig.pools.stats  # as the sidecar wires them
    telemetry.h2_stream_stats = rig.pools.h2_stream_stats
    telemetry.h2_close_stats = rig.pools.h2_close_stats
    telemetry.h2_reset_stats = rig.pools.h2_reset_stats
    address = f"127.0.0.1:{server.port}"
    bodies: list[bytes] = []

    async def one() -> None:
        bodies.append(await body_of(await rig.call(rig.request(server.port))))

    async with trio.open_nursery() as calls:
        calls.start_soon(one)
        await until(lambda: len(server.streams) == 2)
        metrics = render(lambda: [telemetry.snapshot()]).decode()
        assert sample(metrics, "meshlet_upstream_streams", destination="app", endpoint=address) == 1
        assert sample(metrics, "meshlet_upstream_connections", destination="app", endpoint=address, state="active") == 1
        assert sample(metrics, "meshlet_upstream_stream_resets_total", endpoint=address, code="refused-stream") == 1
        release.set()
    assert bodies == [b"hello"]
    rig.pools.h2_pools[("127.0.0.1", server.port)].close_all()
    metrics = render(lambda: [telemetry.snapshot()]).decode()
    assert sample(metrics, "meshlet_upstream_streams", destination="app", endpoint=address) == 0
    assert sample(metrics, "meshlet_upstream_connections_ended_total", endpoint=address, reason="closed") == 1


def test_h2_is_not_loaded_until_a_request_goes_upstream_in_http2() -> None:
    code = "import sys, sidecar.app; print(sorted(m for m in ('h2', 'hyperframe', 'hpack') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_connection_from_before_the_modes_changed_is_retired(nursery: trio.Nursery, tmp_path: Path) -> None:
    authority = TestCA()
    deadlines = Deadlines(tick=0.02)
    await nursery.start(deadlines.serve)
    tls = MeshTLS(CredentialHolder(authority.credentials("web")))
    rig = Rig(nursery, deadlines, tls)
    server = await serve(nursery, hello, ssl_context=tls_server_context(authority, "app", tmp_path, ["h2"]))
    assert await body_of(await rig.call(rig.request(server.port, mtls=True))) == b"hello"
    tls.configure("strict", {})  # a new snapshot's modes: what a new connection would be may differ
    assert await body_of(await rig.call(rig.request(server.port, mtls=True))) == b"hello"
    pool = rig.pools.h2_pools[("127.0.0.1", server.port)]
    assert len(server.connections) == 2 and pool.closes == {"retired": 1} and len(pool.conns) == 1
