"""The last good configuration on disk: a sidecar restarted while the control plane is
away serves from it (fail-static across restarts). With the policies goes the id of the
control-plane store they came from, so a restarted sidecar still refuses to let a control plane
on another store remove them (sidecar/core/store_conflict.py).

Instances of one service on one host share the file (any one's configuration serves the
next to start, whose port and so default id may differ), so each writes its own temporary
file and renames it over the old one: a reader sees one whole configuration or the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from ..core.discovered import PushedConfig

log = logging.getLogger("meshlet.control")


def read_last_good(path: Path) -> PushedConfig | None:
    """The configuration persisted at ``path``; None when there is none, or it cannot be
    read (logged: the sidecar then waits for the control plane)."""
    if not path.exists():
        return None
    try:
        return PushedConfig.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("ignoring unreadable persisted config %s: %s", path, exc)
        return None


def write_last_good(path: Path, config: PushedConfig) -> None:
    """Write ``config`` to ``path`` atomically. Best effort: a failure is logged, and the
    running configuration is unaffected."""
    data = json.dumps(config.to_json())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("could not persist the last good config to %s: %s", path, exc)


__all__ = ["read_last_good", "write_last_good"]
