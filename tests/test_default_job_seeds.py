"""eval/default_job_seeds.py: the shipped default job over training seeds, each seed next to its floor and to
the one-thread sweep cell of the same seed."""

import json
from pathlib import Path

import pytest
from helpers.eval_scripts import eval_script


def driver():
    return eval_script("default_job_seeds")


def seed_folder(root: Path, seed: int, fid: float, floor: float) -> None:
    folder = root / f"seed-{seed}" / "runs" / "digits-latent" / "eval"
    folder.mkdir(parents=True)
    summary = {"fid": {"mean": fid, "std": 0.1}, "floor_fid": {"mean": floor, "std": 0.01}}
    (folder / "eval.json").write_text(json.dumps({"fid": {"summary": summary}, "denoise": {"mean": 0.2}}))


def test_seeds_are_summarised_and_paired_with_the_one_thread_cells(tmp_path, monkeypatch):
    module = driver()
    for seed, fid in ((0, 0.6), (3, 0.7)):
        seed_folder(tmp_path / "runs", seed, fid, 0.3)
    (tmp_path / "runs" / "seed-4").mkdir()  # not evaluated yet: left out
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps({"runs": [{"recipe": "vpred", "seed": 3, "fid": 0.65}, {"recipe": "default", "seed": 3, "fid": 9}]})
    )
    monkeypatch.setattr(module, "RECIPE_RESULTS", recipe)
    results = module.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    summary = results["summary"]
    assert summary["seeds"] == [0, 3]
    assert summary["fid"]["mean"] == pytest.approx(0.65)
    assert summary["fid_over_floor"]["mean"] == pytest.approx((2.0 + 0.7 / 0.3) / 2)
    assert summary["two_minus_one_thread_fid"] == pytest.approx({"3": 0.05})
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (
        "| 3 | 0.700 ± 0.100 | 0.300 | 2.33 | 0.400 | 0.2000 | 0.650 |" in (tmp_path / "out" / "table.md").read_text()
    )
