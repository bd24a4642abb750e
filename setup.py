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

# Measured with benchmarks/micro_path.py, one module compiled at a time and all together: on
# CPython 3.11 compiled plain Python reads an attribute slower than the specializing interpreter
# does (a generic lookup against an inline cache), and gains on calls, coroutine chains and
# callbacks from C. The modules below gain or break even; the attribute-heavy rest of the
# path (the pool, the downstream loop, Request and Response) lost up to half again, so stays
# Python until its classes get typed declarations (.pxd).
HOT_MODULES = [
    "sidecar.core.breaker",
    "sidecar.core.http1",
    "sidecar.core.outlier",
    "sidecar.core.retry",
    "sidecar.layers.errors",
    "sidecar.layers.inbound",
    "sidecar.layers.metrics",
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
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extensions() -> list[Extension]:
    if os.environ.get("MESHLET_NO_EXTENSIONS", "") not in ("", "0"):
        say("MESHLET_NO_EXTENSIONS is set: installing the pure-Python build")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        say("Cython is not installed: installing the pure-Python build (slower per request)")
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
