"""``python -m skipdiff.sweep``: a grid of training runs, each followed by its evaluation, from a YAML spec.

    python -m skipdiff.sweep eval/sweeps/cpu_digits.yaml --dry_run           # the cells and their options
    python -m skipdiff.sweep eval/sweeps/cpu_digits.yaml --num_threads 2     # -> runs/sweeps/cpu_digits/
    python -m skipdiff.sweep eval/sweeps/classifiers.yaml --only data-wine   # cells whose name contains it
    python -m skipdiff.sweep eval/sweeps/gpu_cifar10.yaml --launcher accelerate --accelerate_args "--mixed_precision bf16"
    python -m skipdiff.report runs/sweeps/cpu_digits                         # the comparison (Markdown + PNG)

**Spec** (YAML)::

    kind: diffusion                 # or classifier (train_scripts/train_classifier.py's options)
    description: one line, shown in the report
    base:                           # training options shared by every cell (TrainOptions / ClassifierOptions)
      max_train_steps: 300
      learning_rate: 2.0e-3         # YAML reads "2e-3" as a string: write a mantissa with a dot
    grid:                           # the cartesian product of the axes; a list of such dicts is their union
      skips: [full, none]           # an option name -> a list of values (labels made from the values)
      seed: [0, 1]
    #   skips: {full: full, zero0: "zero,keep,..."}       # or label -> value (readable cell names)
    #   skips: {markov: {skips: markov, markov: "warmup_steps=100"}}   # a value that is a dict sets
    #   data: {wine: {dataset: wine, model: mlp}}          #   several options; an axis that is no option
    #                                                      #   must use such dicts only
    eval:                           # python -m skipdiff.eval options (EvalOptions) run on every cell
      denoise_loss: true            #   (diffusion only; default: denoise_loss + grad_stability)
      fid: true
      num_samples: 500
    inference_variants:             # optional, diffusion only: label -> skip spec applied at inference
      identity: "freeu:b1=1:b2=1:s1=1:s2=1"

Every cell's options are validated (``from_dict``) before anything runs; unknown keys, wrong types,
empty axes and colliding cell names raise ``ValueError``.

**Layout** of ``--out`` (default ``runs/sweeps/<spec name>``)::

    sweep.json                      the spec as run and the cell names, in order (the report reads it)
    <cell>/                         a train_unet.py (or classifier) run folder, name from the grid labels
    <cell>/eval/eval.json           skipdiff.eval's results (diffusion)
    <cell>/variants/<label>/        the trained model with the variant's skips (a run folder) + eval/
    <cell>/cell.json                running -> trained -> done (or failed), written atomically

Relaunching skips ``done`` cells, evaluates ``trained`` ones and resumes the others from their latest
checkpoint (``--resume_from_checkpoint latest``; checkpoint every N steps via ``base``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .config import from_dict
from .training import checkpoints

KINDS = ("diffusion", "classifier")
SPEC_KEYS = ("kind", "description", "base", "grid", "eval", "inference_variants")
SET_BY_SWEEP = ("output_dir", "resume_from_checkpoint", "dry_run")  # per-cell options the runner owns
EVAL_SET_BY_SWEEP = ("checkpoint", "out", "compare", "num_threads")
# Run settings that do not change results: a relaunch may change them without invalidating finished cells.
NOT_RESULTS = ("num_threads", "output_dir", "resume_from_checkpoint", "dataloader_num_workers", "report_to")
DEFAULT_EVAL = {"denoise_loss": True, "grad_stability": True}
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"diffusion": REPO / "train_scripts" / "train_unet.py",
           "classifier": REPO / "train_scripts" / "train_classifier.py"}  # fmt: skip
MAX_NAME = 100


# --------------------------------------------------------------------------------------------------
# Spec -> cells
# --------------------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the sweep."""

    name: str
    axes: list[dict]  # in grid order: {"axis": str, "label": str, "options": {option: value}}
    options: dict  # the resolved training options (every field)
    overrides: dict  # the options that differ from the training defaults


