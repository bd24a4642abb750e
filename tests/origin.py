"""A test origin (the "app" behind a sidecar), written with h11 so that the proxy is
checked against an independent HTTP/1.1 implementation, not against itself.

Paths:
  /hello                 200 "hello"
  /echo                  streams the request body back as it arrives (chunked if the
                         request was chunked, else the same Content-Length)
  /sha256                reads the body as it streams in; answers "<length> <sha256>"
  /info                  JSON: method, target, headers as received, connection number
  /status/N              status N, body "status N"
  /delay/S               waits S seconds, then 200
  /bytes/N[?chunked=1]   N bytes of a repeating pattern, streamed in 64 KiB pieces
  /reset                 head with Content-Length 100000, 1000 bytes, then an RST
  /reset-before          reads the request and resets the connection, no response
  /close-after           answers keep-alive, then closes the connection anyway
  /ws                    101 on an Upgrade request, then echoes raw bytes

On command (attributes set by the test): ``failing`` (a share of requests that get the
``fault``: 503, hang, reset) and ``latency`` (a slow instance).
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
from dataclasses import dataclass, field

import h11
import trio

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int) -> bytes:
    reps = n // len(PATTERN) + 1
    return (PATTERN * reps)[:n]


@dataclass
class OriginStats:
    connections: int = 0
    requests: int = 0  # request heads received
    completed: int = 0  # requests whose body was read whole
    paths: list[str] = field(default_factory=list)
    last_headers: list[tuple[str, str]] = field(default_factory=list)
    faults: int = 0  # answers spoilt on command (Origin.failing)
    fault_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def served(self) -> int:
        """Requests from callers: not the health probes of a sidecar in front (every 5 s),
        which may fall inside any window a test counts in."""
        return sum(1 for path in self.paths if path != "/health")


class Origin:
    def __init__(self) -> None:
        self.stats = OriginStats()
        self.port = 0
        # Faults on command, for the simple paths (/hello, /info, /status, /delay, /bytes):
        self.failing = 0.0  # this share of requests (0..1) gets the fault ...
        self.fault = "503"  # ... a 503 | "hang" (never answers) | "reset" (no response) | "stall S"
        self.latency = 0.0  # seconds added before every answer (a slow instance)
        self.rng = random.Random(0)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        number = self.stats.connections
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(stream, conn)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                if not isinstance(event, h11.Request):
                    return
                self.stats.requests += 1
                target = event.target.decode()
                self.stats.paths.append(target)
                self.stats.last_headers = [(n.decode(), v.decode()) for n, v in event.headers]
                keep = await self._handle(stream, conn, event, number)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, OSError):
            return
        finally:
            stream.socket.close()

    async def _next(self, stream: trio.SocketStream, conn: h11.Connection) -> object:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                return None
            return event

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, *events: object) -> None:
        for event in events:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

    async def _read_body(self, stream: trio.SocketStream, conn: h11.Connection) -> bytes:
        body = bytearray()
        while True:
            event = await self._next(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise trio.BrokenResourceError("request body cut short")

    async def _handle(self, stream: trio.SocketStream, conn: h11.Connection, req: h11.Request, number: int) -> bool:
        path, _, query = req.target.decode().partition("?")
        headers = {n.decode().lower(): v.decode() for n, v in req.headers}
        if path == "/echo":
            chunked = "chunked" in headers.get("transfer-encoding", "")
            out = [(b"content-type", b"application/octet-stream")]
            if chunked:
                out.append((b"transfer-encoding", b"chunked"))
            else:
                out.append((b"content-length", headers.get("content-length", "0").encode()))
            await self._send(stream, conn, h11.Response(status_code=200, headers=out))
            while True:
                event = await self._next(stream, conn)
                if isinstance(event, h11.Data):
                    await self._send(stream, conn, h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise trio.BrokenResourceError("request body cut short")
            self.stats.completed += 1
            await self._send(stream, conn, h11.EndOfMessage())
            return True
        if path == "/sha256":
            digest, length = hashlib.sha256(), 0
            while True:
                event = await self._next(stream, conn)
                if isinstance(event, h11.Data):
                    digest.update(event.data)
                    length += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise trio.BrokenResourceError("request body cut short")
            self.stats.completed += 1
            await self._simple(stream, conn, 200, f"{length} {digest.hexdigest()}".encode())
            return True
        await self._read_body(stream, conn)
        self.stats.completed += 1
        if self.latency:
            await trio.sleep(self.latency)
        if self.failing and self.rng.random() < self.failing:
            self.stats.faults += 1
            self.stats.fault_kinds[self.fault] = self.stats.fault_kinds.get(self.fault, 0) + 1
            if self.fault == "hang":
                await trio.sleep_forever()
            if self.fault == "reset":
                _reset(stream)
                return False
            if self.fault.startswith("stall "):  # "stall 0.5": answers, late
                await trio.sleep(float(self.fault.split()[1]))
                await self._simple(stream, conn, 200, b"late")
                return True
            await self._simple(stream, conn, 503, b"failing on command")
            return True
        if path == "/hello":
            await self._simple(stream, conn, 200, b"hello")
        elif path == "/info":
            info = {
                "method": req.method.decode(),
                "target": req.target.decode(),
                "headers": [[n.decode(), v.decode()] for n, v in req.headers],
                "connection": number,
            }
            await self._simple(stream, conn, 200, json.dumps(info).encode(), b"application/json")
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            if code in (204, 304):  # no body allowed; a wrong Content-Length to be ignored
                await self._send(stream, conn, h11.Response(status_code=code, headers=[]), h11.EndOfMessage())
            else:
                await self._simple(stream, conn, code, f"status {code}".encode())
        elif path.startswith("/delay/"):
            await trio.sleep(float(path.rsplit("/", 1)[1]))
            await self._simple(stream, conn, 200, b"late")
        elif path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            if "chunked=1" in query:
                head = [(b"transfer-encoding", b"chunked")]
            else:
                head = [(b"content-length", str(n).encode())]
            await self._send(stream, conn, h11.Response(status_code=200, headers=head))
            sent = n if req.method == b"HEAD" else 0
            while sent < n:
                piece = PATTERN[: min(len(PATTERN), n - sent)]
                await self._send(stream, conn, h11.Data(data=piece))
                sent += len(piece)
            await self._send(stream, conn, h11.EndOfMessage())
        elif path == "/reset":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            await trio.sleep(0.05)
            _reset(stream)
            return False
        elif path == "/reset-before":
            _reset(stream)
            return False
        elif path == "/close-after":
            await self._simple(stream, conn, 200, b"bye")
            return False
        elif path == "/ws":
            if headers.get("upgrade", "").lower() != "websocket":
                await self._simple(stream, conn, 400, b"not an upgrade")
                return True
            await self._send(
                stream,
                conn,
                h11.InformationalResponse(
                    status_code=101, headers=[(b"upgrade", b"websocket"), (b"connection", b"upgrade")]
                ),
            )
            data, _ = conn.trailing_data
            if data:
                await stream.send_all(b"echo:" + data)
            while chunk := await stream.receive_some(65536):
                await stream.send_all(b"echo:" + chunk)
            return False
        else:
            await self._simple(stream, conn, 404, b"origin: no such path")
        return True

    async def _simple(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain",
    ) -> None:
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await self._send(
            stream, conn, h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()
        )


def _reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()
