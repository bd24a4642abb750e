"""Sockets for the data path: non-blocking stdlib sockets driven by trio's low-level
waits, and deadlines kept by a sweeper instead of a cancel scope per request.

Why not ``trio.SocketStream``: every ``send_all`` is a checkpoint (a trip through the
scheduler), a ``CancelScope`` has to be entered and left, and ``wait_readable`` on a
socket that already has data still goes through the scheduler. A proxy hop does four
socket operations per request; with SocketStream and two timeouts per request that
overhead alone outweighed everything else the hop does (benchmarks/micro_path.py
measures the path; benchmarks/RESULTS.md has the figures). So:

* ``send_all`` tries ``send`` first and waits only if the kernel buffer is full;
* ``recv`` tries ``recv`` first (the next request or the response is often there
  already) and waits only on EAGAIN;
* a deadline is a float on the object that owns it; :class:`Deadlines` checks them all
  every ``tick`` and calls ``expire()`` on the late ones, which close the socket (the
  waiting task then sees ``Closed``). Timeouts fire within one tick of their deadline.

Cancellation still works: every wait is a trio checkpoint, and :meth:`Connection.close`
wakes a task blocked on the socket (``notify_closing``).

:class:`TLSConnection` is the same thing over TLS: an ``ssl.SSLSocket`` on the same
non-blocking socket, driven the same way (``SSLWantReadError``/``SSLWantWriteError``
instead of EAGAIN). Not ``trio.SSLStream``: it copies every byte through memory BIOs and
a lock per call (measured: 9.4k 1 KB round trips/s against 21k/s plain); here OpenSSL
reads and writes the socket itself.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

import trio
from trio.lowlevel import notify_closing, wait_readable, wait_writable

log = logging.getLogger("meshlet.listener")

RECEIVE_SIZE = 64 * 1024


class Closed(Exception):
    """The connection was closed: by the peer (reset, broken pipe) or by us."""


class Connection:
    """One TCP connection, non-blocking, TCP_NODELAY."""

    __slots__ = ("sock", "closed", "peer")
    tls = False  # TLSConnection: True

    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.closed = False
        self.peer = peer

    async def recv(self, *, wait_first: bool = False) -> bytes:
        """Some bytes; ``b""`` when the peer closed its side. ``wait_first``: skip the
        first try when the bytes cannot be there yet (a response just asked for)."""
        sock = self.sock
        if wait_first:
            try:
                await wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                raise Closed("closed while waiting to read") from None
        while True:
            try:
                return sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise Closed(_why(exc, self.closed)) from None
            try:
                await wait_readable(sock)
            except (trio.ClosedResourceError, OSError):
                raise Closed("closed while waiting to read") from None

    async def send_all(self, data: bytes) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise Closed(_why(exc, self.closed)) from None
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                await wait_writable(sock)
                view = view[sock.send(view) :]
            except BlockingIOError:
                continue
            except (trio.ClosedResourceError, OSError) as exc:
                raise Closed(_why(exc, self.closed)) from None

    def close(self) -> None:
        """Close now; a task waiting on this socket wakes with :class:`Closed`."""
        if not self.closed:
            self.closed = True
            notify_closing(self.sock)
            self.sock.close()

    def reset(self) -> None:
        """Close with an RST: what a peer must see when a message was cut short."""
        if not self.closed:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            self.close()


class TLSError(Closed):
    """The TLS layer failed: a handshake that did not complete (refused certificate, a
    peer that does not speak TLS, an alert) or a record that did not decrypt."""


class TLSConnection(Connection):
    """One TLS connection over a non-blocking TCP socket: :meth:`handshake` first (the
    caller bounds its time), then the interface of :class:`Connection`.

    Made by :func:`start_tls`. ``sock`` is the ``ssl.SSLSocket``: OpenSSL reads and
    writes the descriptor itself, and says what it waits for with ``SSLWantReadError``
    or ``SSLWantWriteError`` (never BlockingIOError, though both are OSErrors).
    """

    __slots__ = ()
    tls = True
    sock: ssl.SSLSocket

    async def handshake(self) -> None:
        """Complete the handshake; :class:`TLSError` (or :class:`Closed`) when it fails."""
        sock = self.sock
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await _wait(wait_readable, sock)
            except ssl.SSLWantWriteError:
                await _wait(wait_writable, sock)
            except ssl.SSLError as exc:
                raise TLSError(_tls_why(exc, self.closed)) from None
            except OSError as exc:
                raise Closed(_why(exc, self.closed)) from None

    def peer_certificate(self) -> dict[str, object]:
        """The peer's certificate as ``getpeercert()`` decodes it; only after a handshake
        with ``CERT_REQUIRED``, so it was verified against the trusted roots. ``{}`` if none."""
        return dict(self.sock.getpeercert() or {})

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session, to resume with on the next connection (client side)."""
        return self.sock.session

    @property
    def session_reused(self) -> bool:
        return bool(self.sock.session_reused)

    async def recv(self, *, wait_first: bool = False) -> bytes:
        sock = self.sock
        # OpenSSL may hold decrypted bytes the kernel no longer shows as readable.
        if wait_first and not sock.pending():
            await _wait(wait_readable, sock)
        while True:
            try:
                return sock.recv(RECEIVE_SIZE)  # b"" on close_notify or the peer's FIN
            except ssl.SSLWantReadError:
                await _wait(wait_readable, sock)
            except ssl.SSLWantWriteError:
                await _wait_shared(wait_writable, sock)
            except ssl.SSLError as exc:
                raise TLSError(_tls_why(exc, self.closed)) from None
            except (OSError, ValueError) as exc:  # ValueError: the SSLSocket was closed under us
                raise Closed(_why(exc, self.closed)) from None

    async def send_all(self, data: bytes) -> None:
        # Without SSL_MODE_ENABLE_PARTIAL_WRITE (CPython does not set it) a write is all or
        # nothing: after SSLWantWriteError the same bytes are written again, and OpenSSL
        # carries on where the socket stopped taking them.
        sock = self.sock
        while True:
            try:
                sock.send(data)
                return
            except ssl.SSLWantWriteError:
                await _wait(wait_writable, sock)
            except ssl.SSLWantReadError:
                await _wait_shared(wait_readable, sock)
            except ssl.SSLError as exc:
                raise TLSError(_tls_why(exc, self.closed)) from None
            except (OSError, ValueError) as exc:
                raise Closed(_why(exc, self.closed)) from None

    def close(self) -> None:
        """Send close_notify if the socket takes it now (never waits for it, nor for the
        peer's), then close; a task waiting on this socket wakes with :class:`Closed`."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.unwrap()  # one non-blocking write of close_notify
            except (OSError, ValueError):
                pass  # the peer's close_notify not there yet, a full buffer, or a handshake never done
            notify_closing(self.sock)
            self.sock.close()

    def reset(self) -> None:
        """Close with an RST and no close_notify: the message was cut short."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            notify_closing(self.sock)
            self.sock.close()


