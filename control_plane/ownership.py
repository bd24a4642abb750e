"""Who may register what: an instance id and a node belong to the session that registered them.

Pure bookkeeping, like registry.py. A session's :class:`Owner` is what the session proved
(its identity) and where it came from (its peer's host); :func:`session_owner` is the one
place that decides both, so a stronger proof of identity plugs in there.

The rules (:meth:`Claims.refusal`):

* an instance id or a node held by a live session is refused to every other session, even
  one of the same identity: the live one is untouched (a sidecar whose old channel is a
  ghost, half-open after a network blip, is let in once the keepalive closed it, within
  three ping intervals);
* an instance id still registered after its session ended (its lease has not run out yet)
  is taken again only by the same identity: the same sidecar restarted. Any other identity
  waits until the lease runs out.

``bye`` and ``health`` name no instance: they act on the session's own, so once a claim is
refused nobody can act for another instance.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from meshlet.addresses import parse_address


@dataclass(frozen=True, slots=True)
class Owner:
    """Who registered an instance: the identity the session proved and its peer's host."""

    identity: str
    host: str


def session_owner(identity: str, peer_host: str) -> Owner:
    """The owner a session registers as. ``identity`` is what the session proved: the service
    its join token or client certificate admitted it for (control_plane/joins.py checks the
    hello's service against it before anything is registered); ``peer_host`` the address its connection came from (meshlet.io's
    ``Connection.peer``)."""
    return Owner(identity, normal_host(peer_host))


def normal_host(host: str) -> str:
    """An IP address in one spelling (an IPv4-mapped IPv6 address as IPv4, IPv6 compressed);
    anything else (a name) as given."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


ADMIN_REFUSED = "not the session's address"


def admin_target(admin: str, owner: Owner | None) -> str | None:
    """Where the control plane may fetch a registration's ``admin`` listener (None: nowhere).
    Only on the host its session came from, on a port 1-65535: ``admin`` itself when its host
    is that address; when its host is a name (a sidecar advertised as ``item-1``), that port
    on the session's address, for a name is never resolved (it could name any host). A
    registration cannot point the control plane at another host."""
    if owner is None:
        return None
    try:
        host, port = parse_address(admin)
    except ValueError:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"[{owner.host}]:{port}" if ":" in owner.host else f"{owner.host}:{port}"
    return admin if normal_host(str(address)) == owner.host else None


def admin_refusal(admin: str, owner: Owner | None) -> str | None:
    """Why the control plane does not fetch ``admin`` (None: it does, at :func:`admin_target`)."""
    return ADMIN_REFUSED if admin_target(admin, owner) is None else None


def claim_refusal(claim: Owner, holder: Owner | None, *, live: bool) -> str | None:
    """Why ``claim`` may not take what ``holder`` holds (None: it may). ``live``: the holder's
    session is open."""
    if live:
        return "held by a live session"
    if holder is not None and holder.identity != claim.identity:
        return "registered by another identity until its lease runs out"
    return None


BURST_QUIET = 60.0  # seconds without a refusal that end a burst (the next one is logged again)


class Burst:
    """Log the first of a burst of refusals, count them all: an attacker retrying in a loop
    must not fill the log."""

    def __init__(self) -> None:
        self.count = 0
        self._last = -math.inf

    def starts(self, now: float) -> bool:
        """Count one; True if it is the first of a burst (log it)."""
        self.count += 1
        first = now - self._last > BURST_QUIET
        self._last = now
        return first


class Claims:
    """The instance ids and nodes of the live sessions, and the claims refused."""

    def __init__(self) -> None:
        self._instances: dict[str, object] = {}  # instance id → the live session holding it
        self._nodes: dict[str, object] = {}  # node → the live session holding it
        self.refused = Burst()  # hellos refused: instance-in-use

    def refusal(self, claim: Owner, instance_id: str, node: str, registered: Owner | None) -> str | None:
        """Why a hello of ``claim`` may not register ``instance_id`` on ``node`` (None: it may).
        ``registered``: the owner of that instance id in the registry, if it is there."""
        why = claim_refusal(claim, registered, live=instance_id in self._instances)
        if why is not None:
            return f"instance {instance_id!r}: {why}"
        if node in self._nodes:
            return f"node {node!r}: held by a live session"
        return None

    def hold(self, session: object, instance_id: str, node: str) -> None:
        self._instances[instance_id] = session
        self._nodes[node] = session

    def release(self, session: object, instance_id: str, node: str) -> None:
        """``session`` ended: what it held is free (what another holds is left alone)."""
        if self._instances.get(instance_id) is session:
            del self._instances[instance_id]
        if self._nodes.get(node) is session:
            del self._nodes[node]


__all__ = [
    "ADMIN_REFUSED",
    "Burst",
    "Claims",
    "Owner",
    "admin_refusal",
    "admin_target",
    "claim_refusal",
    "session_owner",
]
