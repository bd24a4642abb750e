"""A root rotation: the staged root, its persistence across restarts (a crash between two
writes included), the overlap's end, and what the rotation shell refuses."""

from __future__ import annotations

import json
import random
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from control_plane import ca
from control_plane.ca import CAError
from control_plane.ca_rotation import Rotation, RotationRefused
from control_plane.joins import Joins

from ..conftest import need
from .test_ca import HOUR, NOW, TD, assert_refused, assert_verifies, csr_for

LIFETIME = HOUR


def fresh(directory: Path, now: float = NOW) -> ca.Authority:
    return ca.open_authority(directory, TD, now, random.Random(1))


def test_a_staged_root_is_trusted_at_once_and_signs_only_from_its_time(tmp_path: Path) -> None:
    authority = fresh(tmp_path)
    staged = authority.stage(NOW, random.Random(2), overlap=2 * HOUR, propagation=30)
    assert staged.next is not None
    new_root = staged.next.root.certificate
    # The bundle names the signing root first, the staged one next.
    assert staged.trusted(NOW) == (authority.current.certificate, new_root)
    assert staged.advance(NOW + 29) is staged
    leaf = staged.issue(csr_for(), "item", NOW + 29, random.Random(3))
    assert_verifies(authority.bundle(NOW + 29), leaf, NOW + 29, tmp_path)  # the old root still signs

    promoted = staged.advance(NOW + 30)
    assert promoted.current.certificate == new_root and promoted.next is None
    assert promoted.trusted(NOW + 30) == (new_root, authority.current.certificate)
    # The old root is trusted overlap seconds from when the new one began to sign.
    assert [r.trusted_until for r in promoted.retired] == [NOW + 30 + 2 * HOUR]
    assert promoted.next_change() == NOW + 30 + 2 * HOUR
    assert_verifies(promoted.bundle(NOW + HOUR), leaf, NOW + HOUR, tmp_path)
    gone = promoted.advance(NOW + 30 + 2 * HOUR + 1)
    assert gone.retired == () and gone.next_change() is None
    assert_refused(gone.bundle(NOW + 30 + 2 * HOUR + 1), leaf, NOW + 30 + 2 * HOUR + 1, tmp_path)


def test_one_rotation_at_a_time(tmp_path: Path) -> None:
    staged = fresh(tmp_path).stage(NOW, random.Random(2), overlap=HOUR, propagation=30)
    with pytest.raises(CAError, match="already under way"):
        staged.stage(NOW + 1, random.Random(3), overlap=HOUR)


