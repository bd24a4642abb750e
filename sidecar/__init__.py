"""meshlet's data plane: the sidecar proxy."""

__version__ = "0.1.0"
