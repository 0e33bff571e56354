"""The sweep loop: validate every cell, then run the unfinished ones one after the other, with an ETA.

A cell that raises is recorded as failed and the loop goes on; a cell another live process is training
(another sweep on the same folder) is left untouched; :class:`SweepError` at the end lists both (relaunching
retries them).
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import redact, redact_spec
from ..runfolder import RunLockedError, write_json_atomic
from .cells import cell_status, check_unchanged, read_cell, record_failure, run_cell
from .kinds import get_kind
from .launch import Launcher, LaunchInterrupted
from .spec import Cell, SweepSpec, expand_cells

Log = Callable[[str], None]


class SweepError(RuntimeError):
    """Some cells failed; the others finished."""


def interrupted(err: BaseException) -> bool:
    """Whether a cell stopped because the user asked (Ctrl-C): then the whole sweep stops, not just the cell."""
    return isinstance(err, LaunchInterrupted) or type(err).__name__ == "TrainingInterrupted"


def select_cells(cells: list[Cell], only: str | None) -> list[Cell]:
    """The cells whose name contains ``only`` (all when None); ``ValueError`` when none does."""
    selected = [c for c in cells if only is None or only in c.name]
    if not selected:
        raise ValueError(f"no cell name contains {only!r}; cells: {[c.name for c in cells]}")
    return selected


def show_plan(spec: SweepSpec, cells: list[Cell], selected: list[Cell], out: Path, log: Log) -> None:
    """``--dry_run``: the selected cells, their state and the options that differ from the defaults."""
    kind = get_kind(spec.kind)
    log(f"sweep {spec.name} ({spec.kind}): {len(selected)} of {len(cells)} cells -> {out}")
    for i, cell in enumerate(selected, 1):
        shown = redact({k: v for k, v in cell.overrides.items() if k != kind.folder_option})
        log(f"[{i}/{len(selected)}] {cell.name} ({cell_status(cell, kind)})\n    {json.dumps(shown, sort_keys=True)}")
    for line in kind.describe(spec):
        log(line)


def spec_command(module: str, spec_file: str | None, out: str | os.PathLike, default_out: Path) -> dict | None:
    """The command ``python -m <module> <spec file> [--out <out>]`` as sweep.json records it: ``{"module",
    "spec", "out"}``, ``out`` None where it is the command's default folder; None without a spec file (a spec
    built in code). The report writes it out (:func:`skipdiff.report.markdown.command_text`)."""
    if spec_file is None:
        return None
    return {"module": module, "spec": str(spec_file), "out": None if Path(out) == default_out else str(out)}


def relaunch_command(spec: SweepSpec, out: str | os.PathLike) -> dict | None:
    """The command that finishes this sweep's missing cells (its spec file and folder)."""
    return spec_command("skipdiff.sweep", spec.source, out, Path("runs") / "sweeps" / spec.name)


def run_sweep(
    spec: SweepSpec,
    out: str | os.PathLike,
    *,
    only: str | None = None,
    dry_run: bool = False,
    launcher: str = "inprocess",
    accelerate_args: Sequence[str] = (),
    num_threads: int | None = None,
    log: Log = print,
    relaunch: dict | None = None,
) -> list[dict]:
    """Validate every cell, then run the unfinished ones (those whose name contains ``only``).

    Returns the ``cell.json`` records of the selected cells (nothing is run or written when ``dry_run``).
    ``relaunch``: the command that finishes missing cells, recorded in sweep.json for the report (default
    :func:`relaunch_command`; a sweep built in code, e.g. a search's confirmation, names its own).
    """
    launch_with = Launcher(launcher, tuple(accelerate_args))  # checked before any work
    out = Path(out)
    cells = expand_cells(spec, out, num_threads)
    selected = select_cells(cells, only)
    for cell in selected:
        check_unchanged(cell)
    if dry_run:
        show_plan(spec, cells, selected, out, log)
        return []
    if num_threads:  # the evaluation runs in this process
        # heavy: torch only to set a sweep's threads
        import torch

        torch.set_num_threads(num_threads)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "sweep.json",
        {
            "name": spec.name,
            "kind": spec.kind,
            "description": spec.description,
            "spec": redact_spec(spec.raw),
            "spec_file": spec.source,
            "folder": str(out),
            "relaunch": relaunch or relaunch_command(spec, out),
            "eval": spec.eval,
            "eval_by": spec.eval_by,
            "cells": [c.name for c in cells],
        },
        default=str,
    )
    kind = get_kind(spec.kind)
    records, failed, in_use = [], [], []
    for i, cell in enumerate(selected, 1):
        status = cell_status(cell, kind)
        if status == "done":
            log(f"[{i}/{len(selected)}] {cell.name}: done, skipped")
            records.append(read_cell(cell.folder))
            continue
        log(f"[{i}/{len(selected)}] {cell.name}: {status}{eta(out, len(selected) - i + 1)}")
        try:
            records.append(run_cell(spec, cell, launch_with, log))
        except RunLockedError as err:  # another sweep trains it: nothing of it is touched, nor recorded as failed
            log(f"[{i}/{len(selected)}] {cell.name}: skipped, {err}")
            in_use.append(cell.name)
        except Exception as err:  # noqa: BLE001  one failing cell (e.g. diverged) must not stop the sweep
            if interrupted(err):
                raise  # its checkpoint is written and its cell.json says running: a relaunch resumes it
            log(f"[{i}/{len(selected)}] {cell.name} FAILED:\n{traceback.format_exc()}")
            failed.append(cell.name)
            records.append(record_failure(cell, err))
    problems = [f"{len(failed)} cell(s) failed (relaunch to retry them): {failed}"] if failed else []
    if in_use:  # not "done": this launch did not finish them
        problems.append(
            f"{len(in_use)} cell(s) in use by another process were left to it (relaunch once it "
            f"finishes to evaluate them here): {in_use}"
        )
    if problems:
        raise SweepError("; ".join(problems))
    log(f"sweep {spec.name}: {len(selected)} cell(s) done in {out}; report: python -m skipdiff.report {out}")
    return records


def eta(out: Path, remaining: int) -> str:
    """Mean duration of every finished cell of the sweep (this launch or earlier) times the cells left."""
    durations = []
    for path in sorted(out.glob("*/cell.json")):
        record = read_cell(path.parent) or {}
        if record.get("status") == "done" and "seconds" in record:
            durations.append(record["seconds"])
    if not durations:
        return " (ETA after the first cell)"
    each = sum(durations) / len(durations)
    return f" (ETA {duration(each * remaining)} for {remaining} cell(s) at {duration(each)} each)"


def duration(seconds: float) -> str:
    """``42 s``, ``17 min`` or ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
