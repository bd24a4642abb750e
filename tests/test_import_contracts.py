"""The import contracts (pyproject.toml's [tool.importlinter], checked by `lint-imports` in
`make lint`) cover the whole contract package: a module added to meshlet/ later must be
listed too, or this fails."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# They start the sidecar and the control plane, so they import both: not contract modules; and
# the demo's apps, which are apps in the mesh (they use sidecar.propagation).
STARTERS = ("meshlet.cli", "meshlet.demo", "meshlet.__main__", "meshlet.examples")


def contract(contract_id: str) -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (found,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == contract_id]
    return dict(found)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_contract_module_is_forbidden_to_import_either_side() -> None:
    modules = {module_name(path) for path in (ROOT / "meshlet").rglob("*.py")}
    contract_modules = {m for m in modules if not any(m == s or m.startswith(f"{s}.") for s in STARTERS)}
    listed = contract("contract")["source_modules"]
    assert isinstance(listed, list)
    assert set(listed) == contract_modules, "pyproject.toml: list meshlet's contract modules in the contract"
