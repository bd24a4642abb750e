"""meshlet's data plane: the sidecar proxy."""

import meshlet  # noqa: F401  (first: its finder picks each compiled module's extension or .py)
