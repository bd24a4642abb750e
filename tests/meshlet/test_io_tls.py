"""meshlet.io's TLS connection on real sockets: the same exchanges as plaintext, writes
under backpressure, handshakes that fail (reset, garbage, a foreign or expired
certificate), close waking a waiter, session resumption; and the push channel's writes
over TLS."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from control_plane.channel import Channel
from meshlet.io import Closed, Connection, TLSConnection, TLSError, connect, listen_socket, start_tls

from ..certs import TestCA, context


@pytest.fixture(scope="module")
def authority() -> TestCA:
    return TestCA()


@pytest.fixture
def contexts(authority: TestCA, tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = context(authority.credentials("item"), tmp_path, server_side=True)
    client = context(authority.credentials("user"), tmp_path, server_side=False)
    return server, client


async def accept(listener: socket.socket) -> Connection:
    while True:
        try:
            sock, address = listener.accept()
            return Connection(sock, address[0])
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)


async def pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None, session: ssl.SSLSession | None = None
) -> tuple[Connection, Connection]:
    """(server side, client side), connected; over TLS with its handshake done if ``contexts``."""
    listener = listen_socket("127.0.0.1", 0)
    try:
        port = listener.getsockname()[1]
        client = await connect("127.0.0.1", port)
        server = await accept(listener)
    finally:
        listener.close()
    if contexts is None:
        return server, client
    server_tls = start_tls(server, contexts[0], server_side=True)
    client_tls = start_tls(client, contexts[1], server_side=False, session=session)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_tls.handshake)
        nursery.start_soon(client_tls.handshake)
    return server_tls, client_tls


async def read_exactly(conn: Connection, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await conn.recv()
        assert data, f"EOF after {len(got)} of {size} bytes"
        got += data
    return bytes(got)


async def echo(conn: Connection) -> None:
    while data := await conn.recv():
        await conn.send_all(data)


@pytest.fixture(params=["plain", "tls"])
async def connected(
    request: pytest.FixtureRequest, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> AsyncIterator[tuple[Connection, Connection]]:
    server, client = await pair(contexts if request.param == "tls" else None)
    assert server.tls is client.tls is (request.param == "tls")
    yield server, client
    server.close()
    client.close()


async def test_echo_round_trips(connected: tuple[Connection, Connection]) -> None:
    server, client = connected
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo, server)
        for size in (1, 1024, 16 * 1024, 16 * 1024 + 1, 200_000):
            message = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            await client.send_all(message)
            assert await read_exactly(client, size) == message
        client.close()  # the server sees the end and the echo loop stops
    with pytest.raises(Closed):
        await client.recv()


async def test_large_write_under_backpressure(connected: tuple[Connection, Connection]) -> None:
    """8 MB written while the reader has not started: the writer waits on a full socket
    buffer, then every byte arrives in order."""
    server, client = connected
    payload = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)
    received: list[bytes] = []
    sent = trio.Event()

    async def write() -> None:
        await server.send_all(payload)
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        for _ in range(20):  # the writer runs until the kernel's buffers are full
            await trio.lowlevel.checkpoint()
        assert not sent.is_set(), "8 MB fit in the socket buffers: nothing was under backpressure"
        received.append(await read_exactly(client, len(payload)))
    assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()


async def test_close_wakes_a_waiting_reader(connected: tuple[Connection, Connection]) -> None:
    server, _client = connected
    errors: list[BaseException] = []

    async def wait() -> None:
        try:
            await server.recv(wait_first=True)
        except Closed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        server.close()
    assert len(errors) == 1 and str(errors[0]).startswith("closed")


async def test_peer_sees_a_clean_end_after_close(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """close() sends close_notify: the peer reads b"" (an end, not an error)."""
    server, client = await pair(contexts)
    server.close()
    assert await client.recv() == b""
    client.close()


async def test_reset_mid_handshake(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A client that resets after half a ClientHello: the server's handshake ends in
    Closed (never hangs, never raises anything else)."""
    server, client = await pair(None)
    server_tls = start_tls(server, contexts[0], server_side=True)
    client.sock.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a record header and a few bytes
    client.reset()
    with pytest.raises(Closed):
        with trio.fail_after(5):
            await server_tls.handshake()
    server_tls.close()


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\nhost: item\r\n\r\n", "http request"),
        (b"\x16\x03\x01\x00\x05hello", ""),  # a handshake record whose body is not a ClientHello
        (b"\x00" * 64, "wrong version number"),
    ],
)
async def test_garbage_instead_of_a_client_hello(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], garbage: bytes, reason: str
) -> None:
    server, client = await pair(None)
    server_tls = start_tls(server, contexts[0], server_side=True)
    client.sock.send(garbage)
    with pytest.raises(TLSError) as caught:
        with trio.fail_after(5):
            await server_tls.handshake()
    assert reason in str(caught.value)
    server_tls.close()
    client.close()


@pytest.mark.parametrize("case", ["another CA", "expired"])
async def test_untrusted_client_certificate_refused(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path, authority: TestCA, case: str
) -> None:
    if case == "another CA":
        credentials = TestCA(seed=2).credentials("user")
        expected = "unable to get local issuer certificate"
    else:
        credentials = authority.credentials("user", now=time.time() - 7200, lifetime=3600)
        expected = "certificate has expired"
    # It trusts the server's CA: only its own certificate is wrong.
    bad_client = context(dataclasses.replace(credentials, bundle=authority.bundle), tmp_path / "bad", server_side=False)
    server, client = await pair(None)
    server_tls = start_tls(server, contexts[0], server_side=True)
    client_tls = start_tls(client, bad_client, server_side=False)
    failures: list[Closed] = []

    async def client_side() -> None:
        try:
            await client_tls.handshake()
            await client_tls.recv()  # TLS 1.3: the server's verdict on our certificate comes after
        except Closed as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_side)
        with pytest.raises(TLSError) as caught:
            with trio.fail_after(5):
                await server_tls.handshake()
    assert expected in str(caught.value)
    assert failures, "the client was told nothing"
    server_tls.close()
    client_tls.close()


