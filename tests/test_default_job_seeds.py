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
    results = module.main(["collect", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    summary = results["summary"]
    assert summary["seeds"] == [0, 3]
    assert summary["fid"]["mean"] == pytest.approx(0.65)
    assert summary["fid_over_floor"]["mean"] == pytest.approx((2.0 + 0.7 / 0.3) / 2)
    assert summary["two_minus_one_thread_fid"] == pytest.approx({"3": 0.05})
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (
        "| 3 | 0.700 ± 0.100 | 0.300 | 2.33 | 0.400 | 0.2000 | 0.650 |" in (tmp_path / "out" / "table.md").read_text()
    )


def test_the_recipe_at_two_threads_is_paired_on_fresh_seeds_only(tmp_path, monkeypatch):
    module = driver()
    monkeypatch.setattr(module, "RECIPE_RESULTS", tmp_path / "none.json")
    for seed, fid in ((0, 0.5), (1, 0.6), (2, 0.7), (3, 0.55)):
        seed_folder(tmp_path / "vpred", seed, fid, 0.3)
    for seed, fid in ((0, 0.1), (1, 0.9), (2, 1.1), (4, 2.0)):  # seed 0: the screen's; 4: no shipped run
        seed_folder(tmp_path / "epsilon", seed, fid, 0.3)
    (tmp_path / "epsilon" / "times.txt").write_text("seed 1 rc 0 300 s\nseed 2 rc 0 310 s\n")
    results = module.main(
        [
            "collect",
            str(tmp_path / "vpred"),
            "--epsilon_folder",
            str(tmp_path / "epsilon"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert [row["seed"] for row in results["epsilon_runs"]] == [0, 1, 2, 4]
    assert results["epsilon_wall_seconds"] == {"1": 300, "2": 310}
    comparison = results["recipe_at_two_threads"]
    assert comparison["reference"] == "epsilon (old default)"
    shipped = next(row for row in comparison["rows"] if row["configuration"] == "v-prediction (shipped)")
    assert shipped["shared_seeds"] == 2  # seeds 1 and 2: the screen's seed 0 and the unpaired 3, 4 left out
    assert shipped["delta"] == pytest.approx(((0.6 - 0.9) + (0.7 - 1.1)) / 2)
    text = (tmp_path / "out" / "table.md").read_text()
    assert signflip_row(results)["test"] == "paired"  # 2 pairs: fewer than an exact sign-flip test needs
    assert "## The recipe at two threads" in text and "| 4 | 2.000 ± 0.100 | 0.300 | 6.67 | 1.700 | 0.2000 |" in text


def test_a_missing_epsilon_folder_is_named(tmp_path):
    seed_folder(tmp_path / "vpred", 1, 0.6, 0.3)
    with pytest.raises(SystemExit, match="nowhere: no such folder"):
        driver().main(["collect", str(tmp_path / "vpred"), "--epsilon_folder", str(tmp_path / "nowhere")])


def signflip_row(results: dict) -> dict:
    rows = results["recipe_at_two_threads_signflip"]["rows"]
    return next(row for row in rows if row["configuration"] == "v-prediction (shipped)")


def test_six_fresh_pairs_get_the_exact_sign_flip_test(tmp_path, monkeypatch):
    module = driver()
    monkeypatch.setattr(module, "RECIPE_RESULTS", tmp_path / "none.json")
    for seed in range(7):
        seed_folder(tmp_path / "vpred", seed, 0.6 + 0.01 * seed, 0.3)
        seed_folder(tmp_path / "epsilon", seed, 0.9 - 0.02 * seed, 0.3)
    results = module.main(
        ["collect", str(tmp_path / "vpred"), "--epsilon_folder", str(tmp_path / "epsilon"), "--out", str(tmp_path)]
    )
    row = signflip_row(results)
    assert row["test"] == "sign-flip" and row["shared_seeds"] == 6
    assert row["p"] == pytest.approx(2 / 2**6)  # every fresh pair one way: the exact two-sided p


def test_run_trains_and_evaluates_each_seed_not_yet_evaluated(tmp_path, monkeypatch):
    module = driver()
    seed_folder(tmp_path, 0, 0.6, 0.3)  # evaluated already: skipped
    calls = []

    def fake_run(command, cwd, stdout, stderr):
        calls.append((command, Path(cwd).name))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    module.main(["run", str(tmp_path), "--seeds", "0", "3", "--prediction_type", "epsilon"])
    assert [folder for _, folder in calls] == ["seed-3", "seed-3"]
    (train, _), (evaluate, _) = calls
    assert train[train.index("--seed") + 1] == "3" and train[-2:] == ["--prediction_type", "epsilon"]
    assert train[train.index("--num_threads") + 1] == "2" and "--resume_from_checkpoint" in train
    assert evaluate[2:5] == ["skipdiff.eval", "--checkpoint", "runs/digits-latent"] and "--fid" in evaluate
    assert (tmp_path / "times.txt").read_text().startswith("seed 3 rc 0 ")


def test_run_stops_at_a_failed_seed_and_names_its_log(tmp_path, monkeypatch):
    module = driver()
    monkeypatch.setattr(module.subprocess, "run", lambda *a, **k: type("Failed", (), {"returncode": 3})())
    with pytest.raises(SystemExit, match="seed 1: exit code 3, see .*seed-1/train.log"):
        module.main(["run", str(tmp_path), "--seeds", "1", "2"])
    assert not (tmp_path / "seed-2").exists()
    assert (tmp_path / "times.txt").read_text().startswith("seed 1 rc 3 ")


def test_run_refuses_repeated_seeds_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"--seeds \[1, 1\]"):
        driver().main(["run", str(tmp_path / "x"), "--seeds", "1", "1"])
    assert not (tmp_path / "x").exists()
