"""meshlet.names: one rule per kind of name, fullmatched (no trailing newline gets by)."""

from __future__ import annotations

import pytest

from meshlet.names import (
    check_header_name,
    check_instance_id,
    check_policy_name,
    check_service_name,
    is_service_name,
)

GOOD_SERVICES = ["a", "item", "item-2", "0", "a" * 63, "a-b-c"]
BAD_SERVICES = [
    "",
    "Item",
    "-item",
    "item-",
    "it_em",
    "a" * 64,
    "item\n",
    "item\r\n",
    "item\x00",
    "it.em",
    "ítem",
    42,
    None,
]


@pytest.mark.parametrize("name", GOOD_SERVICES)
def test_service_names(name: str) -> None:
    assert is_service_name(name)
    assert check_service_name(name) == name


@pytest.mark.parametrize("name", BAD_SERVICES)
def test_not_service_names(name: object) -> None:
    assert not is_service_name(name)
    with pytest.raises(ValueError) as info:
        check_service_name(name)
    assert str(info.value) == f"{name!r} is not a service name (a DNS label: a-z, 0-9, '-', at most 63)"


@pytest.mark.parametrize("name", ["a", "item-retries", "item.v2", "a" * 253])
def test_policy_names(name: str) -> None:
    assert check_policy_name(name) == name


@pytest.mark.parametrize("name", ["", "Item", ".item", "item.", "a" * 254, "r\n", "a b", 7])
def test_not_policy_names(name: object) -> None:
    with pytest.raises(ValueError, match=r"is not a name \(a-z, 0-9, '-', '\.', at most 253\)$"):
        check_policy_name(name)


@pytest.mark.parametrize(
    ("name", "lowered"), [("X-Request-Id", "x-request-id"), ("a!#$%&'*+.^_`|~9", "a!#$%&'*+.^_`|~9")]
)
def test_header_names_are_tokens_compared_lower_case(name: str, lowered: str) -> None:
    assert check_header_name(name) == lowered


@pytest.mark.parametrize("name", ["", "x a", "x:a", "x\r\n", "x\n", "ä", None, "(x)"])
def test_not_header_names(name: object) -> None:
    with pytest.raises(ValueError, match="is not a header name$"):
        check_header_name(name)


@pytest.mark.parametrize("instance_id", ["item-10.0.0.1-15006", "item:1", "ü"])
def test_instance_ids(instance_id: str) -> None:
    assert check_instance_id(instance_id) == instance_id


@pytest.mark.parametrize(
    ("instance_id", "message"),
    [
        ("", "instance_id is empty"),
        ("item/1", "instance_id 'item/1' contains '/', whitespace or a control character"),
        ("item 1", "contains '/', whitespace"),
        ("item\n", "contains '/', whitespace"),
        ("item\x7f", "contains '/', whitespace"),
        (3, "instance_id must be a string, not int"),
    ],
)
def test_not_instance_ids(instance_id: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_instance_id(instance_id)
