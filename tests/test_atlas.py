"""The skip atlas: every field's spec comes from one template, and the atlas table ranks every field's
confirmed rows against that field's full with one Holm family over the atlas and equivalence margins."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from helpers.eval_scripts import eval_script

from skipdiff.search.atlas import main, pareto_front, write_atlas
from skipdiff.search.spec import load_search_spec


def _atlas_driver():
    return eval_script("atlas", "atlas_driver")


def test_every_field_spec_is_the_template_with_its_dataset_and_parses():
    driver = _atlas_driver()
    spaces = set()
    for field in driver.FIELDS:
        path = driver.spec_path(field)
        assert path.read_text() == driver.spec_text(field), f"{path} is stale: run python eval/atlas.py specs"
        spec = load_search_spec(path)
        assert spec.base["dataset"] == field
        spaces.add(json.dumps(spec.raw["space"], sort_keys=True))
    assert len(spaces) == 1  # one space for every field, so importances and configurations compare
    assert len(driver.FIELDS) >= 5


def test_the_gpu_spec_is_the_templates_space_at_cifar10_scale():
    driver = _atlas_driver()
    assert driver.GPU_SPEC.read_text() == driver.gpu_spec_text(), "run `python eval/atlas.py specs --gpu`"
    gpu, cpu = load_search_spec(driver.GPU_SPEC), load_search_spec(driver.spec_path("digits"))
    assert gpu.base["dataset_name"] == "cifar10" and gpu.base["model"] == "cifar10" and gpu.base["vae"] == "none"
    assert set(gpu.space.params) == {k for k in cpu.space.params if not k.startswith("model.")}  # the same skip space
    assert gpu.prune["steps"] == [16000, 33000] and gpu.base["max_train_steps"] == 50000 and not gpu.constraints


def test_every_fields_confirmation_asks_no_more_fid_samples_than_its_floor_can_match():
    """The FID floor compares as many held-out real images as samples: moon's confirmation at 500 failed in
    every cell (its train split has 396), after 12 trainings."""
    from skipdiff.data import load_image_splits
    from skipdiff.data_options import DataOptions

    driver = _atlas_driver()
    for field in driver.FIELDS:
        splits = load_image_splits(DataOptions(dataset=field))
        wanted = load_search_spec(driver.spec_path(field)).confirm["eval"]["num_samples"]
        assert wanted <= max(len(splits["train"]), len(splits["test"])), field


def test_the_driver_refuses_a_stale_spec(tmp_path, monkeypatch, capsys):
    driver = _atlas_driver()
    monkeypatch.setattr(driver, "spec_path", lambda field: tmp_path / f"atlas_{field}.yaml")
    (tmp_path / "atlas_moon.yaml").write_text("kind: training\n")
    assert driver.main(["search", "--fields", "moon"]) == 2
    assert "out of date" in capsys.readouterr().err


def _field(folder: Path, mse: dict, fid: dict | None, floor: float = 0.4) -> Path:
    """A search report folder as ``python -m skipdiff.report`` writes it, with per-seed confirmation values."""
    folder.mkdir(parents=True)
    trials = [
        {
            "number": 0,
            "state": "complete",
            "params": {"skips": "full"},
            "values": [0.30],
            "seconds": 60.0,
            "folder": "runs/x/trials/trial-0000",
            "flops": 4.5e7,
        },
        {
            "number": 1,
            "state": "complete",
            "params": {"skips": "linear"},
            "values": [0.29],
            "seconds": 60.0,
            "folder": "runs/x/trials/trial-0001",
            "flops": 3.0e7,
            "markov_open": {"0": 0.9, "8": 0.6},
        },
        {
            "number": 2,
            "state": "pruned",
            "params": {"skips": "per_skip"},
            "values": None,
            "seconds": 20.0,
            "folder": "runs/x/trials/trial-0002",
        },
        {
            "number": 3,
            "state": "complete",
            "params": {"skips": "full"},
            "values": [0.30],
            "seconds": None,
            "folder": None,
            "duplicate_of": 0,
        },
    ]  # a repeat: answered from trial 0, not counted
    rows = [
        {"configuration": name, "values_by_seed": {str(s): v for s, v in values.items()}}
        for name, values in mse.items()
    ]
    summary = {
        "name": folder.name,
        "counts": {"complete": 2, "pruned": 1},
        "importance": {"skips": 0.7, "linear.inner": 0.3},
        "trials": trials,
        "confirmation": {"objective": "denoise_mse", "ranking": {"rows": rows}},
    }
    (folder / "search_summary.json").write_text(json.dumps(summary))
    if fid is not None:
        (folder / "confirmation").mkdir()
        rows = [
            {"configuration": f"config={n}", "values_by_seed": {str(s): v for s, v in vals.items()}}
            for n, vals in fid.items()
        ]
        table = {"fid_floor": {"mean": floor}, "ranking": {"metric": "fid", "rows": rows}}
        (folder / "confirmation" / "summary.json").write_text(json.dumps({"datasets": {"x, 16px": table}}))
    return folder


SEEDS = range(100, 106)


def test_atlas_ranks_every_field_against_its_full_in_one_holm_family(tmp_path):
    ref = {s: 0.30 + 0.001 * (s % 3) for s in SEEDS}
    better = {s: v - 0.02 + 0.0005 * (s % 2) for s, v in ref.items()}  # clearly lower on every seed
    same = {s: v + 0.0002 * (-1) ** s for s, v in ref.items()}  # within ±0.003 on every seed
    a = _field(
        tmp_path / "hubble",
        {"reference": ref, "trial-0001": better},
        {"reference": {s: 3.0 for s in SEEDS}, "trial-0001": {s: 3.0 + 0.01 * (-1) ** s for s in SEEDS}},
    )
    b = _field(tmp_path / "moon", {"reference": ref, "trial-0001": same}, None)
    c = _field(tmp_path / "cells", {"reference": ref, "trial-0001": better}, None)
    (c / "search_summary.json").write_text(
        json.dumps({**json.loads((c / "search_summary.json").read_text()), "confirmation": None})
    )  # not confirmed yet
    md = write_atlas([a, b, c], tmp_path / "atlas")
    atlas = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    by_field = {f["field"]: f for f in atlas["fields"]}
    hubble = {r["configuration"]: r for r in by_field["hubble"]["confirmation"]["denoise"]["rows"]}
    moon = {r["configuration"]: r for r in by_field["moon"]["confirmation"]["denoise"]["rows"]}
    assert hubble["trial-0001"]["verdict"] == "better"
    assert moon["trial-0001"]["verdict"].startswith("equivalent within")
    family = by_field["hubble"]["confirmation"]["denoise"]["family"]
    assert family["scope"] == "atlas" and family["rows_tested"] == 2  # hubble's and moon's rows: one family
    assert by_field["moon"]["confirmation"]["denoise"]["family"] == family
    assert hubble["trial-0001"]["p_holm"] >= hubble["trial-0001"]["p"]
    fid = {r["configuration"]: r for r in by_field["hubble"]["confirmation"]["fid"]["rows"]}
    assert fid["trial-0001"]["verdict"].startswith("equivalent within ±0.3")
    assert by_field["cells"]["confirmation"] == {}
    text = md.read_text()
    assert "| cells | not confirmed yet (search: 3 trials)" in text
    assert "FID−floor 2.600" in text  # the reference's FID (3.0) minus its floor (0.4)
    assert '`{"skips": "linear"}`' in text  # the confirmed row's parameters, from its trial folder's name
    assert by_field["hubble"]["markov_open"] == {"trial": 1, "open": {"0": 0.9, "8": 0.6}}
    assert (tmp_path / "atlas" / "importance.png").is_file() and (tmp_path / "atlas" / "front.png").is_file()


def test_pareto_front_keeps_only_points_nothing_beats_on_both():
    points = [(3e7, 0.29, 1), (4.5e7, 0.30, 0), (1e7, 0.35, 2), (2e7, 0.31, 3), (2e7, 0.36, 4)]
    assert [p["trial"] for p in pareto_front(points)] == [2, 3, 1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--margin", "fid=-1"], "a margin must be a positive number"),
        (["--margin", "kid=0.1"], "the atlas tests"),
    ],
)
def test_atlas_command_line_refuses_bad_margins(tmp_path, capsys, argv, message):
    folder = _field(tmp_path / "moon", {"reference": {100: 0.3}}, None)
    assert main([str(folder), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_atlas_command_line_names_a_folder_without_a_report(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_trial_extras_reads_flops_and_the_chains_last_open_rates(tmp_path):
    from skipdiff.search.report import trial_extras

    (tmp_path / "trial.json").write_text(
        json.dumps({"model_record": {"flops": 4.5e7, "parameters": 1624900}, "seconds": 61.5})
    )
    chain = {"skips": [0, 4, 8], "marginals": [0.9, 0.5, 0.7]}
    lines = [
        {"step": 5, "loss": 1.0},
        {"step": 10, "loss": 0.9, "markov": {**chain, "marginals": [0.8, 0.8, 0.8]}},
        {"step": 15, "loss": 0.8, "markov": chain},
        {"step": 20, "loss": 0.7},
    ]
    (tmp_path / "stats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert trial_extras(tmp_path) == {
        "flops": 4.5e7,
        "parameters": 1624900,
        "seconds": 61.5,
        "markov_open": {"0": 0.9, "4": 0.5, "8": 0.7},
    }
    assert trial_extras(tmp_path / "missing") == {}


def test_transfer_matrix_pairs_each_source_with_the_targets_full_and_own_best(tmp_path):
    ref = {s: 0.30 + 0.001 * (s % 3) for s in SEEDS}
    best = {s: v - 0.01 for s, v in ref.items()}
    fields = [_field(tmp_path / name, {"reference": ref, "trial-0001": best}, None) for name in ("hubble", "moon")]
    transfer = {
        "datasets": {
            "moon, 16px": {
                "configurations": {
                    "config=from-hubble": {
                        "seeds": [100, 101, 102],
                        "values": {"denoise": [0.28, 0.281, 0.282], "fid": [None] * 3},
                    }
                }
            }
        }
    }
    (fields[1] / "transfer").mkdir()
    (fields[1] / "transfer" / "summary.json").write_text(json.dumps(transfer))
    md = write_atlas(fields, tmp_path / "atlas").read_text()
    atlas = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    moon = {r["configuration"]: r for r in atlas["transfer"]["denoise"]["moon"]["rows"]}
    assert set(moon) == {"reference", "from-hubble", "own best"} and atlas["transfer"]["own_best"] == {
        "moon": "trial-0001"
    }
    assert moon["from-hubble"]["pairs"] == 3 and moon["own best"]["pairs"] == 3  # on the transfer's seeds only
    own = {r["configuration"]: r for r in atlas["transfer"]["against_own_best"]["denoise"]["moon"]["rows"]}
    assert own["from-hubble"]["delta"] == pytest.approx(0.281 - statistics.fmean(best[s] for s in (100, 101, 102)))
    assert atlas["transfer"]["denoise"]["moon"]["family"]["scope"] == "transfer"
    assert "hubble" not in atlas["transfer"]["denoise"]  # no transfer onto hubble was run
    assert "| moon | " in md and (tmp_path / "atlas" / "transfer.png").is_file()


def test_transfer_matrix_pairs_within_the_transfer_sweep_when_it_retrained_full_and_own_best(tmp_path):
    """Another session (the VAE retrained) moved photo_patches' full: the transferred configurations are
    compared with the full and own best the transfer sweep trained beside them, and the rerun's distance from
    the confirmation's full is reported as the null control."""
    ref = {s: 0.30 + 0.001 * (s % 3) for s in SEEDS}
    best = {s: v - 0.01 for s, v in ref.items()}
    fields = [_field(tmp_path / name, {"reference": ref, "trial-0001": best}, None) for name in ("hubble", "moon")]
    seeds = [100, 101, 102]
    shifted = [ref[s] + 0.005 for s in seeds]  # the rerun lands 0.005 above the confirmation's full
    configurations = {
        "config=from-hubble": [v - 0.002 for v in shifted],
        "config=full-rerun": shifted,
        "config=own-best-rerun": [v - 0.01 for v in shifted],
    }
    transfer = {
        "datasets": {
            "moon, 16px": {
                "configurations": {
                    name: {"seeds": seeds, "values": {"denoise": values, "fid": [None] * 3}}
                    for name, values in configurations.items()
                }
            }
        }
    }
    (fields[1] / "transfer").mkdir()
    (fields[1] / "transfer" / "summary.json").write_text(json.dumps(transfer))
    md = write_atlas(fields, tmp_path / "atlas").read_text()
    atlas = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    moon = {r["configuration"]: r for r in atlas["transfer"]["denoise"]["moon"]["rows"]}
    assert set(moon) == {"reference", "from-hubble", "own best"}  # the reruns are the reference and the own best
    assert moon["from-hubble"]["delta"] == pytest.approx(-0.002) and moon["own best"]["delta"] == pytest.approx(-0.01)
    own = {r["configuration"]: r for r in atlas["transfer"]["against_own_best"]["denoise"]["moon"]["rows"]}
    assert own["from-hubble"]["delta"] == pytest.approx(0.008)
    control = next(r for r in atlas["transfer"]["null_control"]["denoise"]["moon"]["rows"] if not r["is_reference"])
    assert control["delta"] == pytest.approx(0.005) and control["pairs"] == 3
    assert "The null control" in md and "| moon | +0.005" in md


