"""mTLS on the data path: the contexts a sidecar serves and dials with, the identity a peer's
verified certificate proves, and the mTLS mode of each service.

Contexts come from the :class:`~sidecar.core.credentials.CredentialHolder` (a certificate the
control plane issued, or ``--tls-cert``/``--tls-key``/``--trust-bundle``) and are rebuilt only
when its generation moves: a connection already open keeps the context, and so the
certificate, it was made with, so a renewal drops nothing.

Both sides: TLS 1.3 only, a certificate required of the peer and verified against the trust
bundle. Not against a host name (``check_hostname`` is off: a sidecar is dialled by address):
instead the peer's one URI SAN must be the SPIFFE ID of the service expected
(meshlet/identity.py), which :func:`peer_service` reads from the verified certificate.

A client keeps the TLS session of each peer address it dialled and offers it on the next
connection (TLS 1.3 tickets): a resumed handshake costs a fraction of a full one. Sessions
belong to a context; they are all dropped when the contexts are rebuilt.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping

from meshlet.identity import IdentityError, parse_spiffe_id
from meshlet.io import Connection, TLSConnection, start_tls

from ..core.credentials import CredentialHolder, Credentials

log = logging.getLogger("meshlet.tls")

MODES = ("off", "permissive", "strict")
DEFAULT_MODE = "permissive"
SERVER_ALPN = ["h2", "http/1.1"]  # what the inbound listener offers, in its order of preference
MAX_SESSIONS = 4096  # peers whose session is kept for resumption; past it the oldest half goes
# Where the key is written for the moment load_cert_chain reads it: memory, where there is one.
_KEY_DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class PeerIdentityError(Exception):
    """The peer's verified certificate does not name one service of our trust domain."""


def peer_service(conn: TLSConnection, trust_domain: str) -> str:
    """The service a TLS peer proved: its certificate was verified during the handshake
    (``CERT_REQUIRED``); its one URI SAN must be ``spiffe://<trust_domain>/service/<name>``."""
    certificate = conn.peer_certificate()
    names = certificate.get("subjectAltName", ())
    uris = [value for kind, value in names if kind == "URI"] if isinstance(names, tuple) else []
    if len(uris) != 1:
        raise PeerIdentityError(f"the peer's certificate has {len(uris)} URI SANs, not one SPIFFE ID")
    try:
        return parse_spiffe_id(uris[0], trust_domain)
    except IdentityError as error:
        raise PeerIdentityError(str(error)) from None


def check_peer_is(conn: TLSConnection, service: str, trust_domain: str) -> None:
    """The peer proved it is a sidecar of ``service``; else PeerIdentityError, and ``conn``
    is closed (the client side of every mesh hop: HTTP/1.1, HTTP/2 and TCP)."""
    try:
        proved = peer_service(conn, trust_domain)
        if proved != service:
            raise PeerIdentityError(f"its certificate names {proved!r}")
    except PeerIdentityError:
        conn.close()
        raise