def start_tls(
    conn: Connection, context: ssl.SSLContext, *, server_side: bool, session: ssl.SSLSession | None = None
) -> TLSConnection:
    """``conn``'s socket, now under TLS (``conn`` must not be used again); the handshake
    is not done yet: ``await handshake()``. ``session``: a client's session to resume.
    :class:`Closed` if the connection is already gone (reset before a byte was read)."""
    try:
        sock = context.wrap_socket(
            conn.sock, server_side=server_side, do_handshake_on_connect=False, session=None if server_side else session
        )
    except OSError as exc:
        conn.close()
        raise Closed(_why(exc, False)) from None
    conn.closed = True  # its socket object was detached into the SSLSocket
    tls = TLSConnection.__new__(TLSConnection)
    tls.sock = sock
    tls.closed = False
    tls.peer = conn.peer
    return tls


async def _wait(wait: Callable[[socket.socket], Awaitable[None]], sock: socket.socket) -> None:
    try:
        await wait(sock)
    except (trio.ClosedResourceError, OSError):
        raise Closed("closed while waiting") from None


async def _wait_shared(wait: Callable[[socket.socket], Awaitable[None]], sock: socket.socket) -> None:
    """A read that must write first, or a write that must read first: rare after a TLS 1.3
    handshake (a ticket or key update to send or take). Another task may already wait on
    the socket for that direction (the reader, or the body's writer, run at once); trio
    allows one waiter, so then this one pauses briefly and tries again."""
    try:
        await _wait(wait, sock)
    except trio.BusyResourceError:
        await trio.sleep(0.001)


def _tls_why(exc: ssl.SSLError, closed_by_us: bool) -> str:
    """Why, in words: "certificate verify failed: certificate has expired", "tlsv13 alert
    certificate required", "wrong version number" (a peer that does not speak TLS)."""
    if closed_by_us:
        return "closed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _why(exc: BaseException, closed_by_us: bool) -> str:
    if closed_by_us:
        return "closed"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset by peer"
    return str(exc)


