"""The service registry: which instances exist, which are ready, and when their leases run out.

Pure bookkeeping, like ``sidecar/core``: no trio, no sockets, no clock. Time is always a parameter
(``now``, seconds on one monotonic clock, e.g. ``trio.current_time()``), so tests drive leases with
exact numbers, and the push server (the trio shell) owns the clock, the sweep loop and the sockets.

Every mutator returns the services whose *ready endpoint set* changed, so the push pipeline debounces
and pushes exactly those. "Changed" means that what :func:`endpoints_version` hashes changed (the
instance id, address and labels of each ready instance), so a returned set and ``version()`` never
disagree: a sidecar re-registering with a new admin address changes nothing anybody is pushed.

Leases (docs/architecture.md, "registration lives as long as the push channel plus a TTL"): the sidecar renews
over its push channel, and the lease runs out at last renewal + ``ttl``. A lease granted or renewed at
``t`` covers ``[t, t + ttl)``: at exactly ``t + ttl`` it has expired. A dropped channel neither
shortens nor lengthens the lease: a sidecar whose channel blips and comes back within the TTL is never
evicted (no endpoint churn for everybody else), and a crashed one goes at most ``ttl`` after its last
renewal. A draining sidecar deregisters and is removed at once.

A sidecar whose lease ran out while its push channel stayed up (the process was paused: a long GC, CPU
throttling, a stopped VM) is alive again the moment it speaks: its renewal, readiness report or any
other message on that live channel puts its registration back at once (:meth:`Registry.restore`,
counted in ``restored_total``). The channel knows the registration from its hello.

Self-preservation (Eureka's). When the control plane stops hearing from many sidecars at once, the
likely cause is on our side (a partition between the control plane and part of the mesh, a stalled
control plane), not many sidecars crashing together. Evicting them would tell the sidecars that can
still reach them that they are gone; keeping them for a while costs a few failed connects that retries
and outlier detection absorb. :meth:`Registry.expire` pauses evictions when both hold:

1. More than ``self_preservation_threshold`` (15 %) of the registered instances expired within the
   moving window of the last ``ttl`` seconds. The expired ones are those whose lease ran out in the
   window, whether they are still held or already evicted (and not registered again since); the
   population is the registry plus those evicted in the window. Counting the window rather than one
   call keeps the rule independent of how often the shell sweeps: the last renewals of partitioned
   sidecars are spread over the renew interval, so a sweep every second would otherwise see them a
   few at a time and evict them all.
2. At least ``self_preservation_min_instances`` (3) instances expired in that window. In a small
   registry a share means nothing: one crash in a registry of 1, 3 or 6 is already over 15 %, which is
   why small Eureka clusters enter self-preservation for a single dead instance and people turn it off.
   One or two leases lapsing together is an ordinary failure (a crash, a host with two sidecars going
   down) and is evicted whatever the registry's size. The floor only matters below 20 instances;
   from 20 up, 15 % is already 3 or more.

Instances that were never ready count in neither number: nobody was sent to them, so losing them
says nothing about a partition (and evicting them changes no endpoint set). They are evicted when due.

While paused, the instances whose lease ran out within the window are held, :attr:`Registry.
self_preservation` is true and :attr:`Registry.self_preservation_reason` says why (for status and
metrics). The hold is bounded: an instance whose lease ran out a whole window ago no longer counts
and is evicted even while the pause lasts, so a sidecar that is gone for good (``kill -9``) leaves the
registry at most ``2 × ttl`` (plus a sweep) after its last renewal, and a pause nothing renews ends by
itself one window after its last expiry. The first call that finds the rule no longer holds (leases
renewed, instances deregistered or registered again, new ones joined, the window moved on) turns it
off and evicts whatever is due in that same call. Deregistrations are goodbyes, not expiries, and
never count. (Eureka keeps self-preservation on until the renewal rate recovers, which never happens
when the missing instances are dead: that is the outage this bound avoids.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from meshlet.addresses import parse_address
from meshlet.endpoints import check_protocol
from meshlet.names import check_instance_id, is_service_name

from .ownership import Owner

DEFAULT_TTL = 10.0  # a crashed sidecar's endpoints disappear within TTL + push time
DEFAULT_SELF_PRESERVATION_THRESHOLD = 0.15  # docs/architecture.md; Eureka's renewalPercentThreshold is 0.85
DEFAULT_SELF_PRESERVATION_MIN_INSTANCES = 3  # fewer lapsing together is an ordinary crash: evict it
VERSION_LENGTH = 12  # hex digits of sha256, as the sidecar's snapshot versions


class UnknownInstance(KeyError):
    """No instance with this id is registered: never was, deregistered, or expired.

    On a renew it means the lease is gone and the sidecar must register again (as an etcd keepalive
    answered without a TTL)."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(instance_id)
        self.instance_id = instance_id

    def __str__(self) -> str:
        return f"unknown instance {self.instance_id!r}"


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {type(value).__name__}")
    return value


