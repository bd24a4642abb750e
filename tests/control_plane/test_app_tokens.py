"""control_plane/app.py's token and TLS files: the write token's file made 0600 and refused
when others may read it; the read token's rules; nothing secret in the options' repr."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from control_plane.app import ApiTokenError, ControlPlaneOptions, api_read_token, api_token, api_tokens

READ = "read-0123456789abcdef"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_write_token_is_made_once_0600_in_a_0700_directory(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    token = api_token(data)
    assert len(token) == 64 and (mode(data), mode(data / "api-token")) == (0o700, 0o600)
    assert api_token(data) == token  # read back, not made again


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("0644", "chmod 600"),
        ("0660", "chmod 600"),
        ("symlink", "cannot open the token file"),
        ("two lines", "does not hold one token"),
        ("empty", "does not hold one token"),
    ],
)
def test_a_write_token_file_that_cannot_be_trusted_is_refused(tmp_path: Path, setup: str, problem: str) -> None:
    data = tmp_path / "cp"
    data.mkdir()
    path = data / "api-token"
    if setup == "symlink":
        (tmp_path / "elsewhere").write_text("0" * 64)
        (tmp_path / "elsewhere").chmod(0o600)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.write_text({"two lines": "a" * 64 + "\n" + "b" * 64 + "\n", "empty": "\n"}.get(setup, "0" * 64 + "\n"))
        path.chmod(int(setup, 8) if setup.isdigit() else 0o600)
    with pytest.raises(ApiTokenError, match=problem) as refused:
        api_token(data)
    assert "0" * 64 not in str(refused.value) and "a" * 64 not in str(refused.value)


def test_the_read_token_from_a_value_or_a_private_file(tmp_path: Path) -> None:
    assert api_read_token(None) is None
    assert api_read_token(READ) == READ
    path = tmp_path / "read-token"
    path.write_text(READ + "\n")
    path.chmod(0o600)
    assert api_read_token(f"@{path}") == READ
    path.chmod(0o640)
    with pytest.raises(ApiTokenError, match=f"--api-read-token: .*chmod 600 {path}"):
        api_read_token(f"@{path}")
    with pytest.raises(ApiTokenError, match="no such file"):
        api_read_token(f"@{tmp_path / 'missing'}")


@pytest.mark.parametrize(
    "value", ["short", "read 0123456789abcdef", "read-0123456789abcdé", "read-0123456789\x00abcdef"]
)
def test_a_read_token_that_is_too_short_or_not_printable_ascii_is_refused(value: str) -> None:
    with pytest.raises(ApiTokenError, match="at least 16 printable ASCII") as refused:
        api_read_token(value)
    assert value not in str(refused.value)


def test_the_read_token_is_not_the_write_token(tmp_path: Path) -> None:
    token = api_token(tmp_path / "cp")
    with pytest.raises(ApiTokenError, match="not the write token"):
        api_tokens(ControlPlaneOptions(data_dir=tmp_path / "cp", api_read_token=token))
    assert api_tokens(ControlPlaneOptions(data_dir=tmp_path / "cp", api_read_token=READ)) == (token, READ)


def test_the_options_repr_holds_no_token() -> None:
    assert READ not in repr(ControlPlaneOptions(api_read_token=READ))
