"""meshlet's data plane: the sidecar proxy."""
