"""meshlet.addresses: one HOST:PORT rule for endpoints, flags and registrations."""

from __future__ import annotations

import re

import pytest

from meshlet.addresses import check_address, parse_address


@pytest.mark.parametrize(
    ("text", "allow_zero", "expected"),
    [
        ("item:80", False, ("item", 80)),
        ("10.0.0.1:65535", False, ("10.0.0.1", 65535)),
        ("[::1]:8080", False, ("::1", 8080)),
        ("[2001:db8::1]:1", False, ("2001:db8::1", 1)),
        ("0.0.0.0:0", True, ("0.0.0.0", 0)),
        ("localhost:1", True, ("localhost", 1)),
        ("xn--bcher-kva.example:443", False, ("xn--bcher-kva.example", 443)),
        ("item:00080", False, ("item", 80)),
    ],
)
def test_parse_address(text: str, allow_zero: bool, expected: tuple[str, int]) -> None:
    assert parse_address(text, allow_zero=allow_zero) == expected


VISIBLE = "(a host is visible ASCII: no whitespace, control character or '/')"


@pytest.mark.parametrize(
    ("text", "allow_zero", "message"),
    [
        ("item", False, "'item' is not HOST:PORT"),
        (":80", False, "':80' is not HOST:PORT"),
        ("", False, "'' is not HOST:PORT"),
        ("item:", False, "'item:' has no valid port (1-65535)"),
        ("item:http", False, "'item:http' has no valid port (1-65535)"),
        ("item:0", False, "'item:0' has no valid port (1-65535)"),
        ("item:65536", False, "'item:65536' has no valid port (1-65535)"),
        ("item:-1", False, "'item:-1' has no valid port (1-65535)"),
        ("item:+80", False, "'item:+80' has no valid port (1-65535)"),
        ("item:８０", False, "'item:８０' has no valid port (1-65535)"),  # fullwidth: str.isdigit() says yes
        ("item:²", False, "'item:²' has no valid port (1-65535)"),
        ("item:000080", False, "'item:000080' has no valid port (1-65535)"),
        ("item:65536", True, "'item:65536' has no valid port (0-65535)"),
        ("10.0.0.1\r\nx:80", False, f"'10.0.0.1\\r\\nx:80' is not HOST:PORT {VISIBLE}"),
        ("a b:80", False, f"'a b:80' is not HOST:PORT {VISIBLE}"),
        ("item\x00:80", False, f"'item\\x00:80' is not HOST:PORT {VISIBLE}"),
        ("a/b:80", False, f"'a/b:80' is not HOST:PORT {VISIBLE}"),
        ("bücher.example:80", False, f"'bücher.example:80' is not HOST:PORT {VISIBLE}"),
        ("::1:8080", False, "'::1:8080' is not HOST:PORT (an IPv6 host goes in brackets, as [::1]:8080)"),
        ("[]:8080", False, "'[]:8080' has an empty host"),
    ],
)
def test_parse_address_refuses(text: str, allow_zero: bool, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        parse_address(text, allow_zero=allow_zero)


def test_check_address_keeps_the_text() -> None:
    assert check_address("[::1]:80") == "[::1]:80"
    for value in (8080, None, b"a:1", ["a:1"]):
        with pytest.raises(ValueError, match="is not HOST:PORT$"):
            check_address(value)
