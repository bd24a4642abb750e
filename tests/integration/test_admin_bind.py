"""The admin listener is loopback's by default (in --help, in the parsed options, in what a
sidecar binds), and a sidecar whose admin listener is bound elsewhere says so at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshlet import cli
from meshlet.cli.sidecar import is_loopback
from sidecar.app import SidecarOptions

from ..mesh import Mesh

RISK = "is not a loopback address"


def test_the_admin_default_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("MESHLET_")]:
        monkeypatch.delenv(name)
    args = cli.build_parser().parse_args(["sidecar", "--service", "item", "--app", "127.0.0.1:8080"])
    assert args.admin == ("127.0.0.1", 15090)
    assert SidecarOptions("item", ("127.0.0.1", 8080)).admin == ("127.0.0.1", 15090)
    shown = subprocess.run(
        [sys.executable, "-m", "meshlet", "sidecar", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "admin listener (default 127.0.0.1:15090" in " ".join(shown.split())


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False)]
    + [("::", False), ("10.0.0.7", False), ("admin.example.com", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_an_admin_listener_bound_elsewhere_is_warned_about(mesh: Mesh, tmp_path: Path) -> None:
    static = tmp_path / "static.yaml"
    static.write_text("services: {}\n")
    quiet = await mesh.sidecar("item", static=static)
    loud = await mesh.sidecar("user", static=static, extra=["--admin", "0.0.0.0:0"])
    assert RISK not in quiet.log()
    (line,) = [line for line in loud.log().splitlines() if RISK in line]
    assert " WARNING " in line and "--admin 0.0.0.0:" in line and "/config_dump" in line
