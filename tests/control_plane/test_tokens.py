"""control_plane.tokens: minting, the verdict table on a fake clock, the record's round trip,
and the bootstrap file's mode."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.tokens import (
    JOIN_TOKEN_FILE,
    TokenFileError,
    TokenRecord,
    bootstrap_token_file,
    mint,
    unscoped_record,
    verify,
)

NOW = 1_800_000_000.0


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def secret_of(text: str) -> str:
    return text.split(".", 1)[1]


def test_mint_shape_and_record() -> None:
    text, record = mint("item", 3600, NOW, seeded(1))
    assert text.startswith("mjt_") and len(text) == 4 + 12 + 1 + 43
    assert text == f"mjt_{record.id}.{secret_of(text)}"
    assert record.secret_sha256 == hashlib.sha256(secret_of(text).encode()).hexdigest()
    assert record == TokenRecord(record.id, record.secret_sha256, "item", NOW + 3600, NOW)
    assert secret_of(text) not in repr(record) and secret_of(text) not in str(record.to_dict())


def test_mint_draws_from_token_bytes() -> None:
    assert mint(None, None, NOW, seeded(1)) == mint(None, None, NOW, seeded(1))
    assert mint(None, None, NOW, seeded(1))[0] != mint(None, None, NOW, seeded(2))[0]
    assert mint(None, None, NOW)[0] != mint(None, None, NOW)[0]  # secrets.token_bytes by default


@pytest.mark.parametrize(
    ("service", "ttl", "reason"),
    [
        ("Item", 60.0, "not a service name"),
        ("", 60.0, "not a service name"),
        (None, 0.0, "positive"),
        (None, -1.0, "positive"),
        (None, float("inf"), "positive"),
        (None, float("nan"), "positive"),
    ],
)
def test_mint_refuses(service: str | None, ttl: float, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        mint(service, ttl, NOW, seeded(1))


def test_mint_refuses_short_random_bytes() -> None:
    with pytest.raises(ValueError, match="wrong number of bytes"):
        mint(None, None, NOW, lambda n: b"\x00" * (n - 1))


SCOPED, SCOPED_RECORD = mint("item", 60.0, NOW, seeded(1))
ANY, ANY_RECORD = mint(None, None, NOW, seeded(2))
OTHER, _ = mint("item", 60.0, NOW, seeded(3))  # never stored
RECORDS = {SCOPED_RECORD.id: SCOPED_RECORD, ANY_RECORD.id: ANY_RECORD}
WRONG_SECRET = SCOPED[:-1] + ("A" if SCOPED[-1] != "A" else "B")

VERDICTS = [
    # token, service, now, reason
    (SCOPED, "item", NOW, "ok"),
    (SCOPED, "item", NOW + 59.999, "ok"),
    (SCOPED, "item", NOW + 60.0, "expired"),
    (SCOPED, "item", NOW + 1e9, "expired"),
    (SCOPED, "user", NOW, "wrong-service"),
    (SCOPED, "user", NOW + 61, "expired"),  # expiry first: the token is no good for anything
    (ANY, "item", NOW, "ok"),
    (ANY, "user", NOW + 1e12, "ok"),  # the bootstrap token never expires
    (OTHER, "item", NOW, "unknown"),
    (WRONG_SECRET, "item", NOW, "unknown"),
    (WRONG_SECRET, "user", NOW + 61, "unknown"),  # no secret, no news of expiry or scope
    ("", "item", NOW, "malformed"),
    ("mjt_", "item", NOW, "malformed"),
    (SCOPED + "\n", "item", NOW, "malformed"),
    (" " + SCOPED, "item", NOW, "malformed"),
    (SCOPED.upper(), "item", NOW, "malformed"),
    (SCOPED.replace("mjt_", "mjx_"), "item", NOW, "malformed"),
    (SCOPED + "=", "item", NOW, "malformed"),
    (SCOPED[:-1], "item", NOW, "malformed"),
    (SCOPED.replace(".", ":"), "item", NOW, "malformed"),
    (SCOPED * 100, "item", NOW, "malformed"),
    (None, "item", NOW, "malformed"),
    (SCOPED.encode(), "item", NOW, "malformed"),
    (SCOPED, "Item", NOW, "malformed"),
    (ANY, "", NOW, "malformed"),
]


@pytest.mark.parametrize(("token", "service", "now", "reason"), VERDICTS)
def test_verdicts(token: object, service: str, now: float, reason: str) -> None:
    verdict = verify(RECORDS, token, service, now)
    assert verdict.reason == reason
    assert verdict.ok == (reason == "ok")
    assert (verdict.record is not None) == (reason in ("ok", "expired", "wrong-service"))
    for secret in (secret_of(SCOPED), secret_of(ANY)):
        assert secret not in verdict.detail


def test_wrong_service_says_the_scope() -> None:
    assert "scoped to service 'item', not 'user'" in verify(RECORDS, SCOPED, "user", NOW).detail


def test_no_records_no_entry() -> None:
    assert verify({}, ANY, "item", NOW).reason == "unknown"


@given(
    st.integers(0, 2**32),
    st.sampled_from([None, "item"]),
    st.sampled_from([None, 1.0, 60.0]),
    st.sampled_from(["item", "user"]),
    st.floats(-10.0, 120.0),
    st.text(alphabet="abcdefABCDEF0123456789_-.", max_size=3),
)
def test_no_reason_holds_the_secret(
    seed: int, scope: str | None, ttl: float | None, service: str, later: float, damage: str
) -> None:
    text, record = mint(scope, ttl, NOW, seeded(seed))
    secret = secret_of(text)
    for presented in (text, text + damage, text[:-3] + damage, damage + text):
        verdict = verify({record.id: record}, presented, service, NOW + later)
        assert secret not in verdict.detail
        assert secret[:8] not in verdict.detail
        assert secret not in repr(verdict)


@given(st.integers(0, 2**32), st.sampled_from([None, "item"]), st.sampled_from([None, 5.0]))
def test_record_round_trip(seed: int, scope: str | None, ttl: float | None) -> None:
    _, record = mint(scope, ttl, NOW, seeded(seed))
    assert TokenRecord.from_dict(record.to_dict()) == record


GOOD = SCOPED_RECORD.to_dict()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": "ABCDEF123456"}, "12 hex"),
        ({"id": 12}, "12 hex"),
        ({"secret_sha256": "00"}, "64 lowercase hex"),
        ({"secret_sha256": None}, "64 lowercase hex"),
        ({"service": "Item"}, "service name"),
        ({"expires": "never"}, "expires must be"),
        ({"expires": True}, "expires must be"),
        ({"expires": float("inf")}, "expires must be"),
        ({"created": None}, "created must be"),
        ({"extra": 1}, "has the keys"),
    ],
)
def test_record_from_dict_refuses(change: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        TokenRecord.from_dict({**GOOD, **change})


def test_record_from_dict_refuses_a_missing_key() -> None:
    data = dict(GOOD)
    del data["expires"]
    with pytest.raises(ValueError, match="has the keys"):
        TokenRecord.from_dict(data)


def test_bootstrap_file_is_written_once_0600_and_read_back(tmp_path: Path) -> None:
    data_dir = tmp_path / "cp"
    old_umask = os.umask(0)  # the file must be 0600 whatever the umask
    try:
        text = bootstrap_token_file(data_dir, seeded(7))
    finally:
        os.umask(old_umask)
    path = data_dir / JOIN_TOKEN_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert path.read_text() == text + "\n"
    assert bootstrap_token_file(data_dir, seeded(8)) == text  # read back, not minted again
    assert os.listdir(data_dir) == [JOIN_TOKEN_FILE]  # no temporary file left behind
    record = unscoped_record(text, NOW)
    assert (record.service, record.expires) == (None, None)
    assert verify({record.id: record}, text, "anything", NOW + 1e9).ok


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o602])
def test_bootstrap_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    text = bootstrap_token_file(tmp_path, seeded(7))
    path = tmp_path / JOIN_TOKEN_FILE
    path.chmod(mode)
    with pytest.raises(TokenFileError, match="chmod 600") as raised:
        bootstrap_token_file(tmp_path, seeded(7))
    assert secret_of(text) not in str(raised.value)


@pytest.mark.parametrize("content", ["", "\n", "not a token\n", "mjt_abc.def\n", "x" * 1000])
def test_bootstrap_file_without_a_token_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / JOIN_TOKEN_FILE
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(TokenFileError, match="does not hold a join token"):
        bootstrap_token_file(tmp_path, seeded(7))


def test_bootstrap_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(mint(None, None, NOW, seeded(1))[0] + "\n")
    target.chmod(0o600)
    (tmp_path / JOIN_TOKEN_FILE).symlink_to(target)
    with pytest.raises(TokenFileError, match="cannot open"):
        bootstrap_token_file(tmp_path, seeded(7))


def test_bootstrap_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / JOIN_TOKEN_FILE).mkdir(mode=0o700)
    with pytest.raises(TokenFileError, match="not a regular file"):
        bootstrap_token_file(tmp_path, seeded(7))


def test_unscoped_record_refuses_a_malformed_text() -> None:
    with pytest.raises(ValueError, match="not a join token"):
        unscoped_record("mjt_nope", NOW)


def test_ids_differ_across_many_mints() -> None:
    draw = seeded(11)
    ids = {mint(None, 60.0, NOW, draw)[1].id for _ in itertools.repeat(None, 500)}
    assert len(ids) == 500


@pytest.mark.parametrize("service", [None, 7, b"item", ["item"], "x" * 500])
def test_a_service_that_is_not_a_name_is_malformed(service: object) -> None:
    verdict = verify(RECORDS, ANY, service, NOW)
    assert verdict.reason == "malformed" and "not a service name" in verdict.detail
