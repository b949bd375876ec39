"""Command-line flags generated from the config dataclasses, so that a setting's name, type,
default, choices and help are written once, in its dataclass field.

Why not a library built for this (typer, tyro, simple-parsing): the configs are flat and their
types simple (numbers, strings, `Literal` choices, optional lists), argparse is already what the
CLI is written in, and every such library brings its own flag spelling or nesting and start-up
cost to a CLI that must refuse bad input before it imports torch. What is generated:

- `--<field-name>` with `-` for `_`; its type from the annotation (`int`, `float`, `str`,
  `Literal[...]` as choices, `bool` as a switch, lists comma-separated);
- the help from the field's trailing comment, with the default (or "default: none");
- `argparse.SUPPRESS` as the parsed default, so the values a command receives are exactly the
  flags given, and the dataclass keeps its defaults for the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal

from .sora.config import PRESETS

_COMMENT = re.compile(r"^    (\w+): [^#]*#\s*(.+)$")


def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the source of `cls` (the field's doc)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen install): flags without help
        return {}
    return {m[1]: m[2].strip() for line in source.splitlines() if (m := _COMMENT.match(line))}


def _parse_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_target_modules(value: str) -> str | list[str]:
    """A preset's name (`all`, `attention`, `qkv`, `qk`) or a regular expression (regex syntax) as
    given, else a comma-separated list of names."""
    if value in PRESETS or re.search(r"[*\\\[\](|^$+?]", value):
        return value
    return _parse_list(value)


def _kind(annotation: Any) -> tuple[Any, tuple | None]:
    """The argparse `type` and the choices of an annotation, `None` and unions of it taken off."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if str in options and any(typing.get_origin(a) is list for a in options):
            return parse_target_modules, None  # a regex or a list of names
        words = [a for a in options if typing.get_origin(a) is Literal]
        if words and len(options) == 2:  # a number or a word, such as `0.5` or `auto`
            number = next(a for a in options if a not in words)
            return _number_or(number, typing.get_args(words[0])), None
        return _kind(options[0])
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0]), typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        item = typing.get_args(annotation)[0]
        return (_parse_list if item is str else _list_of(item)), None
    return annotation, None


def _list_of(item: type):
    """An argparse type taking a comma-separated list of `item`s, such as `0.2,0.4`."""

    def parse(value: str) -> list:
        return [item(part) for part in _parse_list(value)]

    parse.__name__ = f"comma-separated {item.__name__}s"  # argparse's error names it
    return parse


def _number_or(number: type, words: tuple[str, ...]):
    """An argparse type taking one of `words`, else a `number`."""

    def parse(value: str):
        return value if value in words else number(value)

    parse.__name__ = f"{number.__name__} or {' or '.join(words)}"  # argparse's error names it
    return parse


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_flags(
    group: argparse._ActionsContainer,
    cls: type,
    fields: typing.Iterable[str] | None = None,
) -> None:
    """Add a flag for each of `fields` of the dataclass `cls` (all by default) to `group`.

    Args:
        group: A parser or an argument group.
        cls: The dataclass.
        fields: Which fields, in this order.

    Each flag's `dest` is its field name.
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in fields if fields is not None else list(by_name):
        field = by_name[name]
        kind, choices = _kind(hints[name])
        default = field.default if field.default is not dataclasses.MISSING else None
        text = helps.get(name, "")
        option = flag(name)
        if kind is bool:
            group.add_argument(
                option,
                dest=name,
                action="store_true",
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            if default is None and text.startswith("none:"):  # the comment says what none does
                suffix = ""
            else:
                suffix = f" (default: {'none' if default is None else default})"
            group.add_argument(
                option,
                dest=name,
                type=kind,
                choices=choices,
                default=argparse.SUPPRESS,
                metavar=None if choices else name.upper(),
                help=f"{text}{suffix}".strip(),
            )


def given(args: argparse.Namespace, fields: typing.Iterable[str]) -> dict[str, Any]:
    """The values of the flags among `fields` that were given on the command line."""
    return {name: getattr(args, name) for name in fields if hasattr(args, name)}
