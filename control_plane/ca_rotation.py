"""Rotating the CA's root while every request goes on: the stateful shell around
:meth:`ca.Authority.stage` and :meth:`ca.Authority.advance`.

The order (docs/security.md, "Rotating the root"):

1. ``rotate``: a new root is made, written to the data directory and *staged*: it joins the
   trust bundle at once, pushed to every session, but the current root goes on signing;
2. after ``propagation`` seconds (the bundle has reached every live sidecar by then: a
   sidecar that does not read its channel is closed by the keepalive well before), the new
   root signs; the bundle, pushed again, now names it first, which tells each sidecar whose
   certificate the old root signed to renew soon, each at a random moment of a short window;
3. the old root stays in the bundle ``overlap`` seconds more (at least a certificate's
   lifetime: every certificate it signed has expired by then), then leaves it. Meanwhile the
   control plane sends, with its own certificate, the new root cross-signed by the old one, so
   a sidecar that missed the rotation still verifies it (ca.cross_certificate).

Every step is written to ``<data dir>/ca`` before it takes effect, so a restart resumes it.
An operator's root (``--ca-cert``/``--ca-key``) is the operator's to rotate: refused here.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes

from . import ca
from .joins import Joins

log = logging.getLogger("meshlet.cp.ca")

PROPAGATION = 30.0  # seconds between a new root joining the bundle and signing


class RotationRefused(Exception):
    """A rotation that cannot start; the message says why and what to do."""


class Rotation:
    def __init__(
        self,
        joins: Joins,
        directory: Path | None,
        on_change: Callable[[], None],
        *,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.joins = joins
        self.directory = directory  # None: the operator's root, not ours to rotate
        self.on_change = on_change  # the bundle changed: push it
        self.rng = rng or random.SystemRandom()
        self.wall = wall
        self.rotations = 0
        self._wake = trio.Event()

    @property
    def default_overlap(self) -> float:
        return 2 * self.joins.lifetime

    def rotate(self, overlap: float | None = None, propagation: float = PROPAGATION) -> dict[str, Any]:
        """Stage a new root; RotationRefused says why not."""
        if self.directory is None:
            raise RotationRefused(
                "this control plane signs with the operator's root (--ca-cert/--ca-key): rotate it by "
                "replacing those files and restarting (docs/security.md, 'Rotating the root')"
            )
        overlap = self.default_overlap if overlap is None else overlap
        lifetime = self.joins.lifetime
        if not (math.isfinite(overlap) and overlap >= lifetime):
            raise RotationRefused(
                f"an overlap of {overlap:g}s is shorter than a certificate's lifetime ({lifetime:g}s): certificates "
                "the old root signed would be refused by peers before they expire; give at least that"
            )
        if not (math.isfinite(propagation) and 0 <= propagation <= overlap):
            raise RotationRefused(f"propagation must be from 0 to the overlap ({overlap:g}s), not {propagation:g}s")
        now = self.wall()
        try:
            staged = self.joins.authority.stage(now, self.rng, overlap, propagation)
        except ca.CAError as exc:
            raise RotationRefused(exc.reason) from None
        ca.write_authority(self.directory, staged)
        self.install(staged)
        self.rotations += 1
        assert staged.next is not None
        log.info(
            "CA rotation: new root %s trusted now, signs from %s; the old root %s is trusted until %s",
            fingerprint(staged.next.root.certificate),
            ca.iso(staged.next.signs_from),
            fingerprint(staged.current.certificate),
            ca.iso(staged.next.signs_from + overlap),
        )
        return self.status()

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/ca`` shows: certificates' fingerprints and times, never a key."""
        authority, now = self.joins.authority, self.wall()
        current = authority.current
        staged = authority.next
        return {
            "trust_domain": current.trust_domain,
            "operator_root": self.directory is None,
            "current": {
                "fingerprint": fingerprint(current.certificate),
                "not_after": current.not_after,
            },
            "next": None
            if staged is None
            else {
                "fingerprint": fingerprint(staged.root.certificate),
                "signs_from": staged.signs_from,
                "old_root_trusted_until": staged.signs_from + staged.overlap,
            },
            "retired": [
                {"fingerprint": fingerprint(r.certificate), "trusted_until": r.trusted_until}
                for r in authority.retired
                if r.is_trusted_at(now)
            ],
            "bundle_roots": len(authority.trusted(now)),
            "certificate_lifetime": self.joins.lifetime,
        }

    async def run(self) -> None:
        """Carry out each step when its time comes: the staged root starts signing, an old root
        leaves the bundle."""
        while True:
            due = self.joins.authority.next_change()
            with trio.move_on_after(max(0.0, due - self.wall()) if due is not None else math.inf):
                await self._wake.wait()
            self._wake = trio.Event()
            self.advance()

    def advance(self) -> None:
        authority = self.joins.authority
        advanced = authority.advance(self.wall())
        if advanced is authority:
            return
        if self.directory is not None:
            try:
                ca.write_authority(self.directory, advanced)
            except (OSError, ca.CAError) as exc:
                # Carried out all the same: a restart works the step out again from the files
                # (a staged root whose time has passed signs, an overlap that is over ends).
                log.error("CA rotation: could not write %s: %s", self.directory, exc)
        if advanced.current is not authority.current:
            log.info("CA rotation: the new root %s signs from now on", fingerprint(advanced.current.certificate))
        for gone in set(r.certificate for r in authority.retired) - set(r.certificate for r in advanced.retired):
            log.info("CA rotation: the old root %s has left the trust bundle (its overlap is over)", fingerprint(gone))
        self.install(advanced)

    def install(self, authority: ca.Authority) -> None:
        """Sign with ``authority`` from now on and push its bundle; the next step is timed from it
        (also how a replica takes a rotation another replica made: control_plane/replicas/)."""
        self.joins.authority = authority
        self._wake.set()
        self.on_change()


def fingerprint(certificate: Any) -> str:
    """SHA-256 of the DER certificate, hex, as ``openssl x509 -fingerprint -sha256`` shows it (lowercase, no colons)."""
    return bytes(certificate.fingerprint(hashes.SHA256())).hex()
