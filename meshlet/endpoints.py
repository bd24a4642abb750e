"""The fields of a service's endpoints, as a ``Service`` policy and the static file both
write them. Pure, and without pydantic: the sidecar checks its static file with these
functions at start, and the policy schema (meshlet/schema.py) calls the same ones from
its fields, so the two accept and refuse the same documents.

An endpoint is ``HOST:PORT`` (meshlet/addresses.py), or a mapping with ``address`` and
optionally ``labels`` and ``weight``. Each ``check_*`` returns the value to keep or
raises ValueError saying what is wrong; ``None`` (a key written with nothing after it)
is the same as leaving the key out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SERVICE_KEYS = ("endpoints", "connect_timeout", "timeout", "mtls", "protocol")
ENDPOINT_KEYS = ("address", "labels", "weight")

# An endpoint's share of the traffic, relative to the others' (the balancers divide by it):
# a whole number, so that round robin can give it that many turns.
MIN_WEIGHT = 1
MAX_WEIGHT = 1000
DEFAULT_WEIGHT = 1

MAX_LABEL_LENGTH = 63  # a label's name and its value, as Kubernetes labels

# What an app's port speaks, where declared (a Service's ``protocol``, the sidecar's
# --app-protocol, a registration): HTTP/1.1, HTTP/2, gRPC, or opaque TCP (bytes spliced,
# never parsed: server-first protocols such as MySQL or Redis). Undeclared: detected.
PROTOCOLS = ("http1", "http2", "grpc", "tcp")


def check_protocol(value: object) -> str:
    """A declared protocol; ``None`` (not given) is "" (undeclared)."""
    if value is None:
        return ""
    if value not in PROTOCOLS:
        raise ValueError(f"{_shown(value)} is not a protocol (one of {', '.join(PROTOCOLS)})")
    return str(value)


def check_endpoint_list(value: object) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("must be a list of HOST:PORT or {address, labels, weight}")
    return value


def endpoint_mapping(value: object) -> Mapping[Any, Any]:
    """The mapping form of one endpoint (``HOST:PORT`` is short for ``{address: HOST:PORT}``)."""
    if isinstance(value, str):
        return {"address": value}
    if not isinstance(value, Mapping) or "address" not in value:
        raise ValueError("an endpoint is HOST:PORT or a mapping with 'address'")
    return value


def check_weight(value: object) -> int:
    if value is None:
        return DEFAULT_WEIGHT
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise ValueError(f"{_shown(value)} is not a weight (an integer from {MIN_WEIGHT} to {MAX_WEIGHT})")
    return value


def check_labels(value: object) -> dict[str, str]:
    """Labels: names of 1 to 63 characters, values of at most 63, both strings (a YAML
    ``version: 2`` is a number: write ``version: "2"``)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping of label to value")
    for name, text in value.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_LABEL_LENGTH:
            raise ValueError(f"{_shown(name)} is not a label name (a string of 1 to {MAX_LABEL_LENGTH} characters)")
        if not isinstance(text, str) or len(text) > MAX_LABEL_LENGTH:
            raise ValueError(f"{name}: {_shown(text)} is not a label value (a string of at most {MAX_LABEL_LENGTH})")
    return dict(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