def options_class(kind: str) -> type:
    if kind == "diffusion":
        from .training.options import TrainOptions

        return TrainOptions
    from .training.classifier import ClassifierOptions

    return ClassifierOptions


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and check a YAML spec (see the module docstring); the name is the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep spec {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    return parse_spec(data, path.stem)


def parse_spec(data: Any, name: str) -> SweepSpec:
    """A spec dict (as read from YAML) -> :class:`SweepSpec`; raises ``ValueError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(
            f"sweep spec {name!r} must be a mapping with keys {SPEC_KEYS}, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"sweep spec {name!r}: unknown key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"sweep spec {name!r}: kind must be one of {KINDS}, got {kind!r}")
    base = _mapping(data.get("base") or {}, "base")
    if "grid" not in data:
        raise ValueError(f"sweep spec {name!r} has no grid (a dict of option -> values, or a list of them)")
    grids = data["grid"] if isinstance(data["grid"], list) else [data["grid"]]
    if not grids:
        raise ValueError("grid is an empty list")
    fields = {f.name for f in dataclasses.fields(options_class(kind))}
    grid = [_parse_grid(_mapping(g, f"grid[{i}]"), fields) for i, g in enumerate(grids)]
    for key in sorted(set(base) & set(SET_BY_SWEEP)):
        raise ValueError(f"base option {key!r} is set by the sweep for every cell; remove it from the spec")
    if kind == "classifier" and data.get("eval"):
        raise ValueError("classifier cells are evaluated by their training run (metrics.json): remove eval:")
    evaluation = _mapping(data.get("eval") or {}, "eval") if kind == "diffusion" else {}
    if kind == "diffusion" and not evaluation:
        evaluation = dict(DEFAULT_EVAL)
    for key in sorted(set(evaluation) & set(EVAL_SET_BY_SWEEP)):
        raise ValueError(f"eval option {key!r} is set by the sweep; remove it from the spec")
    variants = _mapping(data.get("inference_variants") or {}, "inference_variants")
    if variants and kind != "diffusion":
        raise ValueError("inference_variants need kind: diffusion")
    for label, spec in variants.items():
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"inference variant {label!r} must be a skip spec string, got {spec!r}")
        if _safe(label) != str(label):
            raise ValueError(f"inference variant label {label!r} must use only letters, digits and . _ + -")
    if variants and not (
        evaluation.get("fid") or evaluation.get("denoise_loss") or evaluation.get("skip_importance")
    ):
        raise ValueError(
            "inference_variants need eval: fid, denoise_loss or skip_importance (training-free metrics)"
        )
    return SweepSpec(name=name, kind=kind, base=base, grid=grid, eval=evaluation,
                     inference_variants={str(k): v for k, v in variants.items()},
                     description=str(data.get("description") or ""), raw=data)  # fmt: skip


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, got {value!r}")
    return value


def _parse_grid(grid: dict, fields: set[str]) -> list[tuple[str, list[tuple[str, dict]]]]:
    """One grid: every axis as (axis, [(label, options)])."""
    if not grid:
        raise ValueError("a grid needs at least one axis (e.g. seed: [0])")
    axes = []
    for axis, values in grid.items():
        if isinstance(values, list):
            if axis not in fields:
                raise ValueError(f"grid axis {axis!r} is no option (a list of values needs an option name); "
                                 f"to set several options per value write {axis}: {{label: {{option: value}}}}")  # fmt: skip
            entries = [(_label(value), {axis: value}) for value in values]
        elif isinstance(values, dict):
            entries = []
            for label, value in values.items():
                if isinstance(value, dict):
                    entries.append((str(label), dict(value)))
                elif axis in fields:
                    entries.append((str(label), {axis: value}))
                else:
                    raise ValueError(f"grid axis {axis!r} is no option, so its value {label!r} must be a mapping "
                                     f"of options, got {value!r}")  # fmt: skip
        else:
            raise ValueError(
                f"grid axis {axis!r} must be a list of values or a mapping label -> value, got {values!r}"
            )
        if not entries:
            raise ValueError(f"grid axis {axis!r} has no values")
        labels = [_safe(label) for label, _ in entries]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"grid axis {axis!r} has duplicate labels {duplicates} (after making them file-name safe)"
            )
        for label, options in entries:
            unknown = sorted(set(options) - fields)
            if unknown:
                raise ValueError(f"grid axis {axis!r}, value {label!r}: unknown option(s) {unknown}")
            clash = sorted(set(options) & set(SET_BY_SWEEP))
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


def _safe(text: str) -> str:
    """A file-name-safe form: letters, digits and ``. _ + -``; other runs of characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_") or "_"


def cell_name(axes: list[dict]) -> str:
    """``<axis>-<label>`` joined by ``__``; long names are shortened with a hash."""
    name = "__".join(f"{_safe(entry['axis'])}-{_safe(entry['label'])}" for entry in axes)
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def expand_cells(spec: SweepSpec, out: str | os.PathLike, num_threads: int | None = None) -> list[Cell]:
    """Every cell of the spec, in grid order, each validated with ``from_dict``; duplicates across the
    grids of a list merge when their options agree (``ValueError`` when they do not)."""
    cls = options_class(spec.kind)
    defaults = dataclasses.asdict(cls())
    cells: dict[str, Cell] = {}
    for grid in spec.grid:
        for combination in itertools.product(*(entries for _, entries in grid)):
            axes = [{"axis": axis, "label": label, "options": options}
                    for (axis, _), (label, options) in zip(grid, combination, strict=True)]  # fmt: skip
            values = dict(spec.base)
            for entry in axes:
                values.update(entry["options"])
            if num_threads is not None:
                values["num_threads"] = num_threads
            name = cell_name(axes)
            values["output_dir"] = str(Path(out) / name)
            try:
                options = dataclasses.asdict(from_dict(cls, values))
            except (ValueError, TypeError) as err:
                raise ValueError(f"cell {name!r}: {err}") from err
            overrides = {k: v for k, v in options.items() if v != defaults[k]}
            cell = Cell(name, axes, options, overrides)
            if name in cells:
                if _results_options(cells[name].options) != _results_options(options):
                    raise ValueError(f"cell {name!r} appears in two grids with different options")
                continue
            cells[name] = cell
    if spec.kind == "diffusion":
        _check_eval(spec.eval)
        check_skip_specs(list(cells.values()))
        if spec.inference_variants:
            check_variant_specs({c.options["model"] for c in cells.values()}, spec.inference_variants)
    return list(cells.values())


def _results_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in NOT_RESULTS}


