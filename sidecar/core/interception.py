"""Transparent interception, the pure part (docs/architecture.md): the iptables rules that send an
app's traffic through its sidecar, and which service a redirected connection was for.

How a connection travels in transparent mode (what Istio's init container sets up):

* outbound: the app connects to ``10.0.0.7:8080``; the nat OUTPUT chain REDIRECTs it to the
  sidecar's outbound listener; the sidecar asks the kernel where it was going
  (``SO_ORIGINAL_DST``) and looks ``10.0.0.7:8080`` up in :class:`AddressMap`;
* the sidecar's own connections leave untouched: its uid (or gid, or socket mark) is
  matched first. Without that exemption a sidecar's call to another instance comes back
  to itself, for ever;
* inbound: a connection to one of the app's ports from outside the namespace is
  REDIRECTed (nat PREROUTING) to the inbound listener, which forwards to the app as for
  any caller. Sidecars reach each other's inbound listener directly, which is never
  redirected.

The rules live in chains of their own (``MESHLET_*``), so ``--remove`` takes away exactly
what was installed and nothing an operator added.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OUTPUT_CHAIN = "MESHLET_OUTPUT"
REDIRECT_CHAIN = "MESHLET_REDIRECT"
INBOUND_CHAIN = "MESHLET_INBOUND"
IN_REDIRECT_CHAIN = "MESHLET_IN_REDIRECT"
CHAINS = (OUTPUT_CHAIN, REDIRECT_CHAIN, INBOUND_CHAIN, IN_REDIRECT_CHAIN)
# The built-in chain each of ours hangs from (the jump --remove deletes).
JUMPS = ((INBOUND_CHAIN, "PREROUTING"), (OUTPUT_CHAIN, "OUTPUT"))

PROXY_UID = 1337  # the image's user (docker/Dockerfile); Istio's choice too
ALL_PORTS = "*"

# Outbound policies for a destination nobody registered (MeshConfig outbound_traffic_policy).
ALLOW_ANY = "ALLOW_ANY"  # passed through as plain TCP, to where the app was going
REGISTRY_ONLY = "REGISTRY_ONLY"  # refused
OUTBOUND_POLICIES = (ALLOW_ANY, REGISTRY_ONLY)


class InterceptionError(ValueError):
    """A setting that cannot make a working rule set; the message says which and why."""


@dataclass(frozen=True)
class Interception:
    """What ``meshlet init-iptables`` installs, from its flags."""

    outbound_port: int = 15001  # the sidecar's outbound listener
    inbound_port: int = 15006  # the sidecar's inbound listener
    # Ports of the app redirected to the inbound listener: a list, or every port ("*")
    # but those excluded and the sidecar's own. Empty: inbound traffic is left alone.
    inbound_ports: tuple[int, ...] | str = ALL_PORTS
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    proxy_uid: int | None = PROXY_UID
    proxy_gid: int | None = None
    proxy_mark: int | None = None
    # Ports of the sidecar itself that must stay reachable from outside (admin, push...).
    sidecar_ports: tuple[int, ...] = (15090,)

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port"):
            _check_port(name, getattr(self, name))
        if self.outbound_port == self.inbound_port:
            raise InterceptionError(f"outbound and inbound port are both {self.outbound_port}")
        if self.inbound_ports != ALL_PORTS:
            if isinstance(self.inbound_ports, str):
                raise InterceptionError(f"inbound ports {self.inbound_ports!r}: a list of ports or '*'")
            for port in self.inbound_ports:
                _check_port("inbound port", port)
                if port in (self.inbound_port, self.outbound_port):
                    raise InterceptionError(f"inbound port {port} is the sidecar's own listener: it would loop")
        for name in ("exclude_inbound_ports", "exclude_outbound_ports", "sidecar_ports"):
            for port in getattr(self, name):
                _check_port(name.replace("_", " ").rstrip("s"), port)
        for cidr in self.exclude_outbound_cidrs:
            try:
                network = ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise InterceptionError(f"excluded outbound CIDR {cidr!r}: {exc}") from None
            if network.version != 4:
                raise InterceptionError(f"excluded outbound CIDR {cidr!r}: only IPv4 is intercepted")
        if self.proxy_uid is None and self.proxy_gid is None and self.proxy_mark is None:
            raise InterceptionError(
                "nothing tells the sidecar's own traffic apart: give --proxy-uid, --proxy-gid or --proxy-mark "
                "(without one, every connection the sidecar makes is sent back to it)"
            )
        for name, value, top in (("proxy uid", self.proxy_uid, 2**32 - 1), ("proxy gid", self.proxy_gid, 2**32 - 1)):
            if value is not None and not 0 <= value <= top:
                raise InterceptionError(f"{name} {value}: not a uid/gid")
        if self.proxy_mark is not None and not 1 <= self.proxy_mark <= 2**32 - 1:
            raise InterceptionError(f"proxy mark {self.proxy_mark}: 1 to 2^32-1")

    def restore_input(self) -> str:
        """The rules as ``iptables-restore --noflush`` input: one transaction, so either all
        of them are installed or none is."""
        lines = ["*nat"]
        lines += [f":{chain} - [0:0]" for chain in CHAINS]
        lines += [f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {self.outbound_port}"]
        lines += [f"-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {self.inbound_port}"]
        lines += self._inbound()
        lines += self._outbound()
        lines += [f"-A {builtin} -p tcp -j {chain}" for chain, builtin in JUMPS]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def _inbound(self) -> list[str]:
        if self.inbound_ports == ALL_PORTS:
            kept = (self.inbound_port, self.outbound_port, *self.sidecar_ports, *self.exclude_inbound_ports)
            lines = [f"-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN" for port in _unique(kept)]
            return lines + [f"-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}"]
        excluded = set(self.exclude_inbound_ports)
        ports = [p for p in _unique(self.inbound_ports) if p not in excluded]
        return [f"-A {INBOUND_CHAIN} -p tcp --dport {port} -j {IN_REDIRECT_CHAIN}" for port in ports]

    def _outbound(self) -> list[str]:
        # The sidecar's own connections first: they must never come back to it.
        lines = []
        if self.proxy_uid is not None:
            lines.append(f"-A {OUTPUT_CHAIN} -m owner --uid-owner {self.proxy_uid} -j RETURN")
        if self.proxy_gid is not None:
            lines.append(f"-A {OUTPUT_CHAIN} -m owner --gid-owner {self.proxy_gid} -j RETURN")
        if self.proxy_mark is not None:
            lines.append(f"-A {OUTPUT_CHAIN} -m mark --mark {self.proxy_mark:#x} -j RETURN")
        # Loopback: the app calling its own sidecar (or anything local) on purpose.
        lines.append(f"-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN")
        lines += [f"-A {OUTPUT_CHAIN} -p tcp --dport {port} -j RETURN" for port in _unique(self.exclude_outbound_ports)]
        lines += [f"-A {OUTPUT_CHAIN} -d {cidr} -j RETURN" for cidr in _unique(self.exclude_outbound_cidrs)]
        lines.append(f"-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}")
        return lines


def removal(installed: str) -> list[list[str]]:
    """The ``iptables -t nat`` argument lists that take away what :meth:`Interception.restore_input`
    installed, given ``iptables-save -t nat`` output: the jumps into our chains (every copy),
    then the chains. Nothing else is touched; nothing installed: nothing to do."""
    commands: list[list[str]] = []
    present = set()
    for line in installed.splitlines():
        parts = line.split()
        if line.startswith(":") and line[1:].split(" ", 1)[0] in CHAINS:
            present.add(line[1:].split(" ", 1)[0])
        elif len(parts) >= 2 and parts[0] == "-A" and parts[1] in ("PREROUTING", "OUTPUT"):
            if "-j" in parts and parts[parts.index("-j") + 1] in CHAINS:
                commands.append(["-D", *parts[1:]])
    for chain in CHAINS:
        if chain in present:
            commands.append(["-F", chain])
    for chain in CHAINS:
        if chain in present:
            commands.append(["-X", chain])
    return commands


def parse_ports(text: str, what: str, *, allow_all: bool = False) -> tuple[int, ...] | str:
    """``"8080,9090"`` → (8080, 9090); ``"*"`` (where allowed) → ``"*"``; ``""`` → ()."""
    text = text.strip()
    if allow_all and text == ALL_PORTS:
        return ALL_PORTS
    ports = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            hint = " or '*' for every port" if allow_all else ""
            raise InterceptionError(f"{what} {item!r}: expected port numbers separated by commas{hint}")
        port = int(item)
        _check_port(what, port)
        ports.append(port)
    return tuple(ports)


def _check_port(what: str, port: Any) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InterceptionError(f"{what} {port!r}: a port is 1-65535")


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


# --- where a redirected connection was going ------------------------------------------------

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h (IP6T_SO_ORIGINAL_DST is 80 as well, at SOL_IPV6)


def parse_original_dst(raw: bytes) -> tuple[str, int]:
    """A ``struct sockaddr_in`` (16 bytes) or ``sockaddr_in6`` (28) from SO_ORIGINAL_DST →
    (ip, port). ValueError for anything else."""
    if len(raw) >= 8 and raw[0:2] in (b"\x02\x00", b"\x00\x02"):  # AF_INET, either byte order
        port = struct.unpack("!H", raw[2:4])[0]
        return str(ipaddress.IPv4Address(raw[4:8])), port
    if len(raw) >= 24 and raw[0:2] in (b"\x0a\x00", b"\x00\x0a"):  # AF_INET6
        port = struct.unpack("!H", raw[2:4])[0]
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raise ValueError(f"not a sockaddr: {raw[:4].hex()}…")


@dataclass(frozen=True)
class AddressMap:
    """IP:port → service, for connections whose original destination the sidecar learns.

    An instance with a sidecar is found at its app's port on its host (what the app was
    dialled at, with the sidecar in its namespace) and at its sidecar's inbound address;
    a service without a sidecar (a Service document's fixed endpoints) at its endpoints."""

    by_address: Mapping[tuple[str, int], str] = field(default_factory=dict)

    @classmethod
    def of(cls, services: Mapping[str, Any]) -> AddressMap:
        """From a snapshot's services (name → ServiceConfig with ``endpoints``). Where two
        services claim one address, the first by name keeps it (deterministic)."""
        out: dict[tuple[str, int], str] = {}
        for name in sorted(services):
            for endpoint in services[name].endpoints:
                out.setdefault((endpoint.host, endpoint.port), name)
                if endpoint.app_port:
                    out.setdefault((endpoint.host, endpoint.app_port), name)
        return cls(out)

    def service(self, ip: str, port: int) -> str | None:
        return self.by_address.get((ip, port))


# --- what becomes of a redirected connection -------------------------------------------------

# The outcomes, as counted (meshlet_transparent_connections_total's ``outcome`` label).
TO_SERVICE = "service"  # a service has the address: the outbound stack serves it
PASSTHROUGH = "passthrough"  # nobody has it and the policy allows it: bytes copied to it as they are
LOOP = "loop"  # one of this sidecar's own passthrough connections, sent back to it: refused
BLOCKED = "blocked"  # nobody has it and the policy is REGISTRY_ONLY: refused

# Why a refused connection was refused, for the log (once per address).
REFUSALS = {
    LOOP: "a passthrough connection of this sidecar came back to it: the iptables rules do not exempt its "
    "own traffic (run the sidecar as the uid given to init-iptables --proxy-uid)",
    BLOCKED: "refused: no service has this address and outbound_traffic_policy is REGISTRY_ONLY (allow it "
    "with a Service document if it speaks HTTP, else with init-iptables --exclude-outbound-ports or "
    "--exclude-outbound-cidrs)",
}


def unregistered(own_passthrough: bool, policy: str) -> str:
    """What becomes of a redirected connection to an address no service has: a loop is
    refused whatever the policy (passing it on would loop for ever), then the policy decides."""
    if own_passthrough:
        return LOOP
    if policy == REGISTRY_ONLY:
        return BLOCKED
    return PASSTHROUGH
