"""A raw HTTP/2 server for tests (h2 over trio sockets, h2c or TLS with ALPN h2) whose
behaviour a test scripts per request: ``handler(stream)`` answers each stream; the
connection can be told to send GOAWAY or to drop. Independent of the sidecar's client."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from hyperframe.frame import GoAwayFrame


class ServerStream:
    def __init__(self, conn: ServerConnection, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.body_ended = trio.Event()
        self.reset_code: int | None = None
        self.reset = trio.Event()
        self.more = trio.Event()  # set (and replaced) when body bytes arrive
        self.auto_ack = conn.server.auto_ack  # acknowledge the body as it arrives

    def field(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read_body(self) -> bytes:
        await self.body_ended.wait()
        return bytes(self.body)

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]] = (), *, end: bool = False) -> None:  # type: ignore[assignment]
        self.conn.h2.send_headers(self.id, [(b":status", b"%d" % status), *headers], end_stream=end)
        await self.conn.flush()

    async def send(self, data: bytes, *, end: bool = False) -> None:
        """``data`` as the windows allow (waits for WINDOW_UPDATEs)."""
        h2conn = self.conn.h2
        view = memoryview(data)
        while view:
            window = h2conn.local_flow_control_window(self.id)
            if window <= 0:
                await self.conn.window_moved()
                continue
            size = min(window, len(view), h2conn.max_outbound_frame_size)
            h2conn.send_data(self.id, view[:size])
            view = view[size:]
            await self.conn.flush()
        if end:
            h2conn.end_stream(self.id)
            await self.conn.flush()

    async def trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.conn.h2.send_headers(self.id, fields, end_stream=True)
        await self.conn.flush()

    async def reset_stream(self, code: int) -> None:
        self.conn.h2.reset_stream(self.id, code)
        await self.conn.flush()


Handler = Callable[[ServerStream], Awaitable[None]]


class ServerConnection:
    def __init__(self, server: H2Server, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.streams: dict[int, ServerStream] = {}
        self._window = trio.Event()
        self._lock = trio.Lock()
        self.went_away = False

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def window_moved(self) -> None:
        await self._window.wait()

    async def goaway(self, last_stream_id: int, code: int = 0) -> None:
        """A GOAWAY made by hand: h2 allows no frame after its own, but the streams at or
        below ``last_stream_id`` are to be finished (RFC 9113 §6.8)."""
        self.went_away = True
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code)
        async with self._lock:
            await self.stream.send_all(self.h2.data_to_send() + frame.serialize())

    async def drop(self) -> None:
        await self.stream.aclose()

    async def serve(self, nursery: trio.Nursery) -> None:
        settings = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams}
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        self.h2.initiate_connection()
        await self.flush()
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    if self.went_away:  # h2 refuses frames after its GOAWAY: a real server ignores them
                        continue
                    raise
                for event in events:
                    self._on(event, nursery)
                await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _on(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            stream = self.streams[event.stream_id] = ServerStream(self, event.stream_id, list(event.headers or ()))
            self.server.streams.append(stream)
            if event.stream_ended:
                stream.body_ended.set()
            nursery.start_soon(self._handle, stream)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams[event.stream_id]
            stream.body += event.data
            if stream.auto_ack:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            more, stream.more = stream.more, trio.Event()
            more.set()
        elif isinstance(event, h2.events.StreamEnded):
            self.streams[event.stream_id].body_ended.set()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams[event.stream_id]
            stream.reset_code = int(event.error_code)
            stream.reset.set()
            self.server.resets.append(int(event.error_code))
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            window, self._window = self._window, trio.Event()
            window.set()

    async def _handle(self, stream: ServerStream) -> None:
        try:
            await self.server.handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # noqa: BLE001 - a stream the client reset, say: the test looks at what happened
            self.server.handler_errors.append(exc)


class H2Server:
    """Serves ``handler`` on 127.0.0.1; ``ssl_context``: TLS (offer ALPN h2 on it)."""

    def __init__(
        self,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_streams: int = 100,
        auto_ack: bool = True,
    ) -> None:
        self.handler = handler
        self.auto_ack = auto_ack
        self.ssl_context = ssl_context
        self.max_streams = max_streams
        self.connections: list[ServerConnection] = []
        self.streams: list[ServerStream] = []
        self.resets: list[int] = []
        self.handler_errors: list[Exception] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def serve_one(raw: trio.SocketStream) -> None:
            stream: trio.abc.Stream = raw
            if self.ssl_context is not None:
                tls = trio.SSLStream(raw, self.ssl_context, server_side=True)
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError):
                    return
                stream = tls
            conn = ServerConnection(self, stream)
            self.connections.append(conn)
            async with trio.open_nursery() as streams:
                await conn.serve(streams)
                streams.cancel_scope.cancel()

        nursery.start_soon(trio.serve_listeners, serve_one, listeners)
        return self.port
