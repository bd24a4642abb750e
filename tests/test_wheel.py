"""The built wheel, installed into a fresh virtualenv outside the checkout, is a working
meshlet: ``meshlet --version`` and ``meshlet demo`` run from there, with nothing of the
checkout on their path. This is what ``pip install meshlet`` gives a user, so it catches a
module or a data file the package forgot (the demo's apps, the dashboard's page).

The wheel is built from a copy of only what the build reads, so a stale ``build/`` or a
stray file in the checkout cannot slip into it. Its dependencies come from the package index
(pip's cache makes a second run quick).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

import meshlet

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: the project file, the files it names and the packages it finds.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "meshlet", "sidecar", "control_plane")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv, outside the checkout, with the built wheel installed; its bin/."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "_compiled.txt")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp / "dist"), str(source)], tmp)
    (wheel,) = (tmp / "dist").glob("meshlet-*.whl")
    assert wheel.name.startswith(f"meshlet-{meshlet.__version__}-")  # pyproject.toml reads the one version
    # A venv without pip of its own: this pip installs into it (--python), and skips compiling
    # every dependency's bytecode up front (--no-compile; Python compiles what it imports).
    run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], tmp)
    python = str(tmp / "venv" / "bin" / "python")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile", str(wheel)], tmp)
    return tmp / "venv" / "bin"


def clean_env() -> dict[str, str]:
    """This process's environment less whatever could lead back to the checkout or configure meshlet."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("MESHLET_")}
    env["COLUMNS"] = "120"  # rich's tables, as a terminal would show them
    return env


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_runs_the_compiled_hot_path(venv: Path) -> None:
    """setup.py compiled it when the wheel was built (gcc and the Python headers are here)."""
    if shutil.which("gcc") is None and not os.environ.get("MESHLET_REQUIRE_ALL"):
        pytest.skip("no gcc: the wheel is pure Python")
    code = "import sidecar.core.http1; from meshlet import compiled; print(compiled.describe())"
    build = run([str(venv / "python"), "-c", code], venv.parent.parent)
    assert build.strip() == "compiled: sidecar.core.http1", build


def test_the_installed_package_is_the_wheel_not_the_checkout(venv: Path) -> None:
    where = run(
        [
            str(venv / "python"),
            "-c",
            "import meshlet, sidecar, control_plane as c; print(meshlet.__file__, c.__file__)",
        ],
        venv.parent.parent,
    )
    for path in where.split():
        assert Path(path).is_relative_to(venv.parent), where
        assert not Path(path).is_relative_to(ROOT), where


def test_meshlet_version_is_the_packages(venv: Path) -> None:
    assert run([str(venv / "meshlet"), "--version"], venv.parent.parent).strip() == f"meshlet {meshlet.__version__}"


def test_the_wheel_carries_the_license(venv: Path) -> None:
    (license_file,) = venv.parent.glob("lib/python*/site-packages/meshlet-*.dist-info/licenses/LICENSE")
    assert license_file.read_text() == (ROOT / "LICENSE").read_text()


async def test_meshlet_demo_runs_from_the_wheel_and_serves_the_dashboard(venv: Path) -> None:
    stderr = venv.parent.parent / "demo.stderr"
    with stderr.open("wb") as errors:
        process = await trio.lowlevel.open_process(
            [str(venv / "meshlet"), "demo", "--duration", "5"],
            cwd=str(venv.parent.parent),
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    assert process.stdout is not None
    out, dashboard = b"", None
    try:
        with trio.fail_after(240):
            while chunk := await process.stdout.receive_some(65536):
                out += chunk
                found = re.search(rb"open (http://\S+/)\s+the dashboard", out)
                if dashboard is None and found:
                    # The mesh keeps running for --duration: the control plane's page is there now.
                    async with httpx.AsyncClient(timeout=10) as client:
                        dashboard = await client.get(found[1].decode())
            await process.wait()
    finally:
        if process.returncode is None:  # Ctrl-C: the demo stops the processes it started
            process.send_signal(signal.SIGINT)
            with trio.move_on_after(30):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = out.decode()
    assert process.returncode == 0, text[-3000:] + stderr.read_text()[-3000:]
    for table in ("which item instance answered", "meshlet status", "per-hop metrics"):
        assert table in text, table
    assert dashboard is not None, text[-3000:]
    assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