def build_context(credentials: Credentials, *, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3 context that presents ``credentials`` and requires a certificate from the
    peer, verified against ``credentials.bundle`` (no host name check: see the module's doc)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=credentials.bundle.decode("ascii"))
    _load_key_pair(context, credentials)
    if server_side:
        context.set_alpn_protocols(SERVER_ALPN)  # h2: served as HTTP/2 (sidecar/net/inbound.py)
    return context


def _load_key_pair(context: ssl.SSLContext, credentials: Credentials) -> None:
    """``load_cert_chain`` reads files only, so the key goes to a file for the moment it takes:
    in a directory only we may enter (0700), created 0600 with nothing in it before, on a
    memory file system where there is one, and unlinked as soon as it has been read."""
    with tempfile.TemporaryDirectory(prefix="meshlet-tls-", dir=_KEY_DIRECTORY) as directory:
        key_path = os.path.join(directory, "key.pem")
        cert_path = os.path.join(directory, "cert.pem")
        try:
            for path, data in ((key_path, credentials.key), (cert_path, credentials.cert_chain)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
            context.load_cert_chain(cert_path, key_path)
        finally:
            for path in (key_path, cert_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


class MeshTLS:
    """The sidecar's TLS: its contexts (from ``holder``), the sessions kept per peer, the mTLS
    mode per service (MeshConfig ``mtls.mode``, a Service's ``mtls.mode``) and the counters."""

    def __init__(
        self,
        holder: CredentialHolder,
        *,
        on_handshake: Callable[[str, bool], None] = lambda side, resumed: None,
        on_failure: Callable[[str, str], None] = lambda side, reason: None,
    ) -> None:
        self.holder = holder
        self.on_handshake = on_handshake  # (side, resumed), per handshake completed
        self.on_failure = on_failure  # (side, reason), per handshake or identity check failed
        # Moves when what a new connection would be (TLS or plaintext) may have changed:
        # credentials came or went, or the modes changed. A pooled connection made in another
        # epoch is not reused (a plaintext one from before the first certificate, say).
        self._epoch = 0
        self._generation = -1
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        # The client context for HTTP/2 to another sidecar: the same, offering ALPN h2 (the
        # HTTP/1.1 one offers none, so nothing changes for a peer that predates HTTP/2).
        self.h2_client: ssl.SSLContext | None = None
        self.trust_domain = ""
        self.service = ""  # the service our certificate names
        # peer address → (the context it was made with, the session): only that context resumes it
        self.sessions: dict[tuple[str, int], tuple[ssl.SSLContext, ssl.SSLSession]] = {}
        self.mesh_mode = DEFAULT_MODE
        self.service_modes: Mapping[str, str] = {}
        self._warned_plaintext = False

    # credentials ---------------------------------------------------------------------
    def refresh(self) -> bool:
        """Rebuild the contexts if the credentials changed; whether there are any."""
        holder = self.holder
        if holder.generation != self._generation:
            self._generation = holder.generation
            self.sessions.clear()  # a session resumes only with the context it came from
            credentials = holder.current
            had = self.client is not None
            self.server = self.client = self.h2_client = None
            if credentials is not None:
                try:
                    self.server = build_context(credentials, server_side=True)
                    self.client = build_context(credentials, server_side=False)
                    self.h2_client = build_context(credentials, server_side=False)
                    self.h2_client.set_alpn_protocols(["h2"])
                except (ssl.SSLError, ValueError, OSError) as exc:
                    log.error("the TLS credentials for %s cannot be used: %s", credentials.service, exc)
                    self.server = self.client = self.h2_client = None
                else:
                    self.trust_domain = credentials.trust_domain
                    self.service = credentials.service
                    log.info("TLS credentials in use: %r", credentials)
            if had != (self.client is not None):
                self._epoch += 1
        return self.client is not None

    def epoch(self) -> int:
        if self.holder.generation != self._generation:
            self.refresh()
        return self._epoch

    # modes ---------------------------------------------------------------------------
    def configure(self, mesh_mode: str, service_modes: Mapping[str, str]) -> None:
        """The modes of a new snapshot; each one that turns mTLS off is logged loudly."""
        if mesh_mode == "off" and self.mesh_mode != "off":
            log.warning("MeshConfig mtls.mode is off: mesh traffic is plaintext and every caller is unauthenticated")
        for service, mode in service_modes.items():
            if mode == "off" and self.service_modes.get(service) != "off":
                log.warning("Service %s has mtls.mode off: calls to it are plaintext", service)
        if mesh_mode != self.mesh_mode or service_modes != self.service_modes:
            self._epoch += 1
        self.mesh_mode = mesh_mode
        self.service_modes = service_modes

    def mode(self, service: str) -> str:
        return self.service_modes.get(service, self.mesh_mode)

    # the client side -------------------------------------------------------------------
    def client_context(self, service: str) -> ssl.SSLContext | None:
        """The context to dial a sidecar of ``service`` with; None: plaintext (its mode is
        off, or we hold no credentials yet, said once: a peer in strict mode refuses us)."""
        if self.mode(service) == "off":
            return None
        if not self.refresh():
            if not self._warned_plaintext:
                self._warned_plaintext = True
                log.warning(
                    "no TLS credentials yet: calls to other sidecars go in plaintext, as 'unauthenticated' "
                    "(refused by a service in strict mode) until a certificate is installed"
                )
            return None
        return self.client

    def h2_client_context(self, service: str) -> ssl.SSLContext | None:
        """As :meth:`client_context`, for HTTP/2: the context offers ALPN ``h2``."""
        return None if self.client_context(service) is None else self.h2_client

    async def handshake_client(
        self, io: Connection, address: tuple[str, int], context: ssl.SSLContext
    ) -> TLSConnection:
        """``io`` under TLS, handshake done, offering the session kept for ``address``. The
        caller bounds the time and checks the identity (:func:`peer_service`)."""
        kept = self.sessions.get(address)
        session = kept[1] if kept is not None and kept[0] is context else None
        tls = start_tls(io, context, server_side=False, session=session)
        try:
            await tls.handshake()
        except BaseException:
            tls.close()
            self.sessions.pop(address, None)
            raise
        self.on_handshake("client", tls.session_reused)
        return tls

    def keep_session(self, address: tuple[str, int], tls: TLSConnection) -> None:
        """Keep the session of a connection that carried an exchange: its tickets have
        arrived by then (TLS 1.3 sends them after the handshake)."""
        session = tls.session
        if session is None or not session.has_ticket:
            return
        sessions = self.sessions
        if len(sessions) >= MAX_SESSIONS and address not in sessions:
            for old in list(sessions)[: MAX_SESSIONS // 2]:
                del sessions[old]
        sessions[address] = (tls.context, session)
