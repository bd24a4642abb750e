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

:class:`TLSConnection` is the same thing over TLS: an ``ssl.SSLObject`` whose memory BIOs
this module fills and drains with the same non-blocking socket calls, one ``recv`` and one
``send`` for as many records as there are (an ``SSLSocket`` reads a record's header and its
body with a syscall each: measured with benchmarks/micro_tls.py, see benchmarks/README.md).
Not ``trio.SSLStream``: a lock and a trip through the scheduler per call (9.4k 1 KB round
trips/s against 21k/s plain).
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


def startup_os_error(exc: BaseException) -> OSError | None:
    """The OSError a failed start raised (a port in use, an address not ours), also from
    inside the exception groups trio's nurseries wrap it in; None when the failure holds
    anything else (then it is a bug, and its traceback is what to show)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(OSError)
        if matched is not None and rest is None:
            first: BaseException = matched
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            return first if isinstance(first, OSError) else None
    return None


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

    def send_nowait(self, data: bytes) -> None:
        """Write ``data`` if the socket takes it now; never waits (a 408 before a close)."""
        try:
            self.sock.send(data)
        except OSError:
            pass

    def pending(self) -> bool:
        """Bytes read from the socket that a ``recv`` would return first: none here."""
        return False

    async def shutdown_write(self) -> None:
        """Half-close: the peer reads its end of file, and may still send (opaque TCP)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
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

    Made by :func:`start_tls`. ``sock`` is still the plain socket: OpenSSL works on two
    memory BIOs (``ssl.SSLObject``) and this class moves the bytes. A ``recv`` brings
    whatever the kernel holds (often several records: a whole request) into the incoming
    BIO in one syscall, where an ``SSLSocket`` reads each record's header and body with a
    ``read`` each; a ``send_all`` encrypts into the outgoing BIO and hands the records to
    the kernel in one ``send``.

    One writer at a time (a request's writer, or the push channel's). After the handshake a
    read never sends: TLS 1.3 has no renegotiation, the tickets a client receives need no
    answer, and what a read may leave in the outgoing BIO (the answer to a peer's KeyUpdate)
    leaves with the next write's records, in order. So the reader and the writer never
    share a direction of the socket, and nobody waits for writability but the writer.
    """

    __slots__ = ("tls_object", "incoming", "outgoing", "sending")
    tls = True

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        tls_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.sock = sock
        self.closed = False
        self.peer = peer
        self.tls_object = tls_object
        self.incoming = incoming  # ciphertext from the socket, not decrypted yet
        self.outgoing = outgoing  # ciphertext for the socket
        self.sending = False  # a send_all is waiting for the socket to take the rest

    async def handshake(self) -> None:
        """Complete the handshake; :class:`TLSError` (or :class:`Closed`) when it fails."""
        tls_object = self.tls_object
        while True:
            try:
                tls_object.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                self._send_nowait(b"")  # the alert that says why, if the socket takes it
                raise TLSError(_tls_why(exc, self.closed)) from None
            if self.outgoing.pending:
                await self._send_records(self.outgoing.read())
            if done:
                return
            await self._receive_encrypted()

    def peer_certificate(self) -> dict[str, object]:
        """The peer's certificate as ``getpeercert()`` decodes it; only after a handshake
        with ``CERT_REQUIRED``, so it was verified against the trusted roots. ``{}`` if none."""
        return dict(self.tls_object.getpeercert() or {})

    @property
    def context(self) -> ssl.SSLContext:
        return self.tls_object.context

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session, to resume with on the next connection (client side)."""
        return self.tls_object.session

    @property
    def session_reused(self) -> bool:
        return bool(self.tls_object.session_reused)

    def pending(self) -> bool:
        """Bytes already read from the socket, decrypted or not: the kernel may no longer
        show the socket as readable, yet a ``recv`` has something to return."""
        return bool(self.incoming.pending or self.tls_object.pending())

    async def recv(self, *, wait_first: bool = False) -> bytes:
        # A read takes one record (16 KB of plaintext at most, less than RECEIVE_SIZE) and
        # leaves nothing decrypted behind: what is left is in the incoming BIO, undecrypted.
        tls_object, incoming, sock = self.tls_object, self.incoming, self.sock
        ready = incoming.pending  # records to decrypt first; else straight to the socket
        if wait_first and not ready:
            await _wait(wait_readable, sock)
        while True:
            if ready:
                try:
                    return tls_object.read(RECEIVE_SIZE)  # b"" after the peer's close_notify
                except ssl.SSLWantReadError:
                    pass  # part of a record: the rest is on its way
                except ssl.SSLEOFError:
                    return b""  # the peer's FIN without close_notify: its end, as HTTP framing decides
                except ssl.SSLZeroReturnError:
                    return b""  # its close_notify after ours (a half-close, shutdown_write): the end too
                except ssl.SSLError as exc:
                    self._send_nowait(b"")  # the alert, if any
                    raise TLSError(_tls_why(exc, self.closed)) from None
            # _receive_encrypted, inlined: this runs for every request, and awaiting it would
            # make a coroutine each time (send_all inlines its send for the same reason).
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                await _wait(wait_readable, sock)
                continue
            except OSError as exc:
                raise Closed(_why(exc, self.closed)) from None
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()  # the next read says how it ended
            ready = 1

    async def _receive_encrypted(self) -> None:
        """What the kernel holds, into the incoming BIO (its end of file at the peer's FIN);
        waits only when there is nothing. For the handshake."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                await _wait(wait_readable, sock)
                continue
            except OSError as exc:
                raise Closed(_why(exc, self.closed)) from None
            if data:
                self.incoming.write(data)
            else:
                self.incoming.write_eof()
            return

    async def send_all(self, data: bytes) -> None:
        try:
            self.tls_object.write(data)  # into the outgoing BIO, whole: it never waits
        except ssl.SSLError as exc:
            raise TLSError(_tls_why(exc, self.closed)) from None
        records = self.outgoing.read()
        try:
            sent = self.sock.send(records)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise Closed(_why(exc, self.closed)) from None
        if sent != len(records):
            await self._send_rest(records, sent)

    async def _send_records(self, records: bytes) -> None:
        """What ``send_all`` does after encrypting (inlined there: no coroutine per request)."""
        try:
            sent = self.sock.send(records)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise Closed(_why(exc, self.closed)) from None
        if sent != len(records):
            await self._send_rest(records, sent)

    async def _send_rest(self, records: bytes, sent: int) -> None:
        """``records`` from ``sent`` on, as the socket takes them; a writer half way through
        its records is ``sending``, and nothing else may write until it is done."""
        sock = self.sock
        view = memoryview(records)[sent:]
        self.sending = True
        try:
            while view:
                try:
                    await wait_writable(sock)
                    view = view[sock.send(view) :]
                except BlockingIOError:
                    continue
                except (trio.ClosedResourceError, OSError) as exc:
                    raise Closed(_why(exc, self.closed)) from None
        finally:
            self.sending = False

    async def shutdown_write(self) -> None:
        """Half-close: close_notify, then the socket's write side; reading goes on (TLS 1.3
        lets the peer keep sending after our close_notify)."""
        try:
            self.tls_object.unwrap()  # close_notify into the outgoing BIO
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify is not there yet: it need not be
        except (OSError, ValueError) as exc:
            raise Closed(str(exc) or "closed") from None
        if self.outgoing.pending:
            await self._send_records(self.outgoing.read())
        await Connection.shutdown_write(self)

    def encrypt(self, data: bytes) -> bytes:
        """``data`` as the records to write to the socket, in order after any written before:
        for a writer that sends them itself (the push channel)."""
        self.tls_object.write(data)
        return self.outgoing.read()

    def send_nowait(self, data: bytes) -> None:
        """Write ``data`` if the socket takes it now; never waits (a 408 before a close)."""
        self._send_nowait(data)

    def _send_nowait(self, data: bytes) -> None:
        """``data`` and what OpenSSL has to send (an alert, close_notify), in one non-blocking
        ``send``; nothing if a writer is half way through its records (they would interleave)."""
        if self.sending or self.closed:
            return
        try:
            if data:
                self.tls_object.write(data)
            if self.outgoing.pending:
                self.sock.send(self.outgoing.read())
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Send close_notify if the socket takes it now (never waits for it, nor for the
        peer's), then close; a task waiting on this socket wakes with :class:`Closed`."""
        if not self.closed:
            try:
                self.tls_object.unwrap()  # close_notify into the outgoing BIO
            except (OSError, ValueError):
                pass  # the peer's close_notify not there yet (never waited for), or no handshake done
            self._send_nowait(b"")
            self.closed = True
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
    is not done yet: ``await handshake()``. ``session``: a client's session to resume."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = context.wrap_bio(incoming, outgoing, server_side=server_side, session=None if server_side else session)
    conn.closed = True  # its socket now belongs to the TLSConnection
    return TLSConnection(conn.sock, conn.peer, tls_object, incoming, outgoing)


async def _wait(wait: Callable[[socket.socket], Awaitable[None]], sock: socket.socket) -> None:
    try:
        await wait(sock)
    except (trio.ClosedResourceError, OSError):
        raise Closed("closed while waiting") from None


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


# glibc's malloc serves a request of 128 KiB or more with a mapping of its own and unmaps it
# at free (its threshold adapts, but not to the sizes a stream keeps changing to): a proxied
# stream whose buffers cross that size (h2's frame buffer, what is queued for a slow reader)
# then pays a page fault for every page of every such buffer. Measured: 100 MB over HTTP/2
# through two sidecars, 98-109 MB/s → 115-128 MB/s; HTTP/1.1 requests are unchanged.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def tune_malloc() -> bool:
    """Raise malloc's mmap threshold to MMAP_THRESHOLD for this process; False where the C
    library has no such setting (not glibc)."""
    import ctypes  # here: only the sidecar's start needs it

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


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
