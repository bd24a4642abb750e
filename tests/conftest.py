"""The test suite. Its layout mirrors the source tree:

    tests/meshlet/          the contract package: wire protocol, policy schema, matching, the CLI,
                            the process launcher (meshlet/processes.py)
    tests/sidecar/core/     the pure core: table-driven and hypothesis tests, no sockets, no clock
    tests/sidecar/layers/   the request-path layers, over fake upstreams in one trio run
    tests/sidecar/net/      the trio shell on real sockets (and a sidecar process where needed)
    tests/sidecar/          what spans the sidecar (telemetry names, propagation)
    tests/control_plane/    registry, store, push server, API, explain, traces
    tests/integration/      real processes on 127.0.0.1: a control plane, sidecars, origins
    tests/bench/            the benchmarks still run (no timing asserted)
    tests/test_*.py         whole-repository checks (the Docker image, ...)

A test of ``pkg/mod.py`` goes in ``tests/pkg/test_mod.py``; one that starts processes goes in
tests/integration/ (or next to the unit it exercises, as tests/sidecar/net/ does).

Shared pieces:
    fixtures here       ``origin`` (a tests/origin.py app on its own port), ``mesh`` (a
                        tests/mesh.py Mesh: ``await mesh.control_plane()``, ``await
                        mesh.sidecar("user", app=...)``, ``await mesh.origin()``,
                        ``await mesh.apply(policy)``; every process stopped at teardown);
                        pytest-trio's ``nursery`` and pytest's ``tmp_path``; ``etcd1`` (one
                        etcd member per module) and ``etcd3`` (three per test), both
                        tests/etcd_cluster.py clusters
    tests/helpers.py    one meshlet process at a time (``run_sidecar``, ``run_control_plane``,
                        ``run_meshlet``, the synchronous ``sidecar_process``), ``write_static``,
                        ``raw_exchange`` (bytes on a socket), ``sample`` (a Prometheus metric)
    tests/origin.py     the app behind a sidecar, written with h11 (an independent HTTP/1.1);
                        tests/token_app.py the token-echo app; tests/netns.py network namespaces
    need(binary)        a real component from PATH, or a skip (a failure in CI, where
                        MESHLET_REQUIRE_ALL=1)

Every process is started by meshlet/processes.py: its own process group, its ports from its
ready line, its log quoted when it fails to start, a traceback in its log failing the test,
SIGTERM then SIGKILL at the end. Tests are trio functions (``trio_mode``); they assert on
counts and states, never on timings.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from .etcd_cluster import EtcdCluster, running_etcd_cluster
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


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for a whole test module: each test keeps to a key prefix of its own."""
    with running_etcd_cluster(tmp_path_factory.mktemp("etcd1"), members=1) as cluster:
        yield cluster
        print(cluster.logs())  # captured: shown if the module's last test fails


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members for one test (it may kill and restart them)."""
    with running_etcd_cluster(tmp_path / "etcd3", members=3) as cluster:
        yield cluster
        print(cluster.logs())  # captured: shown when the test fails