async def test_untrusted_server_certificate_refused(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    foreign = context(TestCA(seed=3).credentials("item"), tmp_path / "foreign", server_side=True)
    server, client = await pair(None)
    server_tls = start_tls(server, foreign, server_side=True)
    client_tls = start_tls(client, contexts[1], server_side=False)

    async def server_side() -> None:
        with pytest.raises(Closed):
            await server_tls.handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        with pytest.raises(TLSError, match="certificate verify failed"):
            with trio.fail_after(5):
                await client_tls.handshake()
    server_tls.close()
    client_tls.close()


async def test_session_resumed_on_reconnect(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client = await pair(contexts)
    assert isinstance(client, TLSConnection)
    await server.send_all(b"hi")  # TLS 1.3 tickets arrive after the handshake: read past them
    assert await client.recv() == b"hi"
    session = client.session
    assert not client.session_reused and session is not None
    server.close()
    client.close()
    server, client = await pair(contexts, session)
    assert isinstance(client, TLSConnection)
    assert client.session_reused
    assert isinstance(server, TLSConnection)
    assert server.peer_certificate()["subjectAltName"] == (("URI", "spiffe://meshlet.local/service/user"),)
    server.close()
    client.close()


async def test_channel_writes_over_tls(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """The push channel writes straight into the socket and queues what it does not take:
    over TLS, the records of a push the socket does not take whole are queued and written
    by the flusher, after the rest; pushes arrive whole and in order."""
    server, client = await pair(contexts)
    pushes = [bytes([n]) * (3 * 1024 * 1024 + n) for n in range(4)]
    async with trio.open_nursery() as nursery:
        channel = Channel(server, lambda flush: nursery.start_soon(flush))
        for push in pushes:
            channel.write(push)
        assert channel.queued and channel.flushing, "the pushes all fit the socket buffers: no backpressure"
        received = await read_exactly(client, sum(map(len, pushes)))
    assert received == b"".join(pushes)
    assert not channel.queued and channel.blocked_since is None
    channel.close()
    client.close()


class CountingSocket:
    """The TLS connection's socket, counting the ``recv`` calls that reach the kernel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recvs = 0

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        return self.sock.recv(size)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


async def test_one_recv_brings_every_record_waiting(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Three records in the kernel's buffer: one ``recv`` takes them all, and the next two
    come from memory, even with ``wait_first`` (the kernel has nothing left to show)."""
    server, client = await pair(contexts)
    assert isinstance(server, TLSConnection)
    messages = [b"first", b"second", b"third"]
    for message in messages:
        await client.send_all(message)  # a record each
    counting = CountingSocket(server.sock)
    server.sock = counting  # type: ignore[assignment]
    with trio.fail_after(5):
        assert await server.recv(wait_first=True) == messages[0]
        assert server.pending()
        assert await server.recv(wait_first=True) == messages[1]
        assert await server.recv(wait_first=True) == messages[2]
    assert counting.recvs == 1
    assert not server.pending()
    server.sock = counting.sock
    server.close()
    client.close()


async def test_send_nowait_arrives_before_the_end(connected: tuple[Connection, Connection]) -> None:
    """What a 408 uses: written at once (through TLS on a TLS connection), then closed."""
    server, client = connected
    response = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    server.send_nowait(response)
    server.close()
    with trio.fail_after(5):
        assert await read_exactly(client, len(response)) == response
        assert await client.recv() == b""


async def test_fin_without_close_notify_is_an_end(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A peer that shuts its side down without close_notify: ``b""``, as in plaintext (HTTP's
    framing says whether a message was cut short)."""
    server, client = await pair(contexts)
    await server.send_all(b"partial")
    server.sock.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        assert await client.recv() == b"partial"
        assert await client.recv() == b""
    server.close()
    client.close()


async def test_a_forged_record_is_a_tls_error(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Bytes that do not decrypt: TLSError, never data."""
    server, client = await pair(contexts)
    client.sock.send(b"\x17\x03\x03\x00\x20" + bytes(32))  # an application data record of zeros
    with pytest.raises(TLSError, match="bad record mac|decryption failed"):
        with trio.fail_after(5):
            await server.recv()
    server.close()
    client.close()


async def test_channel_closed_with_records_queued_resets(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A channel closed while part of a record waits in its queue (the socket had room, the
    flusher had not run yet): the sidecar sees a reset. close_notify written then would land
    inside the record, and with the FIN after it the cut push read as a clean end."""
    server, client = await pair(contexts)
    channel = Channel(server, lambda flush: None)  # the flusher never runs
    size = 16 * 1024 * 1024
    channel.write(b"p" * size)
    assert channel.queued, "16 MB fit the socket buffers: nothing was queued"
    taken = size - len(channel.queued[0])  # about what the kernel took (the records are a bit longer)
    with trio.fail_after(5):
        await read_exactly(client, taken * 9 // 10)  # room in the kernel's buffers again
        await trio.lowlevel.wait_writable(server.sock)
    channel.close()
    with pytest.raises(Closed) as caught:
        with trio.fail_after(5):
            while await client.recv():
                pass
    assert not isinstance(caught.value, TLSError), caught.value
    client.close()