def _check_host_port(name: str, value: object) -> None:
    try:
        parse_address(_check_text(name, value))
    except ValueError as exc:
        raise ValueError(f"{name} {exc}") from None


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered service instance: its sidecar's inbound listener, as the sidecar reported it.

    Validated on construction (``ValueError`` says which field and what is wrong), so a registry only
    ever holds valid instances. ``labels`` is copied into a read-only mapping."""

    service: str
    instance_id: str
    address: str  # HOST:PORT of the sidecar's inbound listener: what other sidecars connect to
    admin: str  # HOST:PORT of the sidecar's admin listener
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)  # zone, version
    node: str = ""  # the sidecar's node id (its hello)
    app_port: int = 0  # the app's port on the address's host (transparent mode dials it); 0: not told
    protocol: str = ""  # what the app speaks, as its sidecar declared (--app-protocol); "": not declared
    ready: bool = False  # fail-closed: not pushed until the sidecar's health probe says so
    # Who registered it (control_plane/ownership.py): not what the sidecar reported, what its session proved.
    owner: Owner | None = None

    def __post_init__(self) -> None:
        service = _check_text("service", self.service)
        if not service:
            raise ValueError("service is empty")
        if not is_service_name(service):
            raise ValueError(
                f"service {service!r} is not a DNS label (a-z, 0-9 and '-', 1-63 characters, "
                "starting and ending with a letter or digit)"
            )
        check_instance_id(self.instance_id)
        _check_host_port("address", self.address)
        _check_host_port("admin", self.admin)
        _check_text("node", self.node)
        if not isinstance(self.app_port, int) or isinstance(self.app_port, bool) or not 0 <= self.app_port <= 65535:
            raise ValueError(f"app_port {self.app_port!r}: a port (1-65535), or 0 for none")
        if self.protocol:  # a value this build does not know is refused, never passed on
            try:
                check_protocol(self.protocol)
            except ValueError as exc:
                raise ValueError(f"protocol {exc}") from None
        if not isinstance(self.ready, bool):
            raise ValueError(f"ready must be a bool, not {type(self.ready).__name__}")
        if self.owner is not None and not isinstance(self.owner, Owner):
            raise ValueError(f"owner must be an Owner, not {type(self.owner).__name__}")
        if not isinstance(self.labels, Mapping):
            raise ValueError(f"labels must be a mapping of strings, not {type(self.labels).__name__}")
        for key, value in self.labels.items():
            if not isinstance(key, str) or not key or not isinstance(value, str):
                raise ValueError(f"label {key!r}: {value!r}: keys are non-empty strings and values are strings")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


def endpoints_version(endpoints: Iterable[Instance]) -> str:
    """The content hash of a ready endpoint set: equal content, equal version, across restarts too.

    Covers what other sidecars are pushed (instance id, address, labels), in instance-id order, as
    canonical JSON; not the admin address, node or readiness (only ready instances are in the set)."""
    body = [
        [
            e.instance_id,
            e.address,
            dict(sorted(e.labels.items())),
            *([e.app_port] if e.app_port else []),
            *([e.protocol] if e.protocol else []),
        ]
        for e in sorted(endpoints, key=lambda e: e.instance_id)
    ]
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:VERSION_LENGTH]


def _pushed(instance: Instance | None) -> tuple[str, tuple[tuple[str, str], ...], int, str] | None:
    """What the rest of the mesh sees of an instance: nothing unless it is ready."""
    if instance is None or not instance.ready:
        return None
    return instance.address, tuple(sorted(instance.labels.items())), instance.app_port, instance.protocol


@dataclass(slots=True)
class _Lease:
    expires_at: float
    connected: bool = True
    ever_ready: bool = False  # only instances that were ready count towards self-preservation


@dataclass(frozen=True, slots=True)
class ExpiryResult:
    removed: tuple[str, ...] = ()  # instance ids evicted by this call, sorted
    changed: frozenset[str] = frozenset()  # services whose ready endpoint set changed
    held: tuple[str, ...] = ()  # due within the window, kept by self-preservation, sorted
    self_preservation: bool = False


@dataclass(frozen=True, slots=True)
class RegistryStats:
    instances: int
    ready: int
    services: int
    connected: int
    self_preservation: bool
    self_preservation_reason: str | None
    expired_total: int  # evicted by lease expiry since start (not deregistrations)
    restored_total: int = 0  # registrations put back by a live channel after their lease ran out


class Registrar(Protocol):
    """What the push server's sessions change: a :class:`Registry` itself, or, with replicas on
    etcd, this replica's sessions written through to the shared registry
    (control_plane/replicas/registrar.py). The mutators return the services whose ready endpoint
    set changed in the registry the server pushes from (a write-through registrar returns none:
    the change comes back from etcd's watch)."""

    @property
    def self_preservation_reason(self) -> str | None: ...

    def register(self, instance: Instance, now: float) -> set[str]: ...

    def restore(self, instance: Instance, now: float) -> set[str]: ...

    def renew(self, instance_id: str, now: float) -> None: ...

    def set_ready(self, instance_id: str, ready: bool, now: float) -> set[str]: ...

    def disconnected(self, instance_id: str, now: float) -> set[str]: ...

    def deregister(self, instance_id: str) -> set[str]: ...

    def expire(self, now: float) -> ExpiryResult: ...


class Registry:
    """Instances by id, their leases, and the per-service ready endpoint sets (see the module doc)."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        self_preservation_threshold: float = DEFAULT_SELF_PRESERVATION_THRESHOLD,
        self_preservation_min_instances: int = DEFAULT_SELF_PRESERVATION_MIN_INSTANCES,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be a finite number of seconds > 0, not {ttl!r}")
        if not 0 <= self_preservation_threshold < 1:
            raise ValueError(f"self_preservation_threshold must be in [0, 1), not {self_preservation_threshold!r}")
        if isinstance(self_preservation_min_instances, bool) or not isinstance(self_preservation_min_instances, int):
            raise ValueError("self_preservation_min_instances must be an int")
        if self_preservation_min_instances < 1:
            raise ValueError(f"self_preservation_min_instances must be >= 1, not {self_preservation_min_instances}")
        self.ttl = float(ttl)
        self.self_preservation_threshold = self_preservation_threshold
        self.self_preservation_min_instances = self_preservation_min_instances
        self._instances: dict[str, Instance] = {}
        self._leases: dict[str, _Lease] = {}
        self._by_service: dict[str, set[str]] = {}  # any readiness
        self._ready_cache: dict[str, tuple[tuple[Instance, ...], str]] = {}  # service → (endpoints, version)
        # Evicted by expiry within the window (instance id → when its lease ran out), ever-ready only;
        # an id registered again leaves it.
        self._lapsed: dict[str, float] = {}
        self._expired_total = 0
        self._restored_total = 0
        self._self_preservation = False
        self._self_preservation_reason: str | None = None

    # mutators --------------------------------------------------------------------------------

    def register(self, instance: Instance, now: float) -> set[str]:
        """Add an instance, or replace the one with its id (a sidecar reconnecting, maybe under
        another service: ids are unique across services). Grants a fresh lease."""
        if not isinstance(instance, Instance):
            raise TypeError(f"register takes an Instance, not {type(instance).__name__}")
        old = self._instances.get(instance.instance_id)
        self._replace(old, instance)
        self._leases[instance.instance_id] = _Lease(now + self.ttl, ever_ready=instance.ready)
        self._lapsed.pop(instance.instance_id, None)
        return self._changed(old, instance)

    def restore(self, instance: Instance, now: float) -> set[str]:
        """A sign of life on a live channel whose lease ran out (the sidecar was paused longer than
        the TTL): register ``instance`` again at once, counted in ``restored_total``. An instance
        still registered is only renewed (and replaced by ``instance``)."""
        if instance.instance_id not in self._instances:
            self._restored_total += 1
        return self.register(instance, now)

    def renew(self, instance_id: str, now: float) -> None:
        """A heartbeat: the lease now runs out at ``now + ttl``."""
        lease = self._leases.get(instance_id)
        if lease is None:
            raise UnknownInstance(instance_id)
        lease.expires_at = now + self.ttl

    def set_ready(self, instance_id: str, ready: bool, now: float) -> set[str]:
        """The sidecar's health probe result. A report is a sign of life, so it renews the lease too."""
        old = self._instances.get(instance_id)
        if old is None:
            raise UnknownInstance(instance_id)
        new = dataclasses.replace(old, ready=ready)
        self._replace(old, new)
        self.renew(instance_id, now)
        if ready:
            self._leases[instance_id].ever_ready = True
        return self._changed(old, new)

    def disconnected(self, instance_id: str, now: float) -> set[str]:
        """The push channel dropped. The lease is left as it is (last renewal + ttl): the instance
        stays until then, or until it registers again. Unknown ids are ignored, since a channel
        normally closes after its sidecar deregistered. Nothing changes for other sidecars."""
        lease = self._leases.get(instance_id)
        if lease is not None:
            lease.connected = False
        return set()

    def deregister(self, instance_id: str) -> set[str]:
        """A draining sidecar's goodbye: removed at once. Idempotent (a repeated goodbye is fine)."""
        old = self._instances.get(instance_id)
        if old is None:
            return set()
        self._replace(old, None)
        del self._leases[instance_id]
        return self._changed(old, None)

    def expire(self, now: float) -> ExpiryResult:
        """Evict the instances whose lease ran out at or before ``now``, unless self-preservation
        holds them (module doc)."""
        window_start = now - self.ttl  # an expiry at or before this is out of the window
        if self._lapsed:
            self._lapsed = {i: at for i, at in self._lapsed.items() if at > window_start}
        leases = self._leases
        due = sorted(i for i, lease in leases.items() if lease.expires_at <= now)
        if not due:
            self._preserve(None)
            return ExpiryResult()
        in_window = [i for i in due if leases[i].ever_ready and leases[i].expires_at > window_start]
        expiring = len(in_window) + len(self._lapsed)
        population = sum(1 for lease in leases.values() if lease.ever_ready) + len(self._lapsed)
        share = expiring / population if population else 0.0
        held: list[str] = []
        if in_window and expiring >= self.self_preservation_min_instances and share > self.self_preservation_threshold:
            self._preserve(
                f"{expiring} of {population} instances ({share:.0%}) expired within one TTL window "
                f"({self.ttl:g} s), more than {self.self_preservation_threshold:.0%}: evictions paused"
            )
            held = in_window
            kept = set(held)
            due = [i for i in due if i not in kept]  # never ready, or expired a whole window ago
        else:
            self._preserve(None)
        changed: set[str] = set()
        for instance_id in due:
            lease = leases[instance_id]
            changed |= self.deregister(instance_id)
            if lease.ever_ready and lease.expires_at > window_start:
                self._lapsed[instance_id] = lease.expires_at
        self._expired_total += len(due)
        return ExpiryResult(
            removed=tuple(due), changed=frozenset(changed), held=tuple(held), self_preservation=bool(held)
        )

    # readers ---------------------------------------------------------------------------------

    def endpoints(self, service: str) -> tuple[Instance, ...]:
        """The ready instances of a service, by instance id: what the push channel sends."""
        return self._ready(service)[0]

    def version(self, service: str) -> str:
        """The content hash of ``endpoints(service)``: the resource version the push channel sends.
        A service with no ready instance (or none at all) has the version of the empty set."""
        return self._ready(service)[1]

    def all_endpoints(self, service: str) -> tuple[Instance, ...]:
        """Every instance of a service, ready or not, by instance id."""
        return tuple(self._instances[i] for i in sorted(self._by_service.get(service, ())))

    def services(self) -> list[str]:
        """Services with at least one registered instance, ready or not, sorted."""
        return sorted(self._by_service)

    def instances(self) -> list[Instance]:
        """Every instance, by service then instance id."""
        return sorted(self._instances.values(), key=lambda i: (i.service, i.instance_id))

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def owner(self, instance_id: str) -> Owner | None:
        """Who registered ``instance_id`` (None: nobody holds it, or it was registered without one)."""
        instance = self._instances.get(instance_id)
        return None if instance is None else instance.owner

    def lease_expires_at(self, instance_id: str) -> float:
        lease = self._leases.get(instance_id)
        if lease is None:
            raise UnknownInstance(instance_id)
        return lease.expires_at

    def is_connected(self, instance_id: str) -> bool:
        """False once its push channel dropped, until it registers again."""
        lease = self._leases.get(instance_id)
        if lease is None:
            raise UnknownInstance(instance_id)
        return lease.connected

    @property
    def self_preservation(self) -> bool:
        return self._self_preservation

    @property
    def self_preservation_reason(self) -> str | None:
        return self._self_preservation_reason

    def stats(self) -> RegistryStats:
        return RegistryStats(
            instances=len(self._instances),
            ready=sum(1 for i in self._instances.values() if i.ready),
            services=len(self._by_service),
            connected=sum(1 for lease in self._leases.values() if lease.connected),
            self_preservation=self._self_preservation,
            self_preservation_reason=self._self_preservation_reason,
            expired_total=self._expired_total,
            restored_total=self._restored_total,
        )

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._instances

    def __repr__(self) -> str:
        s = self.stats()
        mode = "ON" if s.self_preservation else "off"
        return (
            f"<Registry [instances: {s.instances}, ready: {s.ready}, services: {s.services}"
            f" | self-preservation: {mode}]>"
        )

    # internals -------------------------------------------------------------------------------

    def _replace(self, old: Instance | None, new: Instance | None) -> None:
        """Swap one instance for another (either may be None) in every index."""
        if old is not None:
            ids = self._by_service[old.service]
            ids.discard(old.instance_id)
            if not ids:
                del self._by_service[old.service]
            del self._instances[old.instance_id]
            # Dropped even when nothing pushed changes: the cached Instance objects would be stale.
            self._ready_cache.pop(old.service, None)
        if new is not None:
            self._by_service.setdefault(new.service, set()).add(new.instance_id)
            self._instances[new.instance_id] = new
            self._ready_cache.pop(new.service, None)

    @staticmethod
    def _changed(old: Instance | None, new: Instance | None) -> set[str]:
        before, after = _pushed(old), _pushed(new)
        if old is not None and new is not None and old.service == new.service:
            return {new.service} if before != after else set()
        changed = set()
        if old is not None and before is not None:
            changed.add(old.service)
        if new is not None and after is not None:
            changed.add(new.service)
        return changed

    def _ready(self, service: str) -> tuple[tuple[Instance, ...], str]:
        cached = self._ready_cache.get(service)
        if cached is None:
            ready = tuple(e for e in self.all_endpoints(service) if e.ready)
            cached = (ready, endpoints_version(ready))
            if service in self._by_service:  # never cache names that are only asked about
                self._ready_cache[service] = cached
        return cached

    def _preserve(self, reason: str | None) -> None:
        self._self_preservation = reason is not None
        self._self_preservation_reason = reason
