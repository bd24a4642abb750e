from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from .mesh import Mesh, open_mesh
from .origin import Origin


@pytest.fixture
async def origin(nursery: trio.Nursery) -> AsyncIterator[Origin]:
    app = Origin()
    await nursery.start(app.serve)
    yield app


def need(binary: str) -> str:
    """The path of a real component, or a skip (a failure under MESHLET_REQUIRE_ALL=1)."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed (Debian package: see the package list in .ci/run)"
        if os.environ.get("MESHLET_REQUIRE_ALL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
async def mesh(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Mesh]:
    """A mesh for one test (tests/mesh.py): its processes stopped when the test ends."""
    async with open_mesh(tmp_path, nursery) as mesh:
        yield mesh
