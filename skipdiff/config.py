"""Options as dataclasses, with the command line generated from them (one source of defaults).

Every field is declared with :func:`option`, whose ``help`` text becomes the ``--help`` of the
generated flag. ``bool`` fields become ``--flag`` / ``--no-flag``; ``list`` fields take several
values. Unknown keys (from a file or a sweep) and wrong types raise ``ValueError``.

Numbers are read by one rule everywhere (flags, skip specifications, ``key=value`` groups):
ASCII decimal literals only (:func:`parse_number`). Python's ``int``/``float`` also accept
other scripts' digits (``"١"`` is 1) and digit separators (``"1_0"`` is 10), which would turn
a typo into a silently different experiment.

This module imports nothing heavy (no torch), so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class SkipdiffError(RuntimeError):
    """A failure skipdiff expects and explains (a refused folder, too many non-finite steps, no Hub access):
    command lines print its message as one ``error: ...`` line, without a traceback."""


# Choices shared by several option sets and the library: defined here, once.
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # diffusers' get_scheduler names
SHORTCUT_PARTS = ("down", "mid", "up")  # UNet parts whose resnets' residual shortcuts can be turned off
GATE_TARGETS = ("residual", "skip")  # what a classifier's block gate multiplies (skipdiff.classifiers)
# The Markov chain's default bounds on every open probability (skipdiff.skips.markov): a learned value that
# reads exactly one of them is the clip, not an estimate.
MARKOV_P_MIN = 0.05
MARKOV_P_MAX = 0.95

_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.ASCII | re.I)


def parse_int(text: str) -> int:
    """An ASCII decimal integer (``"12"``, ``"-3"``); anything else raises ``ValueError``."""
    if not isinstance(text, str) or not _INT.fullmatch(text.strip()):
        raise ValueError(f"not an integer: {text!r} (ASCII digits only)")
    return int(text)


def parse_float(text: str) -> float:
    """An ASCII decimal number (``"0.5"``, ``"2e-3"``, ``"nan"``); anything else raises ``ValueError``.

    NaN and infinity parse (so that the option's own check can name them as not finite)."""
    if not isinstance(text, str) or not _FLOAT.fullmatch(text.strip()):
        raise ValueError(f"not a number: {text!r} (ASCII decimal literals only)")
    return float(text)


def parse_number(text: str) -> int | float | bool | str:
    """A ``key=value`` value: ``true``/``false``, an int, a float, else the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.fullmatch(text.strip()):
        return int(text)
    if _FLOAT.fullmatch(text.strip()):
        return float(text)
    return text


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help, and the script's docstring (its usage examples) kept as written."""


def _argparse_type(parse, kind: str):
    """``parse`` as an argparse ``type``: its ValueError becomes argparse's one-line usage error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = kind
    return convert


_PARSERS = {int: _argparse_type(parse_int, "int"), float: _argparse_type(parse_float, "float")}


def closest(name: str, names) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to a misspelt one, else an empty string."""
    match = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


class OptionParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: an unknown flag names the closest known one instead of
    printing the whole usage (70+ lines for training)."""

    def error(self, message: str):
        flags = [f for action in self._actions for f in action.option_strings]
        unknown = re.findall(r"(--?[A-Za-z0-9_-]+)", message.split(":", 1)[1]) if "unrecognized" in message else []
        hints = "".join(closest(flag.split("=")[0], flags) for flag in unknown)
        self.exit(2, f"{self.prog}: error: {message}{hints}; see --help\n")


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one flag per field of the dataclass ``cls`` (no abbreviations)."""
    parser = OptionParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    sections = _help_sections(parser, cls)
    for field in dataclasses.fields(cls):
        kind, is_list = _base_type(hints[field.name])
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", ""), "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _PARSERS.get(kind, kind)
            if is_list:
                kwargs["nargs"] = "*"
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
        sections.get(field.name, parser).add_argument(f"--{field.name}", **kwargs)
    return parser


def _help_sections(parser: argparse.ArgumentParser, cls: type) -> dict[str, Any]:
    """Field name -> the ``--help`` section of its :class:`OptionGroup` (``cls``'s groups, in the order of
    their first field); fields in no group stay in the main list."""
    groups = [(name, g) for base in cls.__mro__ for name, g in vars(base).items() if isinstance(g, OptionGroup)]
    sections: dict[str, Any] = {}
    for name, group in sorted(groups, key=lambda item: _first_field_index(cls, item[1].cls)):
        section = parser.add_argument_group(f"{name} options")
        for field in dataclasses.fields(group.cls):
            sections.setdefault(field.name, section)
    return sections


def _first_field_index(cls: type, group: type) -> int:
    names = [f.name for f in dataclasses.fields(cls)]
    return min(names.index(f.name) for f in dataclasses.fields(group))


def parse_args(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Parse a command line into a validated ``cls`` instance."""
    namespace = build_parser(cls, description).parse_args(argv)
    return from_dict(cls, vars(namespace))


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} options must be a mapping of option -> value, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        hints = "".join(closest(name, names) for name in unknown)
        raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}{hints}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        _check_type(name, value, hints[name])
    instance = cls(**values)
    if hasattr(instance, "validate"):
        instance.validate()
    return instance


def subset(cls: type[T], source: Any) -> T:
    """An instance of the dataclass ``cls`` with the fields it shares with ``source`` (a dataclass or
    a dict, e.g. a run's ``training_options.json``); fields ``source`` lacks keep their defaults.

    This is how one options group (such as :class:`skipdiff.data.DataOptions`) travels whole from any
    entry point's options to the layer that uses it."""
    values = dataclasses.asdict(source) if dataclasses.is_dataclass(source) else dict(source)
    names = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {k: v for k, v in values.items() if k in names})


class OptionGroup:
    """A class attribute of an entry point's options: ``options.<name>`` is the group ``cls`` (a dataclass whose
    fields ``options`` has) on its own, built by :func:`subset`, so a builder handed it can read only its group.

    The entry point's options class inherits every group's fields (one flag each, one flat JSON file), and
    builders receive groups, not the whole: ``make_optimizer(options.optim, ...)``.
    """

    def __init__(self, cls: type):
        self.cls = cls

    def __set_name__(self, owner: type, name: str) -> None:
        options = set(vars(owner).get("__annotations__", {})) | _inherited(owner)
        if name in options:  # the group would hide the option's value
            raise TypeError(f"{owner.__name__}.{name}: a group cannot take the name of an option")
        missing = {f.name for f in dataclasses.fields(self.cls)} - options
        if missing:
            raise TypeError(f"{owner.__name__}.{name}: {self.cls.__name__}'s fields {sorted(missing)} are not options")

    def __get__(self, options: Any, owner: type | None = None) -> Any:
        if options is None:
            return self
        return subset(self.cls, options)


def _inherited(owner: type) -> set[str]:
    return {name for base in owner.__mro__[1:] for name in getattr(base, "__annotations__", {})}


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


# Options whose values never reach a file, a log line, a tracker or a model card.
SECRET_OPTIONS = frozenset({"hub_token"})
REDACTED = "<redacted>"


def redact_spec(raw: dict) -> dict:
    """A sweep or search spec (as read from YAML) with the secrets of its ``base`` options hidden
    (:func:`redact`), for the records a run writes (sweep.json, search.json)."""
    if isinstance(raw.get("base"), dict):
        return {**raw, "base": redact(raw["base"])}
    return dict(raw)


def redact(options: T, mark: str | None = None) -> T:
    """``options`` with their secrets (:data:`SECRET_OPTIONS`) hidden: the one place that decides what a
    run may show of them. ``options`` is left as it is.

    * a dataclass -> a copy whose secrets are None, or ``mark`` where one was given (``--dry_run`` prints
      ``"<redacted>"``, so a token that was passed is seen to be there);
    * a dict (``vars(options)``, a sweep cell's options) -> a copy without the secret keys;
    * a command line (a list of strings) -> a copy with each secret's value replaced by ``mark`` or
      ``"<redacted>"`` (both ``--hub_token X`` and ``--hub_token=X``).
    """
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        hidden = {
            f.name: None if getattr(options, f.name) is None else mark
            for f in dataclasses.fields(options)
            if f.name in SECRET_OPTIONS
        }
        return dataclasses.replace(options, **hidden)
    if isinstance(options, dict):
        return {key: value for key, value in options.items() if key not in SECRET_OPTIONS}
    if isinstance(options, list | tuple):
        argv, hide_next = [], False
        for part in options:
            flag, equals, _ = part.partition("=")
            secret = flag.startswith("--") and flag[2:] in SECRET_OPTIONS
            if hide_next:
                part = mark or REDACTED
            elif secret and equals:
                part = f"{flag}={mark or REDACTED}"
            argv.append(part)
            hide_next = secret and not equals
        return argv
    raise TypeError(f"redact() takes options (a dataclass or a dict) or a command line, got {type(options).__name__}")


def parse_key_values(text: str, what: str) -> dict[str, Any]:
    """``"a=1,b=true"`` -> ``{"a": 1, "b": True}`` (for small option groups such as the chain's)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"{what} options are key=value pairs, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = parse_number(value.strip())
    return out


def looks_local(source: str) -> bool:
    """Whether a model source is meant as a local path rather than a Hub id (``user/name``): absolute or
    relative to ``.``/``..``/``~``, more than one slash, or a first component that is a local folder."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or source in (".", "..") or "\\" in source:
        return True
    parts = source.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_local_source(source: str, flag: str) -> None:
    """A local-looking source that does not exist is refused at once (not after a Hub lookup), naming the
    closest sibling when one is near."""
    path = Path(source).expanduser()
    if looks_local(source) and not path.exists():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        raise ValueError(
            f"{flag} {source!r} does not exist (a local path; a Hub id looks like user/name)"
            f"{closest(path.name, siblings)}"
        )


def check_output_folder(path, flag: str = "--out") -> None:
    """Raise ``ValueError`` when an output folder option names an existing file (before any work)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder")


def check_positive(owner: Any, names: tuple[str, ...], *, minimum: int = 1, optional: bool = False) -> None:
    """Raise ``ValueError`` naming the first of ``names`` whose value on ``owner`` is below ``minimum``."""
    for name in names:
        value = getattr(owner, name)
        if value is None and optional:
            continue
        if value is None or value < minimum:
            raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def check_finite(owner: Any, names: tuple[str, ...], *, positive: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming the first option that is not a finite number >= 0 (> 0 for ``positive``)."""
    for name in names:
        value = getattr(owner, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (name in positive and value == 0):
            kind = "a positive finite number" if name in positive else "a finite number >= 0"
            raise ValueError(f"--{name} must be {kind}, got {value}")


def check_choice(owner: Any, name: str, allowed: tuple) -> None:
    """Raise ``ValueError`` when option ``name`` is not one of ``allowed``."""
    if getattr(owner, name) not in allowed:
        raise ValueError(f"--{name} must be one of {allowed}, got {getattr(owner, name)!r}")