async def connect(host: str, port: int, *, bound: Callable[[int], None] | None = None) -> Connection:
    """A connected Connection; OSError when refused or unreachable. The caller bounds
    the time (this is the rare path: connections are pooled). ``bound``: told the source
    port, which is then picked before the connection starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if bound is not None:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            bound(sock.getsockname()[1])
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, errno.errorcode.get(code, str(code)))
        if code:
            await wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
    except BaseException:
        sock.close()
        raise
    return Connection(sock, f"{host}:{port}")


BACKLOG = 1024


def listen_socket(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = BACKLOG, listen: bool = True
) -> socket.socket:
    """A bound, non-blocking TCP socket, listening unless ``listen`` is False: then the
    port is held (and known) but connections to it are refused until ``sock.listen()``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ConnectionLimit:
    """The open connections of a listener (or of several sharing one limit: the outbound
    listener and the ``--upstream`` ones) and how many it may hold. Past the limit a new
    connection is closed at once, so one listener's flood cannot take the descriptors the
    others (admin, upstream connections, the push channel) need. Logged once per episode:
    when the limit is first hit, and when the listener is back under three quarters of it."""

    __slots__ = ("name", "limit", "open", "rejected", "_full_since_log")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.open = 0
        self.rejected = 0  # connections closed at once because the limit was reached
        self._full_since_log = -1  # rejections counted when the episode's warning was logged; -1: none

    def reject(self) -> None:
        self.rejected += 1
        if self._full_since_log < 0:
            self._full_since_log = self.rejected - 1
            log.warning(
                "%s listener at its limit of %d connections: new ones are closed at once until some end "
                "(raise it with --max-%s-connections, or the open files limit it is derived from)",
                self.name,
                self.limit,
                self.name,
            )

    def release(self) -> None:
        self.open -= 1
        if self._full_since_log >= 0 and self.open <= self.limit * 3 // 4:
            log.info(
                "%s listener below its connection limit again; %d connection(s) were closed at once",
                self.name,
                self.rejected - self._full_since_log,
            )
            self._full_since_log = -1


class ListenerLimits(NamedTuple):
    inbound: int
    outbound: int
    admin: int


# Descriptors kept for the process itself: the listening sockets, the push channel, span
# export, the app's health probe, log files, the interpreter's own.
RESERVED_DESCRIPTORS = 128
MAX_DATA_CONNECTIONS = 16_384  # past this, memory (a task and buffers each), not descriptors, runs out
MAX_ADMIN_CONNECTIONS = 64  # probes and scrapes: a few at a time


def derived_connection_limits(open_files: int) -> ListenerLimits:
    """Default connection limits from the open files limit: the admin listener gets up to
    64, and each data listener a quarter of what is left after the reserve: a connection
    to it may need one upstream connection, so both data listeners full, with an upstream
    connection each, still leave the admin listener and the reserve their descriptors."""
    admin = max(2, min(MAX_ADMIN_CONNECTIONS, open_files // 16))
    data = max(2, min(MAX_DATA_CONNECTIONS, (open_files - RESERVED_DESCRIPTORS - admin) // 4))
    return ListenerLimits(data, data, admin)


def raise_open_files_limit() -> int:
    """Raise the soft open files limit to the hard one (as nginx and Envoy are usually run);
    the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit; the limits below are derived from it
    return soft if soft != resource.RLIM_INFINITY else hard


async def serve_socket(
    listener: socket.socket,
    handler: Callable[[Connection], Awaitable[None]],
    nursery: trio.Nursery,
    limit: ConnectionLimit | None = None,
) -> None:
    """Accept forever; each connection runs ``handler`` in its own task. With ``limit``,
    a connection past it is closed at once with a reset (nothing of it is read)."""
    starved_at = -60.0
    while True:
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            await wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                now = trio.current_time()
                if now - starved_at >= 60.0:  # once a minute at most, not per attempt
                    starved_at = now
                    log.warning("cannot accept a connection: %s (the connection limits leave too few)", exc)
                await trio.sleep(0.1)  # out of descriptors: let some close
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                continue
            raise
        if limit is None:
            peer = address[0] if isinstance(address, tuple) else "unix"
            nursery.start_soon(handler, Connection(sock, peer))
        elif limit.open >= limit.limit:
            _refuse(sock)
            limit.reject()
            await trio.lowlevel.checkpoint()  # a flood must not keep the other tasks from running
        else:
            limit.open += 1
            peer = address[0] if isinstance(address, tuple) else "unix"
            nursery.start_soon(_counted, handler, Connection(sock, peer), limit)


async def _counted(
    handler: Callable[[Connection], Awaitable[None]], connection: Connection, limit: ConnectionLimit
) -> None:
    try:
        await handler(connection)
    finally:
        limit.release()


def _refuse(sock: socket.socket) -> None:
    """Close with a reset: the client learns at once, and no TIME_WAIT is left here."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


class Expiring(Protocol):
    deadline: float

    def expire(self) -> None: ...


class Deadlines:
    """Objects with a ``deadline`` (trio clock) and ``expire()``; a sweeper task calls
    ``expire()`` on each one whose deadline passed, then forgets it.

    ``now`` is a coarse clock, refreshed every tick (nginx's cached time idea): reading
    an attribute costs nothing, ``trio.current_time()`` three Python calls, and a
    deadline computed from a time one tick old fires at most one tick early."""

    def __init__(self, tick: float = 0.1) -> None:
        self.tick = tick
        self.watched: set[Expiring] = set()
        self.now = 0.0  # set by serve(), which must start before any deadline is used

    def clock(self) -> float:
        return self.now

    def watch(self, item: Expiring) -> None:
        self.watched.add(item)

    def forget(self, item: Expiring) -> None:
        self.watched.discard(item)

    def sweep(self, now: float) -> int:
        late = [item for item in self.watched if item.deadline <= now]
        for item in late:
            self.watched.discard(item)
            item.expire()
        return len(late)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.now = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep(self.tick)
            self.now = trio.current_time()
            self.sweep(self.now)
