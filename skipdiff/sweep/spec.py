"""A sweep spec: YAML -> a validated :class:`SweepSpec` -> its :class:`Cell` s (one run folder each).

The spec's format is in :mod:`skipdiff.sweep`'s docstring. What depends on the kind of cell (its
options class, its ``eval:`` and ``inference_variants:`` sections, extra checks) is asked of the kind
(:mod:`.kinds`); this module only knows grids, labels and names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any

import yaml

from ..config import from_dict
from ..runfolder import safe_name
from .kinds import CellKind, get_kind

SPEC_KEYS = ("kind", "description", "base", "grid", "eval", "eval_by", "inference_variants")
# Run settings that do not change results: a relaunch may change them without invalidating finished cells.
NOT_RESULTS = ("num_threads", "output_dir", "resume_from_checkpoint", "dataloader_num_workers", "report_to")
MAX_NAME = 100


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed spec; ``grid`` is a list of grids, each a list of (axis, [(label, options)])."""

    name: str
    kind: str
    base: dict
    grid: list[list[tuple[str, list[tuple[str, dict]]]]]
    eval: dict
    inference_variants: dict[str, str]
    description: str = ""
    raw: dict = dataclasses.field(default_factory=dict)  # as written, for sweep.json
    source: str | None = None  # the YAML file it was read from (None: built in code, e.g. a confirmation)
    eval_by: dict = dataclasses.field(default_factory=dict)  # grid axis -> label -> eval overrides of its cells

    def eval_for(self, axes: list[dict]) -> dict:
        """The evaluation of a cell on these grid ``axes`` (a :class:`Cell`'s): ``eval`` with the
        ``eval_by`` overrides of the cell's labels (e.g. fewer FID samples on a smaller dataset)."""
        evaluation = dict(self.eval)
        for entry in axes:
            evaluation.update(self.eval_by.get(entry["axis"], {}).get(entry["label"], {}))
        return evaluation


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the sweep, in its own folder."""

    name: str
    axes: list[dict]  # in grid order: {"axis": str, "label": str, "options": {option: value}}
    options: dict  # the resolved options of the cell's kind (every field)
    overrides: dict  # the options that differ from the kind's defaults
    folder: Path


def read_yaml_spec(path: str | os.PathLike, what: str = "sweep spec") -> Any:
    """A YAML spec file's contents; ``ValueError`` naming the file (and the line and column of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(
            f"{what} {str(path)!r} is not valid YAML{at}: {getattr(err, 'problem', None) or err}"
        ) from None


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and check a YAML spec; the sweep's name is the file's stem."""
    return dataclasses.replace(parse_spec(read_yaml_spec(path), Path(path).stem), source=str(path))


def parse_spec(data: Any, name: str) -> SweepSpec:
    """A spec dict (as read from YAML) -> :class:`SweepSpec`; raises ``ValueError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"sweep spec {name!r} must be a mapping with keys {SPEC_KEYS}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"sweep spec {name!r}: unknown key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    kind = get_kind(data.get("kind"))
    base = _mapping(data.get("base") or {}, "base")
    for key in sorted(set(base) & set(kind.set_by_sweep)):
        raise ValueError(f"base option {key!r} is set by the sweep for every cell; remove it from the spec")
    if "grid" not in data:
        raise ValueError(f"sweep spec {name!r} has no grid (a dict of option -> values, or a list of them)")
    grids = data["grid"] if isinstance(data["grid"], list) else [data["grid"]]
    if not grids:
        raise ValueError("grid is an empty list")
    grid = [_parse_grid(_mapping(g, f"grid[{i}]"), kind) for i, g in enumerate(grids)]
    evaluation = kind.parse_eval(data.get("eval"))
    variants = kind.parse_variants(data.get("inference_variants"), evaluation)
    eval_by = _parse_eval_by(data.get("eval_by"), grid, kind, evaluation)
    return SweepSpec(
        name=name,
        kind=kind.name,
        base=base,
        grid=grid,
        eval=evaluation,
        inference_variants=variants,
        description=str(data.get("description") or ""),
        raw=data,
        eval_by=eval_by,
    )


def _parse_eval_by(raw: Any, grid: list, kind, evaluation: dict) -> dict:
    """``eval_by: {axis: {label: {eval option: value}}}``: per-label evaluation overrides, each axis one of the
    grid's and each label one of that axis's; the merged evaluation must still parse."""
    if raw is None:
        return {}
    raw = _mapping(raw, "eval_by")
    if not evaluation:
        raise ValueError(f"eval_by needs an eval: section to override (kind {kind.name!r} has none)")
    labels: dict[str, set[str]] = {}
    for axes in grid:
        for axis, values in axes:
            labels.setdefault(axis, set()).update(label for label, _ in values)
    parsed = {}
    for axis, by_label in raw.items():
        if axis not in labels:
            raise ValueError(f"eval_by: {axis!r} is not a grid axis; axes: {sorted(labels)}")
        parsed[axis] = {}
        for label, overrides in _mapping(by_label, f"eval_by.{axis}").items():
            if str(label) not in labels[axis]:
                raise ValueError(f"eval_by.{axis}: {label!r} is not one of its labels {sorted(labels[axis])}")
            overrides = _mapping(overrides, f"eval_by.{axis}.{label}")
            kind.parse_eval({**evaluation, **overrides})
            parsed[axis][str(label)] = dict(overrides)
    return parsed


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, got {value!r}")
    return value