def _check_eval(evaluation: dict) -> None:
    from .eval import EvalOptions

    try:
        from_dict(EvalOptions, {**evaluation, "checkpoint": "<cell>"})
    except (ValueError, TypeError) as err:
        raise ValueError(f"eval: {err}") from err


@functools.cache
def _skips_of(model: str) -> tuple:
    """The skip geometry (``SkipInfo`` list) of a UNet preset or config file, to check specs against."""
    from .presets import unet_config
    from .router import discover_skips
    from .unet import SkipUNet2DModel

    return tuple(discover_skips(SkipUNet2DModel(**unet_config(model, sample_size=32, channels=1))))


def check_skip_specs(cells: list[Cell]) -> None:
    """Every diffusion cell's ``skips`` (and ``markov`` options) must resolve for its model."""
    from .config import parse_key_values
    from .router import SkipRouter

    checked = set()
    for cell in cells:
        key = (cell.options["model"], cell.options["skips"], cell.options["markov"])
        if key in checked:
            continue
        checked.add(key)
        try:
            SkipRouter(list(_skips_of(key[0])), key[1], parse_key_values(key[2], "--markov"))
        except ValueError as err:
            raise ValueError(f"cell {cell.name!r}: {err}") from err


def check_variant_specs(models: set[str], variants: dict[str, str]) -> None:
    """Each variant must be a valid, parameter- and buffer-free skip spec for every model used, so that
    the trained state dict loads into the variant strictly."""
    from .router import SkipRouter

    for model in sorted(models):
        for label, spec in variants.items():
            try:
                router = SkipRouter(list(_skips_of(model)), spec)
            except ValueError as err:
                raise ValueError(f"inference variant {label!r}: {err}") from err
            removing = [g.info.index for g in router.gates if g.removes_skip]
            if removing or router.state_dict():
                raise ValueError(f"inference variant {label!r} ({spec!r}) adds parameters or buffers or removes "
                                 f"skips; use keep, zero, scale, fourier or bernoulli gates")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------------


