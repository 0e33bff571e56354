"""The scripts under eval/ (not a package) loaded as modules, so tests can call their functions."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

EVAL = Path(__file__).resolve().parents[2] / "eval"


def eval_script(name: str, module_name: str | None = None) -> types.ModuleType:
    """``eval/<name>.py`` as a freshly executed module (named ``module_name``, default ``name``)."""
    spec = importlib.util.spec_from_file_location(module_name or name, EVAL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
