"""The inbound listener's connections: mTLS or plaintext, told apart by their first byte.

Every TLS connection starts with a handshake record (0x16); an HTTP request with a method
name. So the first byte is peeked (``MSG_PEEK``: it stays for whoever reads next), waiting no
longer than the header timeout, and decides:

* 0x16: a TLS handshake with the server context, a client certificate required and verified;
  the caller is the service its SPIFFE ID names, for every request on the connection;
  it speaks HTTP/2 if ALPN chose ``h2``, else HTTP/1.1;
* anything else: plaintext (HTTP/2 if it starts with the client preface, else HTTP/1.1),
  whose caller is ``unauthenticated`` (meshlet.identity), or, when the service's mTLS mode
  is ``strict``, a connection closed at once (counted, logged once per burst from one peer).

What a request's ``x-meshlet-source`` header claims is never used (sidecar/layers/inbound.py
drops it): the identity is the connection's.

When the app's protocol is ``tcp`` the connection, once its caller is known, is spliced to
the app instead (sidecar/net/tcp_proxy.py). Callers through a sidecar open with a TLS
ClientHello, so the peek never waits for them; in mode ``off`` there is nothing to tell
apart and no peek at all, so a plaintext client of a server-first protocol is served at once.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import wait_readable

from meshlet.identity import UNAUTHENTICATED
from meshlet.io import Closed, Connection, start_tls

from ..core import errors
from ..layers.base import Handler
from .downstream import Timeouts, serve_connection
from .tls import MeshTLS, PeerIdentityError, peer_service

log = logging.getLogger("meshlet.inbound")

TLS_HANDSHAKE_RECORD = 0x16
REFUSAL_LOG_INTERVAL = 60.0  # a peer refused again within this is counted, not logged again
MAX_PEERS_REMEMBERED = 10_000  # peers whose last refusal log time is kept


# Serves a connection as opaque TCP (sidecar/net/tcp_proxy.py), given the caller it proved.
Opaque = Callable[[Connection, str], Awaitable[None]]


class _Bursts:
    """Per peer: log the first event of a burst, count the rest until REFUSAL_LOG_INTERVAL
    passes, then say how many there were with the next one logged."""

    def __init__(self) -> None:
        self.logged: dict[str, tuple[float, int]] = {}  # peer → (logged at, events since)

    def due(self, peer: str, now: float) -> int | None:
        """None: counted, not to be logged; else log now, with this many left unlogged since."""
        last = self.logged.get(peer)
        if last is not None and now - last[0] < REFUSAL_LOG_INTERVAL:
            self.logged[peer] = (last[0], last[1] + 1)
            return None
        if len(self.logged) >= MAX_PEERS_REMEMBERED:
            self.logged.clear()
        self.logged[peer] = (now, 0)
        return 0 if last is None else last[1]


class InboundGate:
    """The inbound listener's ``accept``: identifies the caller, then serves the connection."""

    def __init__(
        self,
        tls: MeshTLS,
        service: str,
        handler: Handler,
        timeouts: Timeouts,
        on_plaintext_refused: Callable[[], None] = lambda: None,
        opaque: Callable[[], Opaque | None] = lambda: None,
    ) -> None:
        self.tls = tls
        self.service = service
        self.handler = handler
        self.timeouts = timeouts
        self.on_plaintext_refused = on_plaintext_refused
        # The app's protocol is tcp: how to splice a caller's connection to it (never an HTTP
        # reader, so never a wait on HTTP/2 detection).
        self.opaque = opaque
        self._refusals = _Bursts()  # plaintext refused (strict)
        self._failures = _Bursts()  # TLS handshakes or identities refused
        self._no_credentials_logged = False

    async def __call__(self, io: Connection) -> None:
        try:
            opaque = self.opaque()
            if opaque is not None and self.tls.mode(self.service) == "off":
                await opaque(io, UNAUTHENTICATED)  # nothing to tell apart: no wait for a first byte
                return
            first = await self._first_byte(io)
            if first is None:
                return  # closed, or silent past the header timeout, before a byte
            if first == TLS_HANDSHAKE_RECORD:
                await self._serve_tls(io, opaque)
            elif self.tls.mode(self.service) == "strict":
                self._refuse_plaintext(io)
            elif opaque is not None:
                await opaque(io, UNAUTHENTICATED)
            else:
                await serve_connection(io, self.handler, self.timeouts, UNAUTHENTICATED)
        finally:
            io.close()

    async def _first_byte(self, io: Connection) -> int | None:
        """The first byte, left in the socket; None if the peer closed, or sent nothing within
        the header timeout (counted as the downstream loop counts a silent connection)."""
        sock = io.sock
        with trio.move_on_after(self.timeouts.header):
            while True:
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    try:
                        await wait_readable(sock)
                    except (trio.ClosedResourceError, OSError):
                        return None
                    continue
                except OSError:
                    return None
                return data[0] if data else None
        self.timeouts.expired["first-byte"] += 1
        return None

    async def _serve_tls(self, io: Connection, opaque: Opaque | None) -> None:
        tls = self.tls
        tls.refresh()
        context = tls.server
        if context is None:
            if not self._no_credentials_logged:
                self._no_credentials_logged = True
                log.warning("a TLS connection from %s, but no TLS credentials yet: closed", io.peer)
            tls.on_failure("server", "no-credentials")
            return
        try:
            conn = start_tls(io, context, server_side=True)
        except Closed:  # reset before the handshake began
            tls.on_failure("server", errors.TLS_HANDSHAKE_FAILED.name)
            return
        try:
            with trio.fail_after(self.timeouts.header):
                await conn.handshake()
            caller = peer_service(conn, tls.trust_domain)
        except (Closed, trio.TooSlowError) as exc:
            self._failed(io.peer, errors.TLS_HANDSHAKE_FAILED.name, str(exc) or "timed out")
            conn.close()
            return
        except PeerIdentityError as exc:
            self._failed(io.peer, errors.PEER_IDENTITY_MISMATCH.name, str(exc))
            conn.close()
            return
        tls.on_handshake("server", conn.session_reused)
        try:
            if opaque is not None:
                await opaque(conn, caller)
            elif conn.tls_object.selected_alpn_protocol() == "h2":
                from .http2 import serve_http2  # here: a sidecar that never sees HTTP/2 never loads h2

                await serve_http2(conn, self.handler, self.timeouts, caller, b"")
            else:
                await serve_connection(conn, self.handler, self.timeouts, caller, detect=False)
        finally:
            conn.close()

    def _failed(self, peer: str, reason: str, why: str) -> None:
        self.tls.on_failure("server", reason)
        since = self._failures.due(peer, trio.current_time())
        if since is not None:
            more = f" ({since} more since the last report)" if since else ""
            log.warning("mTLS connection from %s refused (%s): %s%s", peer, reason, why, more)

    def _refuse_plaintext(self, io: Connection) -> None:
        """Strict mode: close (with a reset: nothing of it was read); logged once per burst."""
        self.on_plaintext_refused()
        io.reset()
        since = self._refusals.due(io.peer, trio.current_time())
        if since is not None:
            log.warning(
                "plaintext connection from %s refused: service %s is in strict mTLS mode%s",
                io.peer,
                self.service,
                f" ({since} more refused since the last report)" if since else "",
            )
