"""When a sidecar renews its certificate. Pure: the time (``now``, float seconds since the
epoch, as a certificate's ``not_before``/``not_after``) and the randomness (``rng``) are
passed in.

* ``renew_at``: at 2/3 of the lifetime, less a jitter of up to 10 % of it, so that
  sidecars started together do not all ask the control plane at once (a 24 h certificate
  renews between 13.6 h and 16 h after ``not_before``). The third left is the time the
  control plane may be away before anything expires.
* ``state``: ``valid`` (serve, nothing to do), ``renew`` (serve, and ask for a new one),
  ``expired`` (peers refuse it: the sidecar has no identity until it gets a new one).
* ``renew_after_rotation``: the control plane's root changed (the bundle names another root
  first) and ours did not sign our certificate: renew soon, at a random moment of the next
  10 % of the lifetime, at most 5 minutes, so that a fleet does not ask all at once.
* ``retry_delay``: after a failed renewal, full-jitter exponential back-off (retry.py's
  ``backoff``), base 1 s, capped at 60 s, and cut short so that a retry is never scheduled
  past ``not_after`` while the certificate still has time left: the last chance to renew
  before expiry is not slept through.
"""

from __future__ import annotations

import math
import random
from typing import Literal

from sidecar.core.retry import backoff

RENEW_FRACTION = 2 / 3  # Linkerd's and SPIRE's choice: renew with a third of the lifetime left
RENEW_JITTER = 0.10  # of the lifetime, taken off the renewal time at random
# A control plane that comes back is used within a minute; a fleet that keeps failing asks
# about once a minute each, spread by the jitter.
RETRY_BASE = 1.0
RETRY_CAP = 60.0

State = Literal["valid", "renew", "expired"]


def _lifetime(not_before: float, not_after: float) -> float:
    if not (math.isfinite(not_before) and math.isfinite(not_after)) or not_after <= not_before:
        raise ValueError(f"a certificate's validity must end after it starts: {not_before!r} to {not_after!r}")
    return not_after - not_before


def renew_at(not_before: float, not_after: float, rng: random.Random) -> float:
    """When to renew a certificate valid from ``not_before`` to ``not_after``: in
    ``(not_before + 0.567 * lifetime, not_before + 2/3 * lifetime]``, never before
    ``not_before``. Drawn once per certificate."""
    lifetime = _lifetime(not_before, not_after)
    jitter = RENEW_JITTER * lifetime * rng.random()
    return max(not_before, not_before + RENEW_FRACTION * lifetime - jitter)


ROTATION_SPREAD = 0.10  # of the lifetime: the window a fleet renews in after a root rotation
ROTATION_SPREAD_CAP = 300.0  # seconds


def renew_after_rotation(now: float, not_before: float, not_after: float, rng: random.Random) -> float:
    """When to renew a certificate whose root no longer signs: in ``[now, now + spread)``, where
    the spread is 10 % of the lifetime, at most ``ROTATION_SPREAD_CAP``; never past ``not_after``."""
    spread = min(ROTATION_SPREAD * _lifetime(not_before, not_after), ROTATION_SPREAD_CAP)
    return min(now + spread * rng.random(), not_after)


def state(now: float, not_before: float, not_after: float, renew_at: float) -> State:
    """What the certificate is at ``now``. Expired from ``not_after`` on (x509's notAfter
    is the last valid second; treating it as expired already is the safe side of one second).

    A certificate not yet valid (``now < not_before``: this clock is behind the CA's) is
    ``valid`` here: a new one would start at the same time, so renewing would not help.
    """
    _lifetime(not_before, not_after)
    if now >= not_after:
        return "expired"
    if now >= renew_at:
        return "renew"
    return "valid"


def retry_delay(
    attempt: int,
    now: float,
    not_after: float,
    rng: random.Random,
    base: float = RETRY_BASE,
    cap: float = RETRY_CAP,
) -> float:
    """Seconds to wait before renewal attempt ``attempt`` + 1, after ``attempt`` failed (1
    for the first failure).

    Uniform in ``[0, min(cap, base * 2 ** (attempt - 1)))``, and at most ``not_after - now``
    while the certificate has not expired. Once it has, the plain back-off: the sidecar
    keeps asking, as often as the cap allows.
    """
    delay = backoff(attempt, base, cap, rng)
    if now < not_after:
        delay = min(delay, not_after - now)
    return delay
