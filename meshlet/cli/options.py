"""What every ``meshlet`` command shares: argument types, and options that can also come
from ``MESHLET_<OPTION>`` environment variables (containers are configured by environment).

An argument type checks a value with the same rule a file or policy would (meshlet/names.py,
addresses.py, durations.py), so a flag, its variable and a config file never disagree, and a
bad value is refused by argparse, naming the flag (or the variable)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from meshlet.addresses import parse_address
from meshlet.durations import parse_duration
from meshlet.names import check_instance_id, check_service_name

T = TypeVar("T")


def _argument_type(check: Callable[[str], T]) -> Callable[[str], T]:
    """``check``'s ValueError as argparse's refusal of the value."""

    def convert(text: str) -> T:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


address = _argument_type(parse_address)
listen_address = _argument_type(functools.partial(parse_address, allow_zero=True))  # port 0: any free port
duration = _argument_type(parse_duration)  # 250ms, 2s, 1m, 1h or seconds
service_name = _argument_type(check_service_name)
instance_id = _argument_type(check_instance_id)


def upstream(text: str) -> tuple[str, tuple[str, int]]:
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=HOST:PORT, e.g. item=127.0.0.1:9001")
    return name, listen_address(address)


def env_name(action: argparse.Action) -> str:
    """--control-plane → MESHLET_CONTROL_PLANE."""
    return "MESHLET_" + action.option_strings[-1].lstrip("-").replace("-", "_").upper()


def defaults_from_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Every option of ``parser`` can also come from ``MESHLET_<OPTION>`` (containers are
    configured by environment): the variable becomes the option's default, so a flag given
    on the command line still wins. A repeatable option takes a comma-separated list; a
    switch takes 1/true/yes or 0/false/no. A bad value is refused as the flag would be,
    naming the variable."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        name = env_name(action)
        if action.help is not None:
            action.help += f" (env {name})"
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            action.default = _env_value(action, raw)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            # Reported when this command runs, not when another one does: the variables of
            # every command are read, and a container's MESHLET_TIMEOUT for `wait-ready`
            # must not stop `meshlet sidecar`.
            action.default = BadEnvironment(f"{name}={raw!r}: {exc}")
        action.required = False


class BadEnvironment:
    """The default of an option whose MESHLET_ variable holds a value it refuses."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return self.message


class MeshletParser(argparse.ArgumentParser):
    """Refuses, naming the variable, a bad MESHLET_ value of the command being run."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, rest = super().parse_known_args(args, namespace)
        for value in vars(parsed).values():
            if isinstance(value, BadEnvironment):
                self.error(value.message)
        return parsed, rest


def _env_value(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        lowered = raw.strip().lower()
        if lowered not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError("expected 1/true/yes or 0/false/no")
        return lowered in ("1", "true", "yes")
    convert = action.type or str
    if isinstance(action, argparse._AppendAction):
        return [convert(item.strip()) for item in raw.split(",") if item.strip()]  # type: ignore[operator]
    value = convert(raw)  # type: ignore[operator]
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value