@pytest.mark.parametrize("field", ["overlap", "propagation"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_durations_are_checked(tmp_path: Path, field: str, value: float) -> None:
    with pytest.raises(CAError, match=field):
        fresh(tmp_path).stage(NOW, random.Random(2), **{field: value})


def test_the_authority_survives_a_restart_at_every_step(tmp_path: Path) -> None:
    first = fresh(tmp_path)
    staged = first.stage(NOW, random.Random(2), overlap=2 * HOUR, propagation=60)
    ca.write_authority(tmp_path, staged)
    assert staged.next is not None
    # restarted while the new root is staged: still staged, same root, same time
    again = fresh(tmp_path, NOW + 10)
    assert again.next is not None
    assert again.next.root.certificate == staged.next.root.certificate
    assert (again.next.signs_from, again.next.overlap) == (NOW + 60, 2 * HOUR)
    assert again.current.certificate == first.current.certificate
    # restarted after its time: it signs, the old root is retired, and that is written down
    promoted = fresh(tmp_path, NOW + 61)
    assert promoted.current.certificate == staged.next.root.certificate
    assert [(r.certificate, r.trusted_until) for r in promoted.retired] == [
        (first.current.certificate, NOW + 60 + 2 * HOUR)
    ]
    assert not (tmp_path / ca.NEXT_KEY_FILE).exists() and not (tmp_path / ca.NEXT_CERT_FILE).exists()
    during = fresh(tmp_path, NOW + HOUR)
    assert during.trusted(NOW + HOUR) == (staged.next.root.certificate, first.current.certificate)
    # restarted after the overlap: the old root is gone, from the files too
    after = fresh(tmp_path, NOW + 60 + 2 * HOUR + 1)
    assert after.retired == ()
    assert json.loads((tmp_path / ca.AUTHORITY_FILE).read_text())["retired"] == []


def test_files_hold_no_retired_key_and_the_staged_key_is_private(tmp_path: Path) -> None:
    staged = fresh(tmp_path).stage(NOW, random.Random(2), overlap=HOUR, propagation=60)
    ca.write_authority(tmp_path, staged)
    assert stat.S_IMODE((tmp_path / ca.NEXT_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / ca.AUTHORITY_FILE).stat().st_mode) == 0o644
    ca.write_authority(tmp_path, staged.advance(NOW + 60))
    index = (tmp_path / ca.AUTHORITY_FILE).read_bytes()
    assert b"PRIVATE KEY" not in index and b"CERTIFICATE" in index
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        ca.AUTHORITY_FILE,
        ca.CERT_FILE,
        ca.KEY_FILE,
    ]


def _openssl_verifies(tmp_path: Path, trusted: bytes, leaf: bytes, untrusted: bytes, at: float) -> bool:
    paths = {}
    for name, data in (("trusted", trusted), ("leaf", leaf), ("untrusted", untrusted)):
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(data)
    extra = ["-untrusted", str(paths["untrusted"])] if untrusted else []
    command = [need("openssl"), "verify", "-attime", str(int(at)), "-CAfile", str(paths["trusted"]), *extra]
    return subprocess.run([*command, str(paths["leaf"])], capture_output=True, check=False).returncode == 0


def test_the_cross_certificate_lets_a_verifier_of_the_old_root_verify_the_new_one(tmp_path: Path) -> None:
    """A sidecar that missed the rotation trusts the old root only: with the cross certificate
    the control plane sends, it still verifies a certificate of the new root; one that trusts
    the new root does not need it. Until the old root's overlap ends."""
    first = fresh(tmp_path / "ca")
    staged = first.stage(NOW, random.Random(2), overlap=HOUR, propagation=60)
    promoted = staged.advance(NOW + 60)
    assert staged.cross is None and promoted.cross is not None
    at = NOW + 120
    leaf = promoted.issue(csr_for(), "item", at, random.Random(3))
    old, new = first.current.certificate_pem(), promoted.current.certificate_pem()
    cross = promoted.cross.public_bytes(serialization.Encoding.PEM)
    assert _openssl_verifies(tmp_path, old, leaf, cross, at)
    assert not _openssl_verifies(tmp_path, old, leaf, b"", at)
    assert _openssl_verifies(tmp_path, new, leaf, b"", at)
    assert _openssl_verifies(tmp_path, new, leaf, cross, at)
    # kept across a restart, gone with the overlap
    ca.write_authority(tmp_path / "ca", promoted)
    assert fresh(tmp_path / "ca", at).cross == promoted.cross
    assert promoted.advance(NOW + 60 + HOUR + 1).cross is None


def test_a_crash_between_the_index_and_the_root_keeps_the_old_root(tmp_path: Path) -> None:
    """The index written (the old root listed as retired), the root files not yet: the restart
    signs with the old root, which is not listed twice, and the staged root is still staged."""
    first = fresh(tmp_path)
    staged = first.stage(NOW, random.Random(2), overlap=HOUR, propagation=60)
    ca.write_authority(tmp_path, staged)
    promoted = staged.advance(NOW + 60)
    index = {
        "version": 1,
        "retired": [{"certificate": first.current.certificate_pem().decode(), "until": NOW + 60 + HOUR}],
        "next": {"signs_from": NOW + 60, "overlap": HOUR},
    }
    (tmp_path / ca.AUTHORITY_FILE).write_text(json.dumps(index))
    reopened = fresh(tmp_path, NOW + 30)
    assert reopened.current.certificate == first.current.certificate
    assert reopened.retired == ()
    assert reopened.next is not None and reopened.next.root.certificate == promoted.current.certificate


def test_a_crash_after_the_root_was_written_completes_the_promotion(tmp_path: Path) -> None:
    first = fresh(tmp_path)
    staged = first.stage(NOW, random.Random(2), overlap=HOUR, propagation=60)
    ca.write_authority(tmp_path, staged)
    assert staged.next is not None
    ca.write_root(tmp_path, staged.next.root)  # the index still says "staged"
    reopened = fresh(tmp_path, NOW + 30)
    assert reopened.current.certificate == staged.next.root.certificate
    assert reopened.next is None


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[]", b'{"version": 2, "retired": [], "next": null}', b'{"version": 1, "retired": [{}]}'],
)
def test_an_index_that_is_not_ours_is_refused(tmp_path: Path, content: bytes) -> None:
    fresh(tmp_path)
    (tmp_path / ca.AUTHORITY_FILE).write_bytes(content)
    with pytest.raises(CAError, match=ca.AUTHORITY_FILE):
        fresh(tmp_path)


