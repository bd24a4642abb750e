"""``HOST:PORT``, as every place that takes an address writes it: endpoints in policies
and in the static file, the sidecar's flags, and the addresses a sidecar registers. Pure.

A host is a name or an IPv4 address, or an IPv6 address in brackets (``[::1]:8080``: the
last colon is the port's). It is written into request lines and logs, so it holds
visible ASCII only: no space, CR, LF, NUL or other control character, nothing past ASCII
(an internationalised name is written in its ``xn--`` form), and no ``/``.
"""

from __future__ import annotations

import re

_HOST = re.compile(r"[\x21-\x2e\x30-\x7e]+")  # fullmatch: visible ASCII but '/'
_PORT = re.compile(r"[0-9]{1,5}")  # fullmatch; str.isdigit() would take '８０' and '²'


def parse_address(text: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port), the host without brackets;
    ValueError says what is wrong.

    ``allow_zero``: for listeners, port 0 asks the kernel for a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"{text!r} has an empty host")
    elif ":" in host:
        raise ValueError(f"{text!r} is not HOST:PORT (an IPv6 host goes in brackets, as [::1]:8080)")
    if not _HOST.fullmatch(host):
        raise ValueError(
            f"{text!r} is not HOST:PORT (a host is visible ASCII: no whitespace, control character or '/')"
        )
    low = 0 if allow_zero else 1
    if not _PORT.fullmatch(port) or not low <= int(port) <= 65535:
        raise ValueError(f"{text!r} has no valid port ({low}-65535)")
    return host, int(port)


def check_address(value: object) -> str:
    """An endpoint's ``HOST:PORT`` as written (a policy keeps the text)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not HOST:PORT")
    parse_address(value)
    return value
