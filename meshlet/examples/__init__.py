"""The demo's example apps, shipped in the wheel so that ``meshlet demo`` runs from an install.

They stand for a user's services, not for the mesh: nothing in meshlet, the sidecar or the
control plane imports them. Run one as ``python -m meshlet.examples.services ROLE``.
"""
