"""What a name may be: services, policies, header names and instance ids. Pure.

One copy of each rule, for everything that accepts a name: the static file and the
control plane's registry, the policy schema, the sidecar's flags and the names a
sidecar is pushed. Each ``check_*`` returns the name or raises ValueError saying what
a name may be, in words a user can act on.
"""

from __future__ import annotations

import re
from typing import TypeGuard

# Matched with fullmatch: "$" would let a trailing newline through.
SERVICE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # a DNS label (RFC 1123), as Kubernetes
POLICY_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")  # a DNS subdomain, as Kubernetes object names
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
# Instance ids become store keys and log fields: anything but '/', blanks and control characters.
_NOT_IN_AN_INSTANCE_ID = re.compile(r"[\s/\x00-\x1f\x7f]")


def is_service_name(name: object) -> TypeGuard[str]:
    """A service name is a DNS label, lower case: ``a-z``, ``0-9`` and ``-``, 1 to 63
    characters, starting and ending with a letter or digit."""
    return isinstance(name, str) and SERVICE_NAME.fullmatch(name) is not None


def check_service_name(name: object) -> str:
    if not is_service_name(name):
        raise ValueError(f"{name!r} is not a service name (a DNS label: a-z, 0-9, '-', at most 63)")
    return name


def check_policy_name(name: object) -> str:
    if not isinstance(name, str) or not POLICY_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a name (a-z, 0-9, '-', '.', at most 253)")
    return name


def check_header_name(name: object) -> str:
    """A header name (a token), lower-cased: header names are case-insensitive."""
    if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a header name")
    return name.lower()


def check_instance_id(instance_id: object) -> str:
    if not isinstance(instance_id, str):
        raise ValueError(f"instance_id must be a string, not {type(instance_id).__name__}")
    if not instance_id:
        raise ValueError("instance_id is empty")
    if _NOT_IN_AN_INSTANCE_ID.search(instance_id):
        raise ValueError(f"instance_id {instance_id!r} contains '/', whitespace or a control character")
    return instance_id
