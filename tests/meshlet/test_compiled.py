"""The finder that picks a compiled module's extension or its .py (meshlet/compiled.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from pathlib import Path

import pytest

from meshlet import compiled

SOURCE = b"VALUE = 1\n"
RECORDED = hashlib.sha256(SOURCE).hexdigest()
CHANGED = "sidecar/core/mod.py is not what was compiled: running it as Python; `make build` compiles it again"


def tree(root: Path, *, extension: bool) -> Path:
    """``sidecar/core/mod.py`` under root, with an extension file beside it (never loaded here)."""
    package = root / "sidecar" / "core"
    package.mkdir(parents=True)
    (package / "mod.py").write_bytes(SOURCE)
    if extension:
        (package / f"mod{EXTENSION_SUFFIXES[0]}").write_bytes(b"\x7fELF")
    return package


@pytest.mark.parametrize(
    ("name", "hashes", "pure", "extension", "picked", "warned"),
    [
        ("compiled from this source", {"sidecar.core.mod": RECORDED}, False, True, "extension", False),
        ("source changed since", {"sidecar.core.mod": "0" * 64}, False, True, "source", True),
        ("extension not recorded", {}, False, True, "source", True),
        ("MESHLET_NO_EXTENSIONS", {"sidecar.core.mod": RECORDED}, True, True, "source", False),
        ("never compiled", {"sidecar.core.mod": RECORDED}, False, False, "python's own", False),
    ],
)
def test_the_extension_runs_only_when_built_from_the_source_as_it_is(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    hashes: dict[str, str],
    pure: bool,
    extension: bool,
    picked: str,
    warned: bool,
) -> None:
    package = tree(tmp_path, extension=extension)
    finder = compiled.Finder(hashes, pure, root=str(tmp_path))
    spec = finder.find_spec("sidecar.core.mod", [str(package)])
    if picked == "python's own":
        assert spec is None  # the usual finders import the .py
    else:
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).name == ("mod.py" if picked == "source" else f"mod{EXTENSION_SUFFIXES[0]}")
        assert isinstance(spec.loader, ExtensionFileLoader) == (picked == "extension")
        assert finder.compiled == {"sidecar.core.mod": picked == "extension"}
    assert (CHANGED in capsys.readouterr().err) == warned


@pytest.mark.parametrize("fullname", ["other.core.mod", "sidecar"])
def test_modules_not_ours_and_packages_are_left_to_python(tmp_path: Path, fullname: str) -> None:
    package = tree(tmp_path, extension=True)
    finder = compiled.Finder({}, False, root=str(tmp_path))
    assert finder.find_spec(fullname, [str(package)] if "." in fullname else None) is None


@pytest.mark.parametrize(("value", "pure"), [("", False), ("0", False), ("1", True), ("yes", True)])
def test_the_environment_variable(monkeypatch: pytest.MonkeyPatch, value: str, pure: bool) -> None:
    monkeypatch.setenv(compiled.ENV, value)
    assert compiled.disabled() == pure


def test_the_manifest_is_read_and_a_broken_one_is_nothing_compiled(tmp_path: Path) -> None:
    manifest = tmp_path / "_compiled.txt"
    manifest.write_text(f"sidecar.core.mod {RECORDED}\n\n")
    assert compiled.recorded(str(manifest)) == {"sidecar.core.mod": RECORDED}
    manifest.write_text("one two three\n")
    assert compiled.recorded(str(manifest)) == {}
    assert compiled.recorded(str(tmp_path / "missing.txt")) == {}


def test_with_the_variable_set_every_module_runs_from_its_source() -> None:
    """A real process on this tree, compiled or not."""
    code = (
        "import sidecar.core.http1, sidecar.layers.metrics; from meshlet import compiled; "
        "print(sidecar.core.http1.__file__, sidecar.layers.metrics.__file__); print(compiled.describe())"
    )
    env = {"MESHLET_NO_EXTENSIONS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=Path(__file__).parents[2]
    )
    files, build = result.stdout.splitlines()
    assert all(f.endswith(".py") for f in files.split()), files
    assert build == "pure Python (MESHLET_NO_EXTENSIONS is set)"
    assert result.stderr == ""