def options_to_argv(cls: type, options: dict) -> list[str]:
    """The command line that gives ``options`` (only values that differ from the defaults)."""
    defaults = dataclasses.asdict(cls())
    argv = []
    for name, value in options.items():
        if value == defaults[name]:
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        elif value is None:
            raise ValueError(f"option {name!r} = None cannot be given on a command line (its default is "
                             f"{defaults[name]!r}); set another option instead (e.g. max_train_steps)")  # fmt: skip
        else:
            argv.append(f"--{name}={value}")
    return argv


# --------------------------------------------------------------------------------------------------
# Running one cell
# --------------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_cell(folder: Path) -> dict | None:
    path = folder / "cell.json"
    return json.loads(path.read_text()) if path.is_file() else None


@contextlib.contextmanager
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (mixed precision, gradient state); in-process runs with
    different settings one after the other need them forgotten before and after."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def train_cell(kind: str, options: dict, launcher: str, accelerate_args: list[str]) -> dict:
    """Train one cell (in this process, or under ``accelerate launch``); returns the run's metrics."""
    cls = options_class(kind)
    if launcher == "accelerate":
        accelerate = Path(sys.executable).with_name("accelerate")
        command = [str(accelerate) if accelerate.exists() else "accelerate", "launch", *accelerate_args,
                   str(SCRIPTS[kind]), *options_to_argv(cls, options)]  # fmt: skip
        print("$ " + shlex.join(command), flush=True)
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"training exited with status {result.returncode}: {shlex.join(command)}")
        name = "train_metrics.json" if kind == "diffusion" else "metrics.json"
        metrics_path = Path(options["output_dir"]) / name
        return json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    with _fresh_accelerate_state():
        if kind == "diffusion":
            from .training.unet_trainer import main as train_unet_main

            return train_unet_main(options_to_argv(cls, options))
        from .training.classifier import train_classifier

        return train_classifier(from_dict(cls, options))


def evaluate_run(folder: Path, evaluation: dict) -> dict:
    """``python -m skipdiff.eval`` on a run folder, results in ``<folder>/eval``."""
    from .eval import EvalOptions, evaluate

    options = from_dict(EvalOptions, {**evaluation, "checkpoint": str(folder), "out": str(folder / "eval")})
    return evaluate(options)


def with_skips(unet, spec):
    """A trained ``SkipUNet2DModel`` rebuilt with the skip spec ``spec`` and the same weights.

    The state dict is loaded strictly: it works whenever the trained and the new gates hold no
    parameters or buffers (keep, zero, scale, fourier, bernoulli); otherwise ``ValueError``.
    """
    from .unet import SkipUNet2DModel

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    variant = SkipUNet2DModel(**{**config, "skips": spec})
    try:
        variant.load_state_dict(unet.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"the trained weights do not fit skips {spec!r} (inference variants must be "
                         f"parameter-free on both sides): {err}") from err  # fmt: skip
    return variant.eval()


def make_inference_variant(run: Path, spec: str, folder: Path) -> Path:
    """A run folder at ``folder`` holding ``run``'s trained model with skips ``spec`` (``unet/`` and
    ``unet_raw/``), the same scheduler, VAE and training options, and ``variant.json``."""
    from .pipeline import SkipDiffPipeline
    from .unet import SkipUNet2DModel

    pipeline = SkipDiffPipeline.from_pretrained(run)
    pipeline.unet = with_skips(pipeline.unet, spec)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder)
    for extra in ("unet_raw", "unet_ema"):  # the raw weights next to the EMA ones (unet_ema/: older runs)
        if (run / extra).is_dir():
            weights = SkipUNet2DModel.from_pretrained(run, subfolder=extra)
            with_skips(weights, spec).save_pretrained(folder / extra)
    shutil.copyfile(run / "training_options.json", folder / "training_options.json")
    write_json_atomic(folder / "variant.json", {"skips": spec, "trained_run": run.name})
    return folder


