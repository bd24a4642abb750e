"""Which build of the hot path runs: the compiled extensions or their .py sources.

setup.py compiles a few per-request modules with Cython (the same .py files), beside them in
an editable install or into the wheel, and records each source's hash in ``_compiled.txt``.
Python prefers an extension to the .py of the same name: after an edit it would run the stale
build without a word. This finder, put first on ``sys.meta_path`` by the package, decides:

- ``MESHLET_NO_EXTENSIONS`` set (to anything but ``0``): every module runs from its .py;
- an extension whose .py no longer has the recorded hash (or has none recorded) is not loaded:
  the .py runs, and stderr says so once per module;
- otherwise the extension runs.

Modules without an extension beside them are left to Python's own finders, at the cost of
a few stat calls per import of one of our modules.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec
from importlib.util import spec_from_file_location
from types import ModuleType

ENV = "MESHLET_NO_EXTENSIONS"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where meshlet/ and sidecar/ sit
MANIFEST = os.path.join(ROOT, "meshlet", "_compiled.txt")
_OURS = ("meshlet.", "sidecar.", "control_plane.")


def disabled() -> bool:
    """Whether the environment asks for the .py modules."""
    return os.environ.get(ENV, "") not in ("", "0")


def recorded(manifest: str = MANIFEST) -> dict[str, str]:
    """module -> the sha256 of the source it was compiled from (empty: nothing compiled)."""
    try:
        with open(manifest, encoding="ascii") as lines:
            return dict(line.split() for line in lines if line.strip())
    except (OSError, ValueError):
        return {}


def source_hash(path: str) -> str:
    """The sha256 of what a module was compiled from: its .py, then the .pxd beside it if any
    (setup.py hashes the same way)."""
    import hashlib  # only where something was compiled

    digest = hashlib.sha256()
    with open(path, "rb") as source:
        digest.update(source.read())
    try:
        with open(path[: -len(".py")] + ".pxd", "rb") as declarations:
            digest.update(declarations.read())
    except FileNotFoundError:
        pass
    return digest.hexdigest()


def extension_beside(directory: str, name: str) -> str | None:
    for suffix in EXTENSION_SUFFIXES:
        candidate = os.path.join(directory, name + suffix)
        if os.path.exists(candidate):
            return candidate
    return None


class Finder:
    """Loads one of our modules from its extension only when that was built from its .py."""

    def __init__(self, hashes: dict[str, str], pure: bool, root: str = ROOT) -> None:
        self.hashes = hashes
        self.pure = pure
        self.root = root
        self.compiled: dict[str, bool] = {}  # each module imported with an extension beside: compiled?

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None or not fullname.startswith(_OURS):
            return None
        name = fullname.rpartition(".")[2]
        for directory in path:
            source = os.path.join(directory, name + ".py")
            if os.path.isfile(source):
                break
        else:
            return None  # a package, or not ours to place
        extension = extension_beside(directory, name)
        if extension is None:
            return None  # plain Python: the usual import
        if self.up_to_date(fullname, source):
            self.compiled[fullname] = True
            return spec_from_file_location(fullname, extension, loader=ExtensionFileLoader(fullname, extension))
        self.compiled[fullname] = False
        if not self.pure:
            shown = os.path.relpath(source, self.root)
            print(
                f"meshlet: {shown} is not what was compiled: running it as Python; `make build` compiles it again",
                file=sys.stderr,
            )
        return spec_from_file_location(fullname, source)

    def built(self, fullname: str) -> bool:
        """Whether the module would load compiled (whether or not it was imported)."""
        source = os.path.join(self.root, *fullname.split(".")) + ".py"
        directory, file = os.path.split(source)
        try:
            return extension_beside(directory, file[:-3]) is not None and self.up_to_date(fullname, source)
        except OSError:
            return False

    def up_to_date(self, fullname: str, source: str) -> bool:
        expected = self.hashes.get(fullname)
        return not self.pure and expected is not None and expected == source_hash(source)


def install() -> Finder:
    """Put the finder first on sys.meta_path (once); the package's __init__ calls it."""
    for finder in sys.meta_path:
        if isinstance(finder, Finder):
            return finder
    finder = Finder(recorded(), disabled())
    sys.meta_path.insert(0, finder)
    return finder


def describe() -> str:
    """One phrase for logs and reports: which build of the compiled modules this tree runs."""
    finder = install()
    if finder.pure:
        return f"pure Python ({ENV} is set)"
    if not finder.hashes:
        return "pure Python (not compiled: `make build` compiles it)"
    fresh = [name for name in sorted(finder.hashes) if finder.built(name)]
    stale = [name for name in sorted(finder.hashes) if name not in fresh]
    if not fresh:
        return f"pure Python (changed since compiled: {', '.join(stale)})"
    phrase = f"compiled: {', '.join(fresh)}"
    if stale:
        phrase += f" (as Python, changed since compiled: {', '.join(stale)})"
    return phrase
