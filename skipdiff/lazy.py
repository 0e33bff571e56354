"""Names of a package imported on first use, so that command lines answer ``--help`` and refuse bad
arguments before torch is imported (``skipdiff``, ``skipdiff.eval``, ``skipdiff.sweep``, ``skipdiff.report``).

    __getattr__, __dir__ = lazy_exports(__name__, {"name": ".module", ...})
"""

from __future__ import annotations

import importlib
import sys
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
