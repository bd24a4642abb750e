"""meshlet ca: the parser and the text `meshlet ca status` prints."""

from __future__ import annotations

import pytest

from meshlet.cli import build_parser
from meshlet.cli.ca import describe

STATUS = {
    "trust_domain": "meshlet.local",
    "operator_root": False,
    "current": {"fingerprint": "aa" * 32, "not_after": 2_100_000_000.0},
    "next": {"fingerprint": "bb" * 32, "signs_from": 1_800_000_030.0, "old_root_trusted_until": 1_800_172_830.0},
    "retired": [{"fingerprint": "cc" * 32, "trusted_until": 1_800_086_400.0}],
    "bundle_roots": 3,
}


def test_status_names_every_root_and_until_when() -> None:
    text = describe(STATUS)
    assert "signing root   " + "aa" * 32 in text
    assert "next root      " + "bb" * 32 + "  trusted now, signs from 2027-01-15 08:00:30Z" in text
    assert "retired root   " + "cc" * 32 + "  trusted until 2027-01-16 08:00:00Z" in text
    assert "3 root(s)" in text
    assert "next root" not in describe({**STATUS, "next": None, "retired": []})


@pytest.mark.parametrize(
    ("argv", "overlap", "propagation"),
    [(["ca", "rotate"], None, 30.0), (["ca", "rotate", "--overlap", "72h", "--propagation", "1m"], 259200.0, 60.0)],
)
def test_rotate_takes_durations(argv: list[str], overlap: float | None, propagation: float) -> None:
    args = build_parser().parse_args(argv)
    assert (args.ca_command, args.overlap, args.propagation) == ("rotate", overlap, propagation)


@pytest.mark.parametrize("bad", ["0", "-1h", "soon"])
def test_rotate_refuses_a_bad_overlap(bad: str) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["ca", "rotate", "--overlap", bad])
    assert exited.value.code == 2
