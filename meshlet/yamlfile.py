"""YAML (and JSON, which YAML reads) with the line each value starts on, so that a problem
is reported as ``file:line: path.to.field: what is wrong``. Pure: text in, values out.

A path is written as users see it in the file: ``services.item.endpoints[0].address``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import yaml


class YamlError(Exception):
    """The text is not YAML; ``problem`` is ``file:line: not valid YAML: what``."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class LineMap:
    """Where each path of one document starts: path → line (1-based)."""

    def __init__(self, node: yaml.Node | None = None) -> None:
        self.lines: dict[str, int] = {}
        if node is not None:
            self._walk(node, "", set())

    def _walk(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)  # a key's own line wins over its value's
        if id(node) in seen:  # an alias: walked where its anchor is (it may contain itself)
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                self.lines[sub] = key.start_mark.line + 1
                self._walk(value, sub, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, f"{path}[{i}]", seen)

    def alias(self, path: str, same_as: str) -> None:
        """``path`` and what is under it are at the lines of ``same_as`` (for a short form
        read as the long one: ``item: [a:1]`` is ``item: {endpoints: [a:1]}``)."""
        for known, line in list(self.lines.items()):
            if known == same_as or known.startswith(same_as + "["):
                self.lines[path + known[len(same_as) :]] = line

    def at(self, path: str) -> int:
        """The line of ``path``, or of the nearest enclosing path the file has."""
        while True:
            line = self.lines.get(path)
            if line is not None or not path:
                return line or 1
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""


def load_all(text: str, filename: str) -> list[tuple[Any, LineMap]]:
    """Every document of ``text`` with its lines; empty documents (a trailing ``---``,
    two in a row) are left out, as kubectl does. YamlError when the text is not YAML."""
    with _as_yaml_error(filename):
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        values = list(yaml.safe_load_all(text))
    # An empty document is a null scalar node, not None: it is known by its value.
    return [(value, LineMap(node)) for node, value in zip(nodes, values, strict=True) if value is not None]


def load_one(text: str, filename: str) -> tuple[Any, LineMap]:
    """The one document of ``text`` (None when empty) with its lines. YamlError when the
    text is not YAML or holds several documents."""
    with _as_yaml_error(filename):
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        value = yaml.safe_load(text)
    return value, LineMap(node)


@contextlib.contextmanager
def _as_yaml_error(filename: str) -> Iterator[None]:
    """Every way PyYAML refuses a text, as one YamlError with the file and line."""
    try:
        yield
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise YamlError(f"{filename}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except (ValueError, RecursionError) as exc:  # 2001-02-30, a 5,000-digit int, deep nesting
        raise YamlError(f"{filename}:1: not valid YAML: {exc}") from None
