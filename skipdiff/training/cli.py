"""Run options as dataclasses, with the command line generated from them (one source of defaults).

Every field is declared with :func:`option`, whose ``help`` text becomes the ``--help`` of the
generated flag. ``bool`` fields become ``--flag`` / ``--no-flag``; ``list`` fields take several
values. Unknown keys (from a file or a sweep) and wrong types raise ``ValueError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **metadata) -> Any:  # noqa: A002  (mirrors argparse)
    """A dataclass field with its ``--help`` text; list defaults are copied per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is_list) of ``int``, ``int | None``, ``list[int]``..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help, and the script's docstring (its usage examples) kept as written."""


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one flag per field of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, is_list = _base_type(hints[field.name])
        default = (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        )
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", ""), "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if is_list:
                kwargs["nargs"] = "*"
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
        parser.add_argument(f"--{field.name}", **kwargs)
    return parser


def parse_args(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Parse a command line into a validated ``cls`` instance."""
    namespace = build_parser(cls, description).parse_args(argv)
    return from_dict(cls, vars(namespace))


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting unknown keys and values of the wrong type."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_type(name, value, hints[name])
    instance = cls(**values)
    if hasattr(instance, "validate"):
        instance.validate()
    return instance


def _check_type(name: str, value: Any, annotation) -> None:
    kind, is_list = _base_type(annotation)
    optional = type(None) in typing.get_args(annotation)
    if value is None:
        if not optional:
            raise ValueError(f"option {name!r} may not be None")
        return
    items = value if is_list else [value]
    if is_list and not isinstance(value, list):
        raise ValueError(f"option {name!r} must be a list, got {value!r}")
    for item in items:
        ok = isinstance(item, kind) and not (kind is int and isinstance(item, bool))
        if kind is float and isinstance(item, int) and not isinstance(item, bool):
            ok = True
        if not ok:
            raise ValueError(f"option {name!r} must be {kind.__name__}, got {item!r}")


def to_json(options) -> str:
    """The resolved options as pretty JSON (written next to a run's outputs)."""
    return json.dumps(dataclasses.asdict(options), indent=2, sort_keys=True)


def parse_key_values(text: str, what: str) -> dict[str, Any]:
    """``"a=1,b=true"`` -> ``{"a": 1, "b": True}`` (for small option groups such as the chain's)."""
    from ..gates import _parse_value

    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"{what} options are key=value pairs, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out
