"""Compiles the sidecar's per-request modules with Cython; everything else is in pyproject.toml.

The modules below are ordinary Python: Cython compiles the same .py files (no .pyx copies),
with directives that keep Python's semantics (annotations stay annotations, functions stay
introspectable). Where a module cannot be compiled (no C compiler, no Python headers, no
Cython) the install goes on without it and says so in one line: the .py runs instead.
``MESHLET_NO_EXTENSIONS=1`` at install time skips the compilation altogether.

Each compiled module's source hash is recorded in meshlet/_compiled.txt; at run time
meshlet.compiled loads an extension only when its .py still has that hash (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# What is compiled: only what measured no slower. On CPython 3.11 Cython's plain-Python build
# reads an attribute through a generic lookup where the specializing interpreter has an
# inline cache, and resumes a chain of coroutines no faster: the whole request path compiled
# (27 modules) cost ~50% more CPU in benchmarks/micro_path.py, and the errors, inbound and
# metrics layers with the breaker, outlier and retry modules ~5% more per request through a
# real sidecar; routing and paths were slower alone. The header rules gain alone (0.7 against
# 1.0 µs forwarding a request's headers) and in benchmarks/micro_path.py, yet through a real
# sidecar they measured 2-3% more CPU a request with the reader than the reader alone: left
# out until a longer run settles it. The HTTP/1.1 reader alone, as plain Python compiled, was
# within the noise through a real sidecar; with http1.pxd (the readers as extension types
# with typed attributes, so llhttp's callbacks write a C struct) it costs 0-3% less CPU a
# request than its .py through one sidecar, 3-4% through two, 13% in micro_path.py. Other modules may
# pay the same way, with a .pxd for their hot classes; measure each both ways
# (docs/architecture.md).
HOT_MODULES = [
    "sidecar.core.http1",
]

# Python's semantics, compiled: no C types from annotations (a `float` annotation would become
# a C double, `list[...]` an exact type check), functions that bind and introspect as Python's.
DIRECTIVES = {"language_level": 3, "binding": True, "annotation_typing": False}

CYTHONIZE = {"compiler_directives": DIRECTIVES, "build_dir": "build/cython", "quiet": True}

MANIFEST = Path("meshlet") / "_compiled.txt"
HASHES: dict[str, str] = {}


def say(line: str) -> None:
    print(f"meshlet: {line}", file=sys.stderr, flush=True)


def source_of(module: str) -> Path:
    return Path(*module.split(".")).with_suffix(".py")


def source_hash(path: Path) -> str:
    """The .py, then the .pxd beside it if any (meshlet/compiled.py hashes the same way)."""
    declarations = path.with_suffix(".pxd")
    extra = declarations.read_bytes() if declarations.exists() else b""
    return hashlib.sha256(path.read_bytes() + extra).hexdigest()


def extensions() -> list[Extension]:
    if os.environ.get("MESHLET_NO_EXTENSIONS", "") not in ("", "0"):
        say("MESHLET_NO_EXTENSIONS is set: installing the pure-Python build")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        say("Cython is not installed: installing the pure-Python build")
        return []
    # One module at a time: a module Cython cannot translate runs as Python; the others compile.
    compiled = []
    for name in HOT_MODULES:
        source = source_of(name)
        digest = source_hash(source)  # of the source translated now, not of a later edit
        try:
            compiled += cythonize([Extension(name, [str(source)])], **CYTHONIZE)
        except Exception as exc:  # Cython's errors share no base class; it has printed the details
            say(f"{name} not compiled: Cython could not translate it ({exc})")
            continue
        HASHES[name] = digest
    return compiled


class BuildExt(build_ext):
    """build_ext that skips a module it cannot compile, and records what it compiled."""

    def initialize_options(self) -> None:
        super().initialize_options()
        self.failed: list[str] = []

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        super().run()
        self._write_manifest()
        if self.failed:
            say(
                f"could not compile {len(self.failed)} of {len(self.extensions)} modules "
                f"({', '.join(sorted(self.failed))}): they run as Python (it takes gcc and the Python headers)"
            )

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # CCompilerError, CompileError, no compiler at all: the same here
            self.failed.append(ext.name)
            say(f"{ext.name} not compiled: {exc}")

    # What an install copies (an editable one too) is what was built.
    def copy_extensions_to_source(self) -> None:
        with self._only_built():
            super().copy_extensions_to_source()

    def get_outputs(self) -> list[str]:
        with self._only_built():
            return super().get_outputs()

    def get_output_mapping(self) -> dict[str, str]:
        with self._only_built():
            return super().get_output_mapping()

    @contextmanager
    def _only_built(self) -> Iterator[None]:
        every = self.extensions
        self.extensions = [ext for ext in every if ext.name not in self.failed]
        try:
            yield
        finally:
            self.extensions = every

    def _write_manifest(self) -> None:
        # Beside the extensions: the source tree for an editable install, the wheel's tree otherwise.
        target = MANIFEST if self.inplace else Path(self.build_lib) / MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        built = [ext.name for ext in self.extensions if ext.name not in self.failed]
        target.write_text("".join(f"{name} {HASHES[name]}\n" for name in built))


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