def _truncate_stats(path: Path, last_step: int) -> None:
    """Drop the records a resumed run will write again (those after its checkpoint's step)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def run_cell(spec: SweepSpec, cell: Cell, launcher: str = "inprocess", accelerate_args: list[str] = (),
             log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Train (or resume) and evaluate one cell; returns its final ``cell.json`` record."""
    folder = Path(cell.options["output_dir"])
    record = read_cell(folder) or {}
    start = time.perf_counter()
    base_record = {"name": cell.name, "kind": spec.kind, "axes": cell.axes, "options": cell.options,
                   "overrides": cell.overrides, "variants": spec.inference_variants}  # fmt: skip
    if "train_metrics" not in record:  # not trained yet (a failed evaluation keeps the training)
        options = dict(cell.options)
        found = checkpoints.list_checkpoints(folder)
        if found:
            step = checkpoints.read_state(found[-1])["step"]
            _truncate_stats(folder / "stats.jsonl", step)
            options["resume_from_checkpoint"] = "latest"
            log(f"  resuming {cell.name} from {found[-1].name}")
        elif folder.exists() and any(folder.iterdir()):
            if record.get("name") != cell.name:
                raise ValueError(f"{folder} exists, holds no cell.json of this sweep and no checkpoint: "
                                 "move it away or choose another --out")  # fmt: skip
            shutil.rmtree(folder)  # an earlier attempt without a checkpoint: nothing to resume
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "cell.json", {**base_record, "status": "running"})
        metrics = train_cell(spec.kind, options, launcher, list(accelerate_args))
        record = {**base_record, "status": "trained", "train_metrics": metrics,
                  "train_seconds": time.perf_counter() - start}  # fmt: skip
        write_json_atomic(folder / "cell.json", record)
    eval_start = time.perf_counter()
    if spec.kind == "diffusion":
        evaluate_run(folder, spec.eval)
        variant_eval = {**spec.eval, "grad_stability": False}  # stability is the training run's
        for label, skips in spec.inference_variants.items():
            log(f"  inference variant {label}: skips {skips}")
            evaluate_run(make_inference_variant(folder, skips, folder / "variants" / label), variant_eval)
    done = {**record, "status": "done", "eval_seconds": time.perf_counter() - eval_start}
    done["seconds"] = done.get("train_seconds", 0.0) + done["eval_seconds"]
    write_json_atomic(folder / "cell.json", done)
    return done


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def cell_status(cell: Cell) -> str:
    """``done``, ``trained``, ``resume`` (a checkpoint), ``restart`` (started, no checkpoint) or ``new``."""
    folder = Path(cell.options["output_dir"])
    record = read_cell(folder) or {}
    if record.get("status") == "done":
        return "done"
    if "train_metrics" in record:
        return "trained"
    if checkpoints.list_checkpoints(folder):
        return "resume"
    return "restart" if folder.exists() else "new"


def _check_unchanged(cell: Cell) -> None:
    record = read_cell(Path(cell.options["output_dir"]))
    if record and record.get("options"):
        before, now = _results_options(record["options"]), _results_options(cell.options)
        differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differing:
            raise ValueError(f"cell {cell.name!r} was run with other options ({', '.join(differing)}): "
                             "use another --out, or delete the cell's folder to rerun it")  # fmt: skip