# the shell ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def shell(tmp_path: Path | None, authority: ca.Authority) -> tuple[Rotation, list[int], Clock]:
    clock = Clock()
    joins = Joins(authority, dict, token_path="join-token", lifetime=LIFETIME, wall=clock)
    pushed: list[int] = []
    rotation = Rotation(joins, tmp_path, lambda: pushed.append(1), rng=random.Random(5), wall=clock)
    return rotation, pushed, clock


@pytest.mark.parametrize(
    ("overlap", "refused"),
    [(LIFETIME - 1, "shorter than a certificate's lifetime"), (LIFETIME, None), (None, None)],
)
def test_an_overlap_shorter_than_a_certificate_is_refused(
    tmp_path: Path, overlap: float | None, refused: str | None
) -> None:
    rotation, pushed, _ = shell(tmp_path, fresh(tmp_path))
    if refused is not None:
        with pytest.raises(RotationRefused, match=refused):
            rotation.rotate(overlap)
        assert pushed == [] and not (tmp_path / ca.NEXT_KEY_FILE).exists()
        return
    status = rotation.rotate(overlap, propagation=10)
    assert pushed == [1]
    assert status["next"]["old_root_trusted_until"] == NOW + 10 + (overlap or 2 * LIFETIME)
    assert status["bundle_roots"] == 2


def test_the_operators_root_is_not_rotated_here() -> None:
    rotation, pushed, _ = shell(None, ca.Authority(ca.create_root(TD, NOW, random.Random(1))))
    with pytest.raises(RotationRefused, match="operator's root"):
        rotation.rotate()
    assert pushed == []
    assert rotation.status()["operator_root"] is True


def test_the_shell_promotes_pushes_and_writes_each_step(tmp_path: Path) -> None:
    rotation, pushed, clock = shell(tmp_path, fresh(tmp_path))
    before = rotation.status()["current"]["fingerprint"]
    staged = rotation.rotate(2 * LIFETIME, propagation=10)["next"]["fingerprint"]
    clock.now = NOW + 9
    rotation.advance()
    assert pushed == [1]  # nothing due yet
    clock.now = NOW + 10
    rotation.advance()
    status = rotation.status()
    assert pushed == [1, 1]
    assert status["current"]["fingerprint"] == staged and status["next"] is None
    assert [r["fingerprint"] for r in status["retired"]] == [before]
    assert "key" not in json.dumps(status).lower().replace("key_", "")
    clock.now = NOW + 10 + 2 * LIFETIME + 1
    rotation.advance()
    assert pushed == [1, 1, 1] and rotation.status()["retired"] == []
    assert fresh(tmp_path, clock.now).current.certificate == rotation.joins.authority.current.certificate
