"""meshlet.headers: every mesh header name is defined there, once, as the request path
compares it (lower-case bytes)."""

from __future__ import annotations

import re
from pathlib import Path

from meshlet import headers
from meshlet.names import HEADER_NAME

ROOT = Path(__file__).resolve().parents[2]


def test_every_mesh_header_is_a_lower_case_token_named_once() -> None:
    names = [value for key, value in vars(headers).items() if key.endswith("_HEADER")]
    assert sorted(names) == sorted(headers.MESH_HEADERS)
    assert len(set(names)) == len(names)
    for name in names:
        assert isinstance(name, bytes) and name.startswith(b"x-meshlet-")
        assert name == name.lower() and HEADER_NAME.fullmatch(name.decode("ascii"))


def test_no_other_module_spells_a_mesh_header() -> None:
    """A second spelling would drift from this one (a renamed header, a typo)."""
    spelled = re.compile(r"""b?["']x-meshlet-""")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in ("sidecar", "control_plane", "meshlet")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "meshlet" / "headers.py"
        and "examples" not in path.parts  # the demo's apps: they name a header as any app would
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert found == []
