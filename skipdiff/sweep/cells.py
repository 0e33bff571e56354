"""One cell's state machine, recorded in ``<cell>/cell.json`` (written atomically).

What a relaunch does with a cell (:func:`cell_status`)::

    new       no folder yet                       -> train from scratch
    restart   a folder without a checkpoint        -> delete it (an earlier attempt), train from scratch
    resume    a folder with a checkpoint           -> train with --resume_from_checkpoint latest
    trained   cell.json has the training metrics   -> evaluate only
    done      cell.json says done                  -> nothing

``cell.json`` moves ``running -> trained -> done``; an exception records ``failed`` with the error, and
the next launch retries the cell from whichever state above applies (a failed evaluation keeps the
training). The training run owns its ``stats.jsonl``: a resumed run drops the records past its
checkpoint itself (``StatsWriter.truncate_after``). Kinds without training (:attr:`CellKind.trains`)
go from ``new`` straight to their evaluation.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..config import redact
from ..runfolder import RunLock, write_json_atomic
from . import launch
from .kinds import CellKind, get_kind
from .record import CELL_FILE, read_cell
from .spec import Cell, SweepSpec, results_options

STATES = ("new", "restart", "resume", "trained", "done")

Log = Callable[[str], None]


def _write(cell: Cell, record: dict) -> None:
    write_json_atomic(cell.folder / CELL_FILE, record, default=str)


def _checkpoints(folder: Path) -> list[Path]:
    # heavy: torch (checkpoints) only for a trained cell: the sweep command line answers bad arguments before it
    from ..training.checkpoints import list_checkpoints

    return list_checkpoints(folder)


def cell_status(cell: Cell, kind: CellKind) -> str:
    """What a launch does with the cell: one of :data:`STATES` (see the module docstring)."""
    record = read_cell(cell.folder) or {}
    if record.get("status") == "done":
        return "done"
    if "train_metrics" in record:
        return "trained"
    if kind.trains and _checkpoints(cell.folder):
        return "resume"
    return "restart" if cell.folder.exists() else "new"


def check_unchanged(cell: Cell) -> None:
    """A cell already (partly) run must have been run with the same result-deciding options."""
    record = read_cell(cell.folder)
    if record and record.get("options"):
        before, now = (results_options(redact(options)) for options in (record["options"], cell.options))
        differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differing:
            raise ValueError(
                f"cell {cell.name!r} was run with other options ({', '.join(differing)}): "
                "use another --out, or delete the cell's folder to rerun it"
            )


def _base_record(spec: SweepSpec, cell: Cell) -> dict:
    return {
        "name": cell.name,
        "kind": spec.kind,
        "axes": cell.axes,
        "options": redact(cell.options),
        "overrides": redact(cell.overrides),
        "variants": spec.inference_variants,
    }


def _prepare_folder(cell: Cell, kind: CellKind, record: dict, log: Log) -> dict:
    """The cell's options for this launch: resume from the latest checkpoint, or start in a clean folder.

    A cell whose folder another live process is training into (another sweep on the same ``--out``: its
    training lock) raises :class:`~skipdiff.runfolder.RunLockedError` before anything is deleted or written:
    without a checkpoint yet, that folder would look like an earlier attempt to delete."""
    RunLock(cell.folder, hint="the sweep leaves this cell to it: relaunch once it finishes").check_free()
    options = dict(cell.options)
    found = _checkpoints(cell.folder) if kind.trains else []
    if found:
        options["resume_from_checkpoint"] = "latest"
        log(f"  resuming {cell.name} from {found[-1].name}")
    elif cell.folder.exists() and any(cell.folder.iterdir()):
        if record.get("name") != cell.name:
            raise ValueError(
                f"{cell.folder} exists, holds no cell.json of this sweep and no checkpoint: "
                "move it away or choose another --out"
            )
        shutil.rmtree(cell.folder)  # an earlier attempt without a checkpoint: nothing to resume
    cell.folder.mkdir(parents=True, exist_ok=True)
    return options


def run_cell(spec: SweepSpec, cell: Cell, launcher: launch.Launcher | None = None, log: Log = print) -> dict:
    """Train (or resume; in this process unless ``launcher`` says otherwise) and evaluate one cell; returns
    its final ``cell.json`` record."""
    kind, launcher = get_kind(spec.kind), launcher or launch.Launcher()
    record = read_cell(cell.folder) or {}
    start = time.perf_counter()
    if "train_metrics" not in record:  # not trained yet (a failed evaluation keeps the training)
        options = _prepare_folder(cell, kind, record, log)
        record = {**_base_record(spec, cell), "status": "running"}
        _write(cell, record)
        if kind.trains:
            metrics = launch.train_cell(kind, options, launcher)
            record = {
                **record,
                "status": "trained",
                "train_metrics": metrics,
                "train_seconds": time.perf_counter() - start,
            }
            _write(cell, record)
    eval_start = time.perf_counter()
    kind.evaluate(spec, cell.folder, log)
    done = {**record, "status": "done", "eval_seconds": time.perf_counter() - eval_start}
    done["seconds"] = done.get("train_seconds", 0.0) + done["eval_seconds"]
    _write(cell, done)
    return done


def record_failure(cell: Cell, err: BaseException) -> dict:
    """Mark the cell ``failed`` with the error (kept for the next launch); returns the record."""
    record = {
        **(read_cell(cell.folder) or {"name": cell.name, "options": cell.options}),
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
    }
    if cell.folder.is_dir():
        _write(cell, record)
    return record
