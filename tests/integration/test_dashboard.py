"""The web dashboard (the control plane's `/`), opened in a real headless Chromium on the
demo's mesh: the graph shows the demo's services and edges, the page logs no script
error, and a screenshot is kept as an artifact (test-artifacts/dashboard.png)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from meshlet.demo import Demo

from ..helpers import start_demo_mesh
from ..mesh import Mesh

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MESHLET_ARTIFACTS", ROOT / "test-artifacts"))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("MESHLET_REQUIRE_ALL"):
        pytest.fail("chromium is missing (Debian package chromium)")
    pytest.skip("chromium is missing: apt-get install chromium")


def headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary,
            "--headless=new",
            "--no-sandbox",  # we run as root in CI
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1400,1200",
            "--virtual-time-budget=8000",  # let the page fetch and draw (it polls every 2 s)
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


async def test_the_dashboard_draws_the_demo_mesh(tmp_path: Path) -> None:
    binary = chromium()
    demo = Demo(tmp_path)
    try:
        api, entry = await start_demo_mesh(demo)
        async with httpx.AsyncClient(timeout=10) as client:
            with trio.fail_after(30):  # the control plane has rates for both edges
                while True:
                    for i in range(10):
                        await client.get(f"{entry}/api/users/{i}")
                    data = (await client.get(f"http://{api}/v1/dashboard")).json()
                    edges = {row["name"] for row in data.get("stat", {}).get("edge", [])}
                    if {"gateway → user", "user → item"} <= edges and data["traces"]:
                        break
                    await trio.sleep(1)
            page = (await client.get(f"http://{api}/")).text
        dom = await trio.to_thread.run_sync(headless, binary, tmp_path / "profile", "--dump-dom", f"http://{api}/")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        picture = await trio.to_thread.run_sync(
            headless, binary, tmp_path / "profile2", f"--screenshot={shot}", f"http://{api}/"
        )
    finally:
        await demo.stop_all()
    assert "<script" in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", ""
    )  # nothing fetched from elsewhere
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for service in ("gateway", "user", "item"):
        assert f'data-service="{service}"' in html, service
    for edge in ("gateway→user", "user→item"):
        assert f'data-edge="{edge}"' in html, edge
    assert 'id="js-errors"></div>' in html  # the page's own error catcher stayed empty
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "rror" in line or "Uncaught" in line], console
    assert "instances ready" in html and "rps" in html
    assert picture.returncode == 0 and shot.stat().st_size > 10_000, picture.stderr[-2000:]


async def test_the_dashboard_behind_a_read_token_says_so(mesh: Mesh, tmp_path: Path) -> None:
    # The page's data answers 401 without the token: the page shows its token form, and no error.
    binary = chromium()
    await mesh.control_plane(extra=["--api-read-token", "read-0123456789abcdef"])
    dom = await trio.to_thread.run_sync(headless, binary, tmp_path / "profile", "--dump-dom", f"http://{mesh.api}/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<form id="token-form">' in dom.stdout  # no longer hidden
    assert 'id="js-errors"></div>' in dom.stdout
    assert '<div id="banner" style="display: none;"></div>' in dom.stdout  # not "cannot reach"
