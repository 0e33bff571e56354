"""eval/sweep_cost.py: a sweep's cost from its done cells' own records."""

import json

import pytest
from helpers.eval_scripts import eval_script


def cell(folder, name, seconds, status="done"):
    (folder / name).mkdir(parents=True)
    axes = [dict(zip(("axis", "label"), part.split("-", 1), strict=True)) for part in name.split("__") if "-" in part]
    record = {"name": name, "status": status, "seconds": seconds, "axes": axes}
    (folder / name / "cell.json").write_text(json.dumps(record))


def test_cost_counts_done_cells_only_and_groups_by_an_axis(tmp_path):
    cell(tmp_path, "skips-full__seed-0", 100.0)
    cell(tmp_path, "skips-full__seed-1", 140.0)
    cell(tmp_path, "skips-none__seed-0", 3600.0)
    cell(tmp_path, "skips-none__seed-1", 50.0, status="trained")  # not evaluated yet: not counted
    out = tmp_path / "cost.json"
    result = eval_script("sweep_cost").main(
        [str(tmp_path), "--out", str(out), "--measured", "today", "--group_by", "skips"]
    )
    assert result["cells"] == 3 and result["median_cell_seconds"] == 140.0
    assert result["total_core_hours"] == pytest.approx(3840 / 3600)
    assert result["by_skips"]["full"] == {"cells": 2, "median_cell_seconds": 120.0, "total_core_hours": 240 / 3600}
    assert result["by_skips"]["none"]["cells"] == 1
    assert json.loads(out.read_text()) == result and result["measured"] == "today"


def test_a_folder_without_done_cells_is_named(tmp_path):
    cell(tmp_path, "a__seed-0", 1.0, status="trained")
    with pytest.raises(SystemExit, match="no finished cell"):
        eval_script("sweep_cost").main([str(tmp_path), "--out", str(tmp_path / "c.json"), "--measured", "x"])