def _axis_entries(axis: str, values: Any, fields: set[str]) -> list[tuple[str, dict]]:
    """One axis as [(label, options)]: a list of values of the option ``axis``, or label -> value/options."""
    if isinstance(values, list):
        if axis not in fields:
            raise ValueError(
                f"grid axis {axis!r} is no option (a list of values needs an option name); "
                f"to set several options per value write {axis}: {{label: {{option: value}}}}"
            )
        return [(_label(value), {axis: value}) for value in values]
    if not isinstance(values, dict):
        raise ValueError(f"grid axis {axis!r} must be a list of values or a mapping label -> value, got {values!r}")
    entries = []
    for label, value in values.items():
        if isinstance(value, dict):
            entries.append((str(label), dict(value)))
        elif axis in fields:
            entries.append((str(label), {axis: value}))
        else:
            raise ValueError(
                f"grid axis {axis!r} is no option, so its value {label!r} must be a mapping of options, got {value!r}"
            )
    return entries


def _parse_grid(grid: dict, kind: CellKind) -> list[tuple[str, list[tuple[str, dict]]]]:
    """One grid: every axis as (axis, [(label, options)]), each option known to the kind."""
    if not grid:
        raise ValueError("a grid needs at least one axis (e.g. seed: [0])")
    fields = {f.name for f in dataclasses.fields(kind.options_class())}
    axes = []
    for axis, values in grid.items():
        entries = _axis_entries(axis, values, fields)
        if not entries:
            raise ValueError(f"grid axis {axis!r} has no values")
        labels = [safe_name(label) for label, _ in entries]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"grid axis {axis!r} has duplicate labels {duplicates} (after making them file-name safe)")
        for label, options in entries:
            unknown = sorted(set(options) - fields)
            if unknown:
                raise ValueError(f"grid axis {axis!r}, value {label!r}: unknown option(s) {unknown}")
            clash = sorted(set(options) & set(kind.set_by_sweep))
            if clash:
                raise ValueError(f"grid axis {axis!r}: option(s) {clash} are set by the sweep")
        axes.append((str(axis), entries))
    return axes


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "_".join(_label(v) for v in value) or "empty"
    return str(value)


def cell_name(axes: list[dict]) -> str:
    """``<axis>-<label>`` joined by ``__``; long names are shortened with a hash."""
    name = "__".join(f"{safe_name(entry['axis'])}-{safe_name(entry['label'])}" for entry in axes)
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def results_options(options: dict) -> dict:
    """The options that decide a cell's results (run settings such as thread counts left out)."""
    return {k: v for k, v in options.items() if k not in NOT_RESULTS}


def expand_cells(spec: SweepSpec, out: str | os.PathLike, num_threads: int | None = None) -> list[Cell]:
    """Every cell of the spec, in grid order, each validated with ``from_dict``; duplicates across the
    grids of a list merge when their options agree (``ValueError`` when they do not). The kind then
    checks the cells as a whole (e.g. every skip spec against its model)."""
    kind = get_kind(spec.kind)
    cls = kind.options_class()
    defaults = dataclasses.asdict(cls())
    cells: dict[str, Cell] = {}
    for grid in spec.grid:
        for combination in itertools.product(*(entries for _, entries in grid)):
            axes = [
                {"axis": axis, "label": label, "options": options}
                for (axis, _), (label, options) in zip(grid, combination, strict=True)
            ]
            name = cell_name(axes)
            values = dict(spec.base)
            for entry in axes:
                values.update(entry["options"])
            if num_threads is not None and "num_threads" in defaults:
                values["num_threads"] = num_threads
            folder = Path(out) / name
            values[kind.folder_option] = str(folder)
            try:
                options = dataclasses.asdict(from_dict(cls, values))
            except (ValueError, TypeError) as err:
                raise ValueError(f"cell {name!r}: {err}") from err
            overrides = {k: v for k, v in options.items() if v != defaults[k]}
            if name in cells:
                if results_options(cells[name].options) != results_options(options):
                    raise ValueError(f"cell {name!r} appears in two grids with different options")
                continue
            cells[name] = Cell(name, axes, options, overrides, folder)
    kind.check_cells(spec, list(cells.values()))
    return list(cells.values())
