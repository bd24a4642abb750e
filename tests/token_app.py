"""A token-echo app on raw sockets, for the proofs that no response reaches a request
other than the one it answers (tests/sidecar/net/test_fuzz_path.py, the fault soak).

Every request the tests send carries a unique token, in its path (``/t/TOKEN``) and in an
``x-token`` header. The app parses each request the way an honest HTTP/1.1 server does
(Transfer-Encoding chunked, else Content-Length, else no body), records every token it
parsed, and answers with the token it parsed, in an ``x-token`` header and in the body.
A client that gets a response carrying a token other than its own has been handed
someone else's response; a token the app parsed twice (per attempt) is a request the
client sent once.

How the app answers is scripted per token (``behaviours``): normally, or badly in one of
the ways a real upstream misbehaves (:data:`BEHAVIOURS`). Its parser is deliberately
small and lenient: the app is the system under test's counterpart, not a second proxy.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

import trio

TOKEN_HEADER = b"x-token"
ATTEMPT_HEADER = b"x-meshlet-attempt"
MAX_HEAD = 64 * 1024

# How the app answers a request, by name:
BEHAVIOURS = (
    "normal",  # 200, Content-Length
    "chunked",  # 200, chunked
    "extra",  # 200, then a second whole response, in the same write
    "garbage",  # 200, then stray bytes, in the same write
    "late-extra",  # 200; once the client has it, a second response while the connection idles
    "late-close",  # 200 keep-alive; once the client has it, the app closes the idle connection
    "close-mid-body",  # head with Content-Length 100, 10 bytes of body, close
    "interim",  # 103 Early Hints and 100 Continue, then 200
    "no-body-status",  # 204 (or 304) that carries a body anyway
    "close-delimited",  # 200 without a length, Connection: close, body until close
    "te-and-cl",  # 200 chunked with a wrong Content-Length beside it
    "head-body",  # 200 to a HEAD, with a body anyway
    "early-answer",  # 200 after the head, then reads the body
    "reset-mid-body",  # head with Content-Length 100000, some body, then RST
    "stall",  # answers after ``stall_seconds``
)


@dataclass
class Parsed:
    token: str
    attempt: str
    method: str
    target: str


@dataclass
class TokenApp:
    """Serves connections handed to it (``serve``); ``behaviours`` maps token → behaviour;
    ``default`` answers tokens not in it (a soak draws one per request from ``pick``)."""

    behaviours: dict[str, str] = field(default_factory=dict)
    default: str = "normal"
    pick: object = None  # a callable(token) -> behaviour, consulted before ``default``
    stall_seconds: float = 1.0
    parsed: list[Parsed] = field(default_factory=list)
    connections: int = 0
    # Connections holding a deferred act ("late-extra", "late-close"), run by ``act_late``.
    late: list[tuple[trio.SocketStream, str, bytes, int]] = field(default_factory=list)
    streams: set[trio.SocketStream] = field(default_factory=set)
    # Requests parsed per connection: a deferred close only closes a connection that idles.
    served: dict[trio.SocketStream, int] = field(default_factory=dict)
    closed_idle: set[trio.SocketStream] = field(default_factory=set)

    def counts(self) -> Counter[tuple[str, str]]:
        """How many times each (token, attempt) was parsed."""
        return Counter((p.token, p.attempt) for p in self.parsed)

    def behaviour(self, token: str) -> str:
        if token in self.behaviours:
            return self.behaviours[token]
        if callable(self.pick):
            return self.pick(token)
        return self.default

    async def serve(self, listener: trio.SocketListener) -> None:
        await trio.serve_listeners(self.connection, [listener])

    async def act_late(self) -> None:
        """The deferred acts: a second response on, or the close of, an idle connection."""
        late, self.late = self.late, []
        for stream, what, token, served in late:
            if self.served.get(stream) != served:
                continue  # not idle any more: a later request came
            try:
                if what == "late-extra":
                    await stream.send_all(response(200, token, token))
                else:
                    # What came after this, unparsed, is never parsed: an idle close, not a
                    # close with a request under way (which a client may send again).
                    self.closed_idle.add(stream)
                    stream.socket.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.streams.add(stream)
        buffer = bytearray()
        try:
            while True:
                request = await read_request(stream, buffer)
                if request is None or stream in self.closed_idle:
                    return
                self.served[stream] = self.served.get(stream, 0) + 1
                head, method, target, headers = request
                token = (headers.get(TOKEN_HEADER) or target.rpartition(b"/t/")[2]).decode("latin-1")
                attempt = (headers.get(ATTEMPT_HEADER) or b"1").decode("latin-1")
                self.parsed.append(Parsed(token, attempt, method.decode("latin-1"), target.decode("latin-1")))
                how = self.behaviour(token)
                if how != "early-answer":
                    await read_body(stream, buffer, headers)
                if not await self.answer(stream, how, method, token.encode("latin-1")):
                    return
                if how == "early-answer":
                    await read_body(stream, buffer, headers)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError):
            return
        finally:
            self.streams.discard(stream)
            self.served.pop(stream, None)
            self.closed_idle.discard(stream)
            stream.socket.close()

    async def answer(self, stream: trio.SocketStream, how: str, method: bytes, token: bytes) -> bool:
        """Sends the scripted answer; False when the connection is done with."""
        head_only = method == b"HEAD"
        if how == "chunked":
            body = b"" if head_only else b"%x\r\n%s\r\n0\r\n\r\n" % (len(token), token)
            await stream.send_all(_head(200, token, b"transfer-encoding: chunked\r\n") + body)
        elif how == "extra":
            await stream.send_all(response(200, token, token, head_only) + response(200, token, token))
        elif how == "garbage":
            await stream.send_all(response(200, token, token, head_only) + b"garbage\r\n\r\n")
        elif how in ("late-extra", "late-close"):
            await stream.send_all(response(200, token, token, head_only))
            self.late.append((stream, how, token, self.served[stream]))
        elif how == "close-mid-body":
            await stream.send_all(_head(200, token, b"content-length: 100\r\n") + token[:10])
            return False
        elif how == "reset-mid-body":
            await stream.send_all(_head(200, token, b"content-length: 100000\r\n") + b"x" * 1000)
            await trio.sleep(0.01)
            reset(stream)
            return False
        elif how == "interim":
            await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
            await stream.send_all(response(200, token, token, head_only))
        elif how == "no-body-status":
            status = 304 if token[-1:] in b"02468" else 204
            await stream.send_all(_head(status, token, b"content-length: %d\r\n" % len(token)) + token)
        elif how == "close-delimited":
            await stream.send_all(_head(200, token, b"connection: close\r\n") + (b"" if head_only else token))
            return False
        elif how == "te-and-cl":
            body = b"" if head_only else b"%x\r\n%s\r\n0\r\n\r\n" % (len(token), token)
            extra = b"transfer-encoding: chunked\r\ncontent-length: 3\r\n"
            await stream.send_all(_head(200, token, extra) + body)
        elif how == "head-body":
            await stream.send_all(response(200, token, token))  # to a HEAD too: stray bytes
        elif how == "stall":
            await trio.sleep(self.stall_seconds)
            await stream.send_all(response(200, token, token, head_only))
        else:  # normal, early-answer
            await stream.send_all(response(200, token, token, head_only))
        return True

    async def close_all(self) -> None:
        for stream in list(self.streams):
            stream.socket.close()
        self.streams.clear()
        self.late.clear()


def _head(status: int, token: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nx-token: %s\r\n%s\r\n" % (status, token, extra)


def response(status: int, token: bytes, body: bytes, head_only: bool = False) -> bytes:
    """A whole response; for a HEAD, its head only (with the length of the body)."""
    head = _head(status, token, b"content-length: %d\r\n" % len(body))
    return head if head_only else head + body


def reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _fill(stream: trio.SocketStream, buffer: bytearray) -> bool:
    data = await stream.receive_some(65536)
    if not data:
        return False
    buffer += data
    return True


async def read_request(
    stream: trio.SocketStream, buffer: bytearray
) -> tuple[bytes, bytes, bytes, dict[bytes, bytes]] | None:
    """The next request head: (head, method, target, headers by lower-case name; a
    repeated header keeps its last value); None at a clean end of the connection."""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD or not await _fill(stream, buffer):
            return None
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return head, parts[0], parts[1], headers


async def read_body(stream: trio.SocketStream, buffer: bytearray, headers: dict[bytes, bytes]) -> bytes:
    """The request body as its framing says (chunked wins over Content-Length)."""
    if headers.get(b"transfer-encoding", b"").lower().rsplit(b",", 1)[-1].strip() == b"chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in buffer:
                if not await _fill(stream, buffer):
                    raise ValueError("chunked body cut short")
            line, _, _ = bytes(buffer).partition(b"\r\n")
            del buffer[: len(line) + 2]
            size = int(line.split(b";")[0], 16)
            while len(buffer) < size + 2:
                if not await _fill(stream, buffer):
                    raise ValueError("chunk cut short")
            if size == 0:  # no trailers are sent by the tests' clients
                del buffer[:2]
                return bytes(body)
            body += buffer[:size]
            del buffer[: size + 2]
    length = int(headers.get(b"content-length", b"0") or b"0")
    while len(buffer) < length:
        if not await _fill(stream, buffer):
            raise ValueError("body cut short")
    body = bytes(buffer[:length])
    del buffer[:length]
    return body
