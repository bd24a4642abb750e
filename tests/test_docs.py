"""The docs say what the code does: every answer the mesh makes itself, every metric either
side exports, every ``meshlet`` command and every ``x-meshlet-*`` header is named in
docs/reference.md; no doc names a metric nobody exports or a file the repository does not
hold, and no doc or comment points at an internal document users do not have.

The names come from the code as it runs (the reasons defined, the collectors' output, the
parser's commands), so a new one fails here until the reference page names it.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from meshlet.cli import build_parser
from sidecar import telemetry
from sidecar.core import errors

from .etcd_cluster import EtcdCluster

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (ROOT / "docs" / "reference.md").read_text()


def named(name: str) -> bool:
    """Is ``name`` written in the reference page as code (`name`)?"""
    return f"`{name}`" in REFERENCE


def test_every_reason_the_mesh_answers_with_is_in_the_error_table() -> None:
    reasons = [value for value in vars(errors).values() if isinstance(value, errors.Reason)]
    assert len(reasons) >= 10  # the module's reasons were found
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([a-z-]+)` \| ([0-9 /]+) \|", REFERENCE, re.MULTILINE)}
    for reason in reasons:
        assert reason.name in rows, f"{reason.name} has no row in docs/reference.md's error table"
        assert str(reason.status) in rows[reason.name].split(" / "), f"{reason.name} {reason.status}"
    assert rows.get("internal") == "500"  # the one reason sidecar/layers/errors.py makes on its own


def exported(text: str) -> set[str]:
    """The metric names a Prometheus text declares, as a query writes them."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE meshlet_")}


@pytest.fixture(scope="module")
def sidecar_metrics() -> set[str]:
    # One snapshot that has every family, those shown only with a configuration and a control plane too.
    names = exported(telemetry.render(lambda: [{"info": [("v1", 1)], "certificate_expiry": [(3600.0,)]}]).decode())
    assert len(names) >= 25
    return names


@pytest.fixture(scope="module")
def control_plane_metrics(tmp_path_factory: pytest.TempPathFactory, etcd1: EtcdCluster) -> set[str]:
    """What a running control plane's /metrics declares: a replica on etcd, which exports what a
    single control plane does and the replicas' own."""
    argv = [sys.executable, "-m", "meshlet", "control-plane", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"]
    argv += ["--data-dir", str(tmp_path_factory.mktemp("cp")), "--log-level", "warning"]
    argv += ["--store", f"etcd://{etcd1.endpoints[0].removeprefix('http://')}/test-docs"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:
        try:
            assert process.stdout is not None
            ready = process.stdout.readline()  # meshlet control-plane ready push=H:P api=H:P
            api = dict(item.partition("=")[::2] for item in ready.split() if "=" in item)["api"]
            text = httpx.get(f"http://{api}/metrics", timeout=10).text
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
    names = exported(text)
    assert len(names) >= 10 and all(n.startswith("meshlet_cp_") for n in names)
    return names


def test_every_metric_the_sidecar_exports_is_in_the_reference(sidecar_metrics: set[str]) -> None:
    assert sorted(n for n in sidecar_metrics if not named(n)) == []


def test_every_metric_the_control_plane_exports_is_in_the_reference(control_plane_metrics: set[str]) -> None:
    assert sorted(n for n in control_plane_metrics if not named(n)) == []


def test_every_metric_the_docs_name_is_exported(sidecar_metrics: set[str], control_plane_metrics: set[str]) -> None:
    """The other way round: no doc, nor the Grafana dashboard, names a metric nobody exports."""
    families = {re.sub(r"_total$", "", n) for n in sidecar_metrics | control_plane_metrics}
    pages = [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "docs" / "grafana-dashboard.json"]
    unknown = []
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for name in re.findall(r"\bmeshlet_[a-z0-9_]*[a-z0-9]", line):
                if re.sub(r"_(total|bucket|sum|count)$", "", name) not in families:
                    unknown.append(f"{page.relative_to(ROOT)}:{number}: {name}")
    assert unknown == []


def commands() -> list[str]:
    (action,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


@pytest.mark.parametrize("command", commands())
def test_every_command_is_in_the_reference(command: str) -> None:
    assert re.search(rf"^\| `meshlet {re.escape(command)}\b", REFERENCE, re.MULTILINE), command


def test_every_mesh_header_in_the_code_is_in_the_reference() -> None:
    sources = [p for package in ("meshlet", "sidecar", "control_plane") for p in (ROOT / package).rglob("*.py")]
    headers = {h for p in sources for h in re.findall(r"x-meshlet-[a-z0-9-]*[a-z0-9]", p.read_text())}
    assert "x-meshlet-error" in headers
    assert sorted(h for h in headers if not named(h)) == []


def test_no_doc_or_comment_points_at_documents_the_repository_does_not_hold() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    this = Path(__file__).relative_to(ROOT).as_posix()
    found = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if name == this or path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".html") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"PRODUCT(\.md)? ?§|\bshared/(reference|PRODUCT)", line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == []


def test_every_file_the_docs_name_is_in_the_repository() -> None:
    """A path in a doc (``sidecar/core/errors.py``, or ``core/errors.py`` inside a package)
    names a file that exists. CHANGELOG.md is left out: it names what was, too."""
    pages = [*(ROOT / "docs").glob("*.md"), *(ROOT / name for name in ("README.md", "CONTRIBUTING.md"))]
    pages += [ROOT / "examples" / "README.md", ROOT / "benchmarks" / "README.md"]
    path = re.compile(r"(?<![\w./-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|yaml|yml|json|html|toml))")
    missing = []
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for name in path.findall(line):
                places = [ROOT, page.parent, ROOT / "sidecar", ROOT / "control_plane", ROOT / "meshlet"]
                if not any((place / name).exists() for place in places):
                    missing.append(f"{page.relative_to(ROOT)}:{number}: {name}")
    assert missing == []