def test_transfer_sweep_rebuilds_each_sources_confirmed_best_from_its_committed_report(tmp_path, monkeypatch):
    """The transfer reads a source's best from eval/results (its trial's parameters in the search report),
    not from the search's run folders, which a fresh checkout does not have."""
    driver = _atlas_driver()
    results, searches = tmp_path / "results", tmp_path / "searches"
    monkeypatch.setattr(driver, "RESULTS", results)
    monkeypatch.setattr(driver, "search_folder", lambda field: searches / f"atlas_{field}")
    ref = {s: 0.30 for s in SEEDS}
    folder = _field(
        results / "hubble",
        {"reference": ref, "trial-0005": {s: 0.29 for s in SEEDS}, "trial-0001": {s: 0.295 for s in SEEDS}},
        None,
    )
    summary = json.loads((folder / "search_summary.json").read_text())
    params = {
        "skips": "scalelong",
        "scalelong.kappa": 0.6,
        "model.block_out_channels": "[16, 32, 64]",
        "model.layers_per_block": 1,
    }  # as Optuna stores them: a list choice as its JSON text
    summary["trials"].append(
        {"number": 5, "state": "complete", "params": params, "values": [0.29], "folder": "runs/gone/trials/trial-0005"}
    )
    (folder / "search_summary.json").write_text(json.dumps(summary))
    sweep = driver.transfer_sweep("moon", driver.FIELDS)
    config = sweep["grid"]["config"]["from-hubble"]
    assert config["skips"] == "scalelong:kappa=0.6"
    assert Path(config["model"]).is_relative_to(searches / "atlas_moon")  # written next to the transfer
    model = json.loads(Path(config["model"]).read_text())
    assert model["block_out_channels"] == [16, 32, 64] and model["layers_per_block"] == 1
    assert model["down_block_types"][-1] == "AttnDownBlock2D"  # the rest is the preset's, as the trial's was
    assert sweep["grid"]["seed"] == [100, 101, 102] and sweep["base"]["dataset"] == "moon"
    assert list(sweep["grid"]["config"]) == ["from-hubble", "full-rerun"]  # the others have no confirmation yet
    assert sweep["grid"]["config"]["full-rerun"] == {"skips": "full"}  # the null control: the target's full again
