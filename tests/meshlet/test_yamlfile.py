"""meshlet.yamlfile: YAML values with the line of every path, for ``file:line: path: what``."""

from __future__ import annotations

import pytest

from meshlet.yamlfile import YamlError, load_all, load_one

TEXT = """\
services:
  item:
    endpoints:
      - a:1
      - address: b:2
        weight: 3
  cart: [c:1]
"""


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("", 1),
        ("services", 1),
        ("services.item", 2),
        ("services.item.endpoints", 3),
        ("services.item.endpoints[0]", 4),
        ("services.item.endpoints[1]", 5),
        ("services.item.endpoints[1].weight", 6),
        ("services.cart", 7),
        ("services.cart[0]", 7),
        # A path the file does not have is at its nearest enclosing one.
        ("services.item.endpoints[1].labels", 5),
        ("services.item.endpoints[7]", 3),
        ("services.item.timeout", 2),
        ("nowhere", 1),
    ],
)
def test_every_path_has_its_line(path: str, line: int) -> None:
    value, lines = load_one(TEXT, "f.yaml")
    assert value["services"]["item"]["endpoints"][1] == {"address": "b:2", "weight": 3}
    assert lines.at(path) == line


def test_a_short_form_read_as_the_long_one_keeps_its_lines() -> None:
    _, lines = load_one(TEXT, "f.yaml")
    lines.alias("services.cart.endpoints", "services.cart")
    assert lines.at("services.cart.endpoints") == 7
    assert lines.at("services.cart.endpoints[0]") == 7


def test_an_alias_is_at_its_anchor_and_may_contain_itself() -> None:
    value, lines = load_one("a: &x [1, *x]\nb: *x\n", "f.yaml")
    assert value["b"] is value["a"]
    assert (lines.at("a[1]"), lines.at("b")) == (1, 2)


def test_every_document_of_a_stream_and_no_empty_one() -> None:
    documents = load_all("kind: A\n---\n---\nkind: B\nname: b\n---\n", "p.yaml")
    assert [value for value, _ in documents] == [{"kind": "A"}, {"kind": "B", "name": "b"}]
    assert [lines.at("name") for _, lines in documents] == [1, 5]


def test_an_empty_text_is_none() -> None:
    assert load_one("", "f.yaml")[0] is None
    assert load_one("# nothing\n", "f.yaml")[0] is None
    assert load_all("", "f.yaml") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: [1\n", "f.yaml:2: not valid YAML: expected ',' or ']', but got '<stream end>'"),
        ("a: b: c\n", "f.yaml:1: not valid YAML: mapping values are not allowed here"),
        ("? [a]\n: 1\n", "f.yaml:1: not valid YAML: found unhashable key"),
        ("a: 1\n---\nb: 2\n", "f.yaml:2: not valid YAML: but found another document"),
        ("a: 2001-02-30\n", "f.yaml:1: not valid YAML: day is out of range for month"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "f.yaml:1: not valid YAML: maximum recursion depth exceeded"),
    ],
)
def test_what_is_not_yaml_is_one_problem_with_its_line(text: str, problem: str) -> None:
    with pytest.raises(YamlError) as info:
        load_one(text, "f.yaml")
    assert info.value.problem.startswith(problem)
