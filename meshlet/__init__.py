"""meshlet: a service mesh you install with pip.

This package is the contract the sidecar (``sidecar/``) and the control plane
(``control_plane/``) share and the only code both import: the push protocol (``wire``),
the policy schema and its loader (``policy``), the matching semantics that routing,
``meshlet apply``'s route tests and ``meshlet explain`` run (``routes``, ``access``,
``paths``), the rules every name, duration, address and endpoint follows wherever it is
written (``names``, ``durations``, ``addresses``, ``endpoints``, read from YAML with its lines
by ``yamlfile``), the mesh's own header names (``headers``), the shared non-blocking socket
I/O (``io``), and the ``meshlet`` command (``cli``), which is the one place that starts
either side.
"""

__version__ = "0.1.0"

# First: decides, for each compiled module, whether its extension or its .py runs (compiled.py).
from . import compiled as _compiled  # noqa: E402

_compiled.install()
