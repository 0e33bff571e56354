"""What a sweep's finished cells cost, from their own records: ``cell.json``'s ``seconds`` (training plus
evaluation, in the cell's process) for every done cell of a sweep folder.

    python eval/sweep_cost.py runs/sweeps/confounds --out eval/results/confounds/cost.json \
        --measured "2026-12-08, the shared 2-core CPU, two one-thread runners side by side"

Core-hours assume one thread per cell (``--num_threads 1``, as the sweeps under ``eval/sweeps`` are run):
the sum of the cells' seconds. Cells that ran at different times on a shared machine are not a timing
benchmark; the median is the number to plan with.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from skipdiff.report.read import load_sweep
from skipdiff.runfolder import write_json_atomic


def done_cells(folder: Path) -> list[dict]:
    """The cell records of ``folder`` (skipdiff.report.read.load_sweep) that are done and timed."""
    _, cells = load_sweep(folder)
    return [cell for cell in cells if cell.get("status") == "done" and cell.get("seconds") is not None]


def cost(cells: list[dict], group_by: str | None = None) -> dict:
    """Cells, median and total of the cells' ``seconds``; with ``group_by`` (an axis of the grid, as each
    record's ``axes`` names it) the same per label of that axis."""

    def totals(values: list[float]) -> dict:
        return {
            "cells": len(values),
            "median_cell_seconds": statistics.median(values),
            "total_core_hours": sum(values) / 3600,
        }

    result = totals([float(cell["seconds"]) for cell in cells])
    if group_by:
        groups: dict[str, list[float]] = {}
        for cell in cells:
            labels = {axis["axis"]: axis["label"] for axis in cell.get("axes", [])}
            groups.setdefault(labels.get(group_by, "?"), []).append(float(cell["seconds"]))
        result["by_" + group_by] = {label: totals(values) for label, values in sorted(groups.items())}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the sweep folder (runs/sweeps/<name>)")
    parser.add_argument("--out", type=Path, required=True, help="the cost.json to write")
    parser.add_argument("--measured", required=True, help="when and on what the cells ran (recorded as given)")
    parser.add_argument("--group_by", help="an axis of the grid to total separately (e.g. skips)")
    args = parser.parse_args(argv)
    try:
        cells = done_cells(args.folder)
    except ValueError as err:  # no such folder, or no cells in it
        raise SystemExit(str(err)) from err
    if not cells:
        raise SystemExit(f"{args.folder}: no finished cell (*/cell.json with status done)")
    result = {"measured": args.measured, "folder": str(args.folder), **cost(cells, args.group_by)}
    write_json_atomic(args.out, result)
    print(result)
    return result


if __name__ == "__main__":
    main()
