"""Every header the mesh itself reads or writes (``x-meshlet-*``), in one place.

Names are lower case and pre-encoded: the request path compares raw header names
(lowered) with these bytes, and must not encode a name per request.
"""

from __future__ import annotations

# A response the mesh made (not the app) carries its reason (docs/limits.md).
ERROR_HEADER = b"x-meshlet-error"
# Set by the calling sidecar: the receiving one labels its metrics by caller and checks its
# AccessPolicy against it. Claimed, not verified: mTLS will verify it.
SOURCE_HEADER = b"x-meshlet-source"
# The time the caller has left, in milliseconds: a deadline kept across hops.
DEADLINE_HEADER = b"x-meshlet-deadline-ms"
# Which attempt of a request this is (0: the first), set by the calling sidecar on each try.
ATTEMPT_HEADER = b"x-meshlet-attempt"
# A response is a DestinationPolicy's fallback (the value says why: circuit-open).
FALLBACK_HEADER = b"x-meshlet-fallback"
# A response is an injected fault (a Route's fault.abort).
FAULT_HEADER = b"x-meshlet-fault"
# Asks the sidecar to explain a request (``1``); on the response, the explanation on one line.
EXPLAIN_HEADER = b"x-meshlet-explain"
# On an explained response: the id ``meshlet explain --request-id`` looks it up by.
ID_RESPONSE_HEADER = b"x-meshlet-request-id"

MESH_HEADERS = (
    ERROR_HEADER,
    SOURCE_HEADER,
    DEADLINE_HEADER,
    ATTEMPT_HEADER,
    FALLBACK_HEADER,
    FAULT_HEADER,
    EXPLAIN_HEADER,
    ID_RESPONSE_HEADER,
)
