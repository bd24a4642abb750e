"""How a problem names the value it refuses: short, and as the user wrote it in YAML or
JSON (``true``, ``null``, ``[1, 2]``; a string quoted)."""

from __future__ import annotations

import json

LONGEST = 40  # characters of a value shown in a problem; a longer one is cut with "..."


def shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= LONGEST else text[: LONGEST - 3] + "..."