def run_sweep(spec: SweepSpec, out: str | os.PathLike, *, only: str | None = None, dry_run: bool = False,
              launcher: str = "inprocess", accelerate_args: list[str] = (), num_threads: int | None = None,
              log: Callable[[str], None] = print) -> list[dict]:  # fmt: skip
    """Validate every cell, then run the unfinished ones (those whose name contains ``only``).

    Returns the ``cell.json`` records of the selected cells (nothing is run or written when ``dry_run``).
    A cell that raises is recorded as ``failed`` and the sweep goes on; ``SweepError`` at the end lists them.
    """
    if launcher not in ("inprocess", "accelerate"):
        raise ValueError(f"--launcher must be inprocess or accelerate, got {launcher!r}")
    out = Path(out)
    cells = expand_cells(spec, out, num_threads)
    selected = [c for c in cells if only is None or only in c.name]
    if not selected:
        raise ValueError(f"no cell name contains {only!r}; cells: {[c.name for c in cells]}")
    for cell in selected:
        _check_unchanged(cell)
    if dry_run:
        log(f"sweep {spec.name} ({spec.kind}): {len(selected)} of {len(cells)} cells -> {out}")
        for i, cell in enumerate(selected, 1):
            shown = {k: v for k, v in cell.overrides.items() if k != "output_dir"}
            log(
                f"[{i}/{len(selected)}] {cell.name} ({cell_status(cell)})\n    {json.dumps(shown, sort_keys=True)}"
            )
        if spec.kind == "diffusion":
            log(f"eval: {json.dumps(spec.eval, sort_keys=True)}")
        if spec.inference_variants:
            log(f"inference variants: {json.dumps(spec.inference_variants, sort_keys=True)}")
        return []
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", {"name": spec.name, "kind": spec.kind, "description": spec.description,
                                           "spec": spec.raw, "eval": spec.eval, "cells": [c.name for c in cells]})  # fmt: skip
    records, failed = [], []
    for i, cell in enumerate(selected, 1):
        status = cell_status(cell)
        if status == "done":
            log(f"[{i}/{len(selected)}] {cell.name}: done, skipped")
            records.append(read_cell(Path(cell.options["output_dir"])))
            continue
        log(f"[{i}/{len(selected)}] {cell.name}: {status}{_eta(selected[i - 1 :])}")
        try:
            records.append(run_cell(spec, cell, launcher, accelerate_args, log))
        except Exception as err:  # noqa: BLE001  one failing cell (e.g. diverged) must not stop the sweep
            folder = Path(cell.options["output_dir"])
            record = {**(read_cell(folder) or {"name": cell.name, "options": cell.options}),
                      "status": "failed", "error": f"{type(err).__name__}: {err}"}  # fmt: skip
            if folder.is_dir():
                write_json_atomic(folder / "cell.json", record)
            log(f"[{i}/{len(selected)}] {cell.name} FAILED:\n{traceback.format_exc()}")
            failed.append(cell.name)
            records.append(record)
    if failed:
        raise SweepError(f"{len(failed)} cell(s) failed (relaunch to retry them): {failed}")
    log(f"sweep {spec.name}: {len(selected)} cell(s) done in {out}; report: python -m skipdiff.report {out}")
    return records


class SweepError(RuntimeError):
    """Some cells failed; the others finished."""


def _eta(remaining: list[Cell]) -> str:
    """Mean duration of every finished cell of the sweep (this launch or earlier) times the cells left."""
    folder = Path(remaining[0].options["output_dir"]).parent
    durations = [r["seconds"] for p in sorted(folder.glob("*/cell.json"))
                 if (r := json.loads(p.read_text())).get("status") == "done" and "seconds" in r]  # fmt: skip
    if not durations:
        return " (ETA after the first cell)"
    each = sum(durations) / len(durations)
    return f" (ETA {_duration(each * len(remaining))} for {len(remaining)} cell(s) at {_duration(each)} each)"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", help="the sweep's YAML spec, e.g. eval/sweeps/cpu_digits.yaml")
    parser.add_argument("--out", help="the sweep's folder (default runs/sweeps/<spec name>)")
    parser.add_argument(
        "--dry_run", action="store_true", help="list the cells and their resolved options, run nothing"
    )
    parser.add_argument("--only", help="run only the cells whose name contains this text")
    parser.add_argument(
        "--launcher",
        default="inprocess",
        choices=("inprocess", "accelerate"),
        help="train in this process, or in a subprocess under `accelerate launch`",
    )
    parser.add_argument(
        "--accelerate_args", default="", help='arguments for accelerate launch, e.g. "--num_processes 2"'
    )
    parser.add_argument("--num_threads", type=int, help="torch CPU threads for every cell and the evaluation")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    run_sweep(spec, args.out or Path("runs") / "sweeps" / spec.name, only=args.only, dry_run=args.dry_run,
              launcher=args.launcher, accelerate_args=shlex.split(args.accelerate_args), num_threads=args.num_threads)  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except (ValueError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ValueError) else 1)
