"""Loading policy documents: YAML or JSON text into the schema's models (meshlet/schema.py),
with every problem reported at once as ``file:line: path.to.field: what is wrong
(allowed: ...)``, and each Route's embedded tests run with the sidecar's own matcher
(meshlet/routes.py). Pure but for :func:`read_policy_files`.

Validation is all or nothing: :func:`load_documents` returns the documents only if
every one of them is valid, else raises :class:`PolicyError` listing every problem.
"""

from __future__ import annotations

import pathlib
import types
import typing
from collections.abc import Iterable
from functools import partial
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from .problems import shown
from .routes import run_tests  # the sidecar's matcher, so tests mean what traffic gets
from .schema import KINDS, AccessPolicy, DestinationPolicy, Document, Route
from .yamlfile import LineMap, YamlError, load_all


class PolicyError(Exception):
    """Every problem found, each as ``file:line: path: what``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- loading ---------------------------------------------------------------------------------


def parse_text(text: str, filename: str) -> tuple[list[Any], list[LineMap]]:
    """The raw documents of a YAML (or JSON: YAML reads it) text, with their lines."""
    try:
        documents = load_all(text, filename)
    except YamlError as exc:
        raise PolicyError([exc.problem]) from None
    return [raw for raw, _ in documents], [lines for _, lines in documents]


def load_documents(sources: Iterable[tuple[str, str]]) -> list[Document]:
    """Validate every document of every (filename, text); all valid → the documents,
    else :class:`PolicyError` with every problem. Names must be unique per kind across
    all the sources (``file:line`` of both when not), and every Route's embedded tests
    must pass (the matcher is the sidecar's own, meshlet/routes.py)."""
    problems: list[str] = []
    out: list[Document] = []
    where: dict[tuple[str, ...], str] = {}  # (kind, name) or a _scope key → where it was first
    for filename, text in sources:
        try:
            raws, lines = parse_text(text, filename)
        except PolicyError as exc:
            problems += exc.problems
            continue
        for index, raw in enumerate(raws):
            doc, found = validate(raw, partial(_place, filename, lines, index))
            problems += sorted(found, key=partial(_line_of, len(filename)))
            if isinstance(doc, Route):
                failed = [
                    f"{_place(filename, lines, index, f'tests[{i}]')}: tests[{i}]: {what}" for i, what in run_tests(doc)
                ]
                if failed:
                    problems += failed
                    continue
            scope = _scope(doc)
            if scope is not None:
                field, key, one_per = scope
                here = _place(filename, lines, index, field)
                if key in where:
                    value = getattr(doc, field)
                    problems.append(f"{here}: {field}: {value!r} is already covered by {where[key]}; {one_per}")
                    continue
                where[key] = f"{doc.kind} {doc.name!r} (at {here})"  # type: ignore[union-attr]
            if doc is not None:
                key = (doc.kind, doc.name)
                here = _place(filename, lines, index, "name")
                if key in where:
                    problems.append(f"{here}: name: {doc.kind} {doc.name!r} is defined twice (first at {where[key]})")
                else:
                    where[key] = here
                    out.append(doc)
    if problems:
        raise PolicyError(problems)
    return out


def _scope(doc: Document | None) -> tuple[str, tuple[str, ...], str] | None:
    """What a document applies to, where only one of its kind may: (field, key, why).
    Two would leave the sidecar to guess which wins."""
    if isinstance(doc, Route):
        return "host", ("scope", "Route", doc.host), "one Route per host"
    if isinstance(doc, AccessPolicy):
        return "service", ("scope", "AccessPolicy", doc.service), "one AccessPolicy per service"
    if isinstance(doc, DestinationPolicy):
        if doc.rule is None:
            return (
                "service",
                ("scope", "DestinationPolicy", doc.service),
                "one DestinationPolicy per service (and per rule)",
            )
        return (
            "rule",
            ("scope", "DestinationPolicy", doc.service, doc.rule),
            "one DestinationPolicy per service and rule",
        )
    return None


def _place(filename: str, lines: list[LineMap], index: int, path: str) -> str:
    return f"{filename}:{lines[index].at(path)}"


def _line_of(prefix: int, problem: str) -> int:
    """The line of ``file:line: ...`` (sorting one document's problems by line)."""
    return int(problem[prefix + 1 :].partition(":")[0])


def validate(raw: Any, place: Any) -> tuple[Document | None, list[str]]:
    """One raw document → (the model, []) or (None, problems); ``place(path)`` says
    ``file:line`` for a path."""
    if not isinstance(raw, dict):
        return None, [f"{place('')}: (document): must be a mapping with 'kind' and 'name'"]
    kind = raw.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        allowed = ", ".join(KINDS)
        what = "missing" if kind is None else f"{kind!r} is not a kind"
        return None, [f"{place('kind')}: kind: {what} (allowed: {allowed})"]
    try:
        return model.model_validate(raw), []  # type: ignore[return-value]
    except ValidationError as exc:
        return None, [_problem(model, err, place) for err in exc.errors(include_url=False)]
    except RecursionError:
        return None, [f"{place('')}: (document): nested too deeply"]


def _problem(model: type[BaseModel], err: Any, place: Any) -> str:
    loc = [part for part in err["loc"] if not _is_tag(part)]
    path = _path_text(loc)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        what = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
    elif kind == "missing":
        what = "required"
    elif kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        what = f"{shown(err.get('input'))} is not allowed (allowed: {expected})"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        sign = {"greater_than_equal": "≥", "less_than_equal": "≤", "greater_than": ">", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "")
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        what = f"{shown(err.get('input'))} is out of range (must be {sign} {bound})"
    elif kind in ("too_short", "too_long"):
        what = err["msg"].replace("List", "the list").replace("String", "the text").lower()
    elif kind == "value_error":
        what = str(ctx.get("error", err["msg"]))
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        expected = {
            "dict": "a mapping",
            "list": "a list",
            "string": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "model": "a mapping",
        }.get(kind.split("_")[0], kind)
        what = f"must be {expected}, not {shown(err.get('input'))}"
    else:
        what = err["msg"]
    return f"{place(path)}: {path or '(document)'}: {what}"


def _is_tag(part: Any) -> bool:
    """Pydantic names a union member or a function validator in ``loc``: not a key."""
    return isinstance(part, str) and (part.startswith("function-") or part in {"str", "int", "float", "[key]"})


def _path_text(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The keys a mapping at ``loc`` inside ``model`` may have (when it is a model)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        else:
            args = typing.get_args(current)
            current = args[-1] if args else None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Optional[X] and Annotated[X, ...] → X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


__all__ = ["KINDS", "Document", "PolicyError", "load_documents", "parse_text", "validate"]


POLICY_SUFFIXES = (".yaml", ".yml", ".json")


def read_policy_files(path: pathlib.Path) -> list[tuple[str, str]]:
    """A file, or every .yaml/.yml/.json file of a directory (recursively, sorted), as
    (name, text). PolicyError when there is nothing to read."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in POLICY_SUFFIXES)
        if not files:
            raise PolicyError([f"{path}: no .yaml, .yml or .json files in this directory"])
    elif path.is_file():
        files = [path]
    else:
        raise PolicyError([f"{path}: no such file or directory"])
    out = []
    for file in files:
        try:
            out.append((str(file), file.read_text()))
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError([f"{file}: cannot read: {exc}"]) from None
    return out
