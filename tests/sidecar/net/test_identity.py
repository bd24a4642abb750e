"""sidecar.net.identity: the key and its file, what is checked in an issued certificate, the
persisted copy a restart uses, renewal at 2/3 on a fake clock and its retries, expiry."""

from __future__ import annotations

import logging
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from control_plane import ca
from meshlet import wire
from sidecar.core.credentials import CredentialHolder
from sidecar.net.identity import IdentityError, SidecarIdentity, read_token_file

START = 1_800_000_000.0
LIFETIME = 3600.0


def _authority(trust_domain: str = "meshlet.local") -> ca.Authority:
    return ca.Authority(ca.create_root(trust_domain, START - 100, random.Random(1)))


def _issue(
    authority: ca.Authority, identity: SidecarIdentity, service: str = "item", now: float = START
) -> wire.Issued:
    chain = authority.issue(identity.csr(), service, now, random.Random(2), LIFETIME)
    not_after = x509.load_pem_x509_certificate(chain).not_valid_after_utc.timestamp()
    return wire.Issued(chain, authority.bundle(now), not_after)


def _identity(directory: Path | None = None, wall: Callable[[], float] = lambda: START) -> SidecarIdentity:
    return SidecarIdentity("item", CredentialHolder(), directory=directory, rng=random.Random(3), wall=wall)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_issued_certificate_is_installed_and_kept_0600_beside_the_key(tmp_path: Path) -> None:
    identity = _identity(tmp_path)
    assert identity.state() == "none" and identity.not_ready()
    credentials = identity.install(_issue(_authority(), identity))
    assert identity.holder.current is credentials and identity.holder.generation == 1
    assert (credentials.service, credentials.trust_domain) == ("item", "meshlet.local")
    assert credentials.not_after == START + LIFETIME
    assert identity.state() == "valid" and identity.not_ready() == ""
    for name in ("item.key", "item.crt", "item.bundle.pem"):
        assert _mode(tmp_path / name) == 0o600, name
    assert b"PRIVATE KEY" not in (tmp_path / "item.crt").read_bytes()
    assert "PRIVATE" not in repr(identity) + repr(credentials)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda a, me, other: _issue(a, me, service="user"), "'user''s, not 'item''s"),
        (lambda a, me, other: _issue(a, other), "another key"),
        (
            lambda a, me, other: wire.Issued(_issue(a, me).chain, _authority("other.org").bundle(START), 0.0),
            "not signed",
        ),
        (lambda a, me, other: wire.Issued(b"nonsense", a.bundle(START), 0.0), "not PEM"),
    ],
    ids=["another-service", "another-key", "another-ca", "garbage"],
)
def test_a_certificate_that_is_not_ours_is_refused(
    make: Callable[[ca.Authority, SidecarIdentity, SidecarIdentity], wire.Issued], why: str
) -> None:
    identity, other = _identity(), _identity()
    with pytest.raises(IdentityError, match=why):
        identity.install(make(_authority(), identity, other))
    assert identity.holder.current is None


def test_a_restart_keeps_the_key_and_uses_the_persisted_certificate(tmp_path: Path) -> None:
    first = _identity(tmp_path)
    first.install(_issue(_authority(), first))
    again = _identity(tmp_path)
    assert again.csr() != b"" and again.load_persisted()
    assert again.holder.current is not None and again.holder.current.cert_chain == first.holder.current.cert_chain  # type: ignore[union-attr]
    assert again.state() == "valid"


