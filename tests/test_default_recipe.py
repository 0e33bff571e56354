"""eval/default_recipe.py: the committed runs whose folders are gone are carried into a new collection, and the
confirmation leaves out the screen's training seed (selection data)."""

import json

import pytest
from helpers.eval_scripts import eval_script


def driver():
    return eval_script("default_recipe")


def run(recipe: str, seed: int, fid: float) -> dict:
    return {"cell": f"recipe-{recipe}__seed-{seed}", "recipe": recipe, "seed": seed, "fid": fid}


def test_carried_runs_keeps_committed_cells_without_a_folder(tmp_path):
    committed = [run("default", 1, 1.0), run("vpred", 1, 0.6)]
    (tmp_path / "results.json").write_text(json.dumps({"runs": committed}))
    carried = driver().carried_runs(tmp_path, present={"recipe-vpred__seed-1"})
    assert carried == [{**committed[0], "carried": True}]


def test_carried_runs_without_a_committed_file(tmp_path):
    assert driver().carried_runs(tmp_path, present=set()) == []


def test_confirmation_leaves_out_the_screen_seed():
    module = driver()
    # seed 0 (the screen) would flip the sign if it were counted: vpred is much worse there
    runs = [run("default", 0, 0.5), run("vpred", 0, 5.0)]
    for seed, (default, vpred) in enumerate([(1.00, 0.60), (0.90, 0.55), (1.10, 0.62)], start=1):
        runs += [run("default", seed, default), run("vpred", seed, vpred)]
    result = module.confirmation(runs)
    (row,) = [r for r in result["rows"] if r["configuration"] == "vpred"]
    assert row["shared_seeds"] == 3
    assert set(row["values_by_seed"]) == {"1", "2", "3"}
    assert row["delta"] < 0


def test_confirmation_needs_two_fresh_default_seeds():
    runs = [run("default", 0, 0.9), run("default", 1, 1.0), run("vpred", 0, 0.5), run("vpred", 1, 0.6)]
    assert driver().confirmation(runs) is None


def test_the_sign_flip_confirmation_uses_the_same_fresh_pairs():
    runs = [run("default", 0, 0.5), run("vpred", 0, 5.0)]
    for seed in range(1, 7):
        runs += [run("default", seed, 1.0 + 0.01 * seed), run("vpred", seed, 0.6)]
    result = driver().confirmation(runs, "sign-flip")
    (row,) = [r for r in result["rows"] if r["configuration"] == "vpred"]
    assert result["test"] == "sign-flip" and row["shared_seeds"] == 6
    assert row["p"] == pytest.approx(2 / 2**6)  # all 6 pairs one way: the exact two-sided sign-flip p
