"""Names of a package imported on first use, so that command lines answer ``--help`` and refuse bad
arguments before torch is imported (``skipdiff``, ``skipdiff.skips``, ``skipdiff.eval``, ``skipdiff.sweep``,
``skipdiff.report``); and old module paths that moved (:func:`moved_module`).

    __getattr__, __dir__ = lazy_exports(__name__, {"name": ".module", ...})
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A module-level ``__getattr__`` and ``__dir__`` for ``package`` that import ``exports`` (name ->
    module, relative to the package or absolute) when a name is first asked for, then keep it."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *exports])

    return __getattr__, __dir__


def moved_module(old: str, new: str) -> None:
    """Make module ``old`` (a deprecated path, calling this as its only code) the module ``new``.

    After a ``DeprecationWarning`` naming the new path, ``sys.modules[old]`` becomes ``new`` itself rather
    than a copy of its names, so private names, ``monkeypatch.setattr(old_module, ...)`` and anything saved
    under the old path (a ``model_index.json`` entry, a pickle) keep reaching the one real module."""
    warnings.warn(
        f"{old} has moved to {new}; import it from there (the old path will go)", DeprecationWarning, stacklevel=3
    )
    sys.modules[old] = importlib.import_module(new)