def test_a_key_file_open_to_others_is_refused(tmp_path: Path) -> None:
    _identity(tmp_path)
    os.chmod(tmp_path / "item.key", 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        _identity(tmp_path)


def test_a_token_file_is_read_at_each_use(tmp_path: Path) -> None:
    path = tmp_path / "join-token"
    identity = SidecarIdentity("item", CredentialHolder(), join_token_file=path)
    assert identity.join_token == ""  # not there yet: joins without, and says why in the log
    path.write_text("mjt_0123456789ab.secret\n")
    assert identity.join_token == "mjt_0123456789ab.secret"
    assert "secret" not in repr(identity)
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(path)


async def test_renewal_at_two_thirds_on_the_live_session(autojump_clock: trio.testing.MockClock) -> None:
    authority = _authority()
    identity = _identity(wall=lambda: START + trio.current_time())
    identity.install(_issue(authority, identity))
    asked: list[float] = []

    async def request(csr: bytes) -> None:  # the control plane answers at once
        asked.append(trio.current_time())
        identity.install(_issue(authority, identity, now=identity.wall()))

    with trio.move_on_after(2 * LIFETIME):
        await identity.renew(request)
    # The first renewal between 0.567 and 2/3 of the lifetime, the next the same from then.
    assert len(asked) >= 2
    assert 0.566 * LIFETIME <= asked[0] <= 2 / 3 * LIFETIME
    assert 0.566 * LIFETIME <= asked[1] - asked[0] <= 2 / 3 * LIFETIME
    assert identity.state() == "valid" and identity.renewals == 1 + len(asked)


async def test_renewal_without_an_answer_retries_and_never_sleeps_past_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    authority = _authority()
    identity = _identity(wall=lambda: START + trio.current_time())
    identity.install(_issue(authority, identity))
    asked: list[float] = []

    async def request(csr: bytes) -> None:  # the control plane is away: no answer
        asked.append(trio.current_time())

    with trio.move_on_after(LIFETIME + 300):
        await identity.renew(request)
    assert len(asked) >= 3
    before_expiry = [t for t in asked if t < LIFETIME]
    assert before_expiry and max(before_expiry) <= LIFETIME  # the last chance is taken
    assert any(t >= LIFETIME for t in asked)  # and it keeps asking after expiry
    assert identity.state() == "expired" and identity.not_ready().startswith("its certificate expired")


async def test_expiry_is_logged_once_at_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    identity = _identity(wall=lambda: START + trio.current_time())
    identity.install(_issue(_authority(), identity))
    with caplog.at_level(logging.ERROR, logger="meshlet.identity"), trio.move_on_after(3 * LIFETIME):
        await identity.watch_expiry()
    (record,) = caplog.records
    assert "spiffe://meshlet.local/service/item expired" in record.getMessage()
    assert identity.expires_in() is not None and identity.expires_in() < 0  # type: ignore[operator]


def test_a_new_trust_bundle_is_installed_for_the_current_certificate(tmp_path: Path) -> None:
    authority = _authority()
    identity = _identity(tmp_path)
    identity.install(_issue(authority, identity))
    rotated = authority.rotate(START + 10, random.Random(4))
    generation = identity.holder.generation
    identity.install_bundle(rotated.bundle(START + 10))  # the new root and the old one, in overlap
    current = identity.holder.current
    assert current is not None and identity.holder.generation == generation + 1
    assert len(x509.load_pem_x509_certificates(current.bundle)) == 2
    assert (tmp_path / "item.bundle.pem").read_bytes() == current.bundle
    assert identity.state() == "valid"  # the certificate itself is unchanged


async def test_a_rotated_root_makes_the_sidecar_renew_soon_not_before(autojump_clock: trio.testing.MockClock) -> None:
    """The bundle of a staged rotation (the old root still signs, named first) changes nothing;
    the bundle that names the new root first makes a sidecar on the old root renew within the
    rotation window, not at 2/3 of its lifetime."""
    authority = _authority()
    identity = _identity(wall=lambda: START + trio.current_time())
    identity.install(_issue(authority, identity))
    old_issuer = identity.describe()["issuer_fingerprint"]
    staged = authority.stage(START, random.Random(4), overlap=2 * LIFETIME, propagation=30)
    promoted = staged.advance(START + 30)
    asked: list[float] = []

    async def request(csr: bytes) -> None:
        asked.append(trio.current_time())
        identity.install(_issue(promoted, identity, now=identity.wall()))

    async def rotate() -> None:
        await trio.sleep(1)
        identity.install_bundle(staged.bundle(START + 1))
        await trio.sleep(29)
        identity.install_bundle(promoted.bundle(START + 30))

    with trio.move_on_after(0.5 * LIFETIME):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(identity.renew, request)
            nursery.start_soon(rotate)
    assert len(asked) == 1
    assert 30 <= asked[0] <= 30 + 0.1 * LIFETIME
    described = identity.describe()
    assert described["issuer_fingerprint"] != old_issuer
    assert described["issuer_fingerprint"] == promoted.current.certificate.fingerprint(hashes.SHA256()).hex()
