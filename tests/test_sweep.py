"""The sweep runner and the report: a 2-cell micro sweep end to end (tiny UNet, 8x8 pixels, 4 steps).

One sweep is trained once per session (``micro_sweep``); tests that change it work on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from skipdiff import sweep
from skipdiff.report import rank, write_report
from skipdiff.runfolder import read_stats

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = dict(model="tiny", vae="none", resolution=8, train_batch_size=16, max_train_steps=4,
                 num_validation_images=4, validation_inference_steps=2, report_to="none", log_every=1,
                 num_threads=1, checkpointing_steps=2, lr_warmup_steps=1)  # fmt: skip
MICRO = {
    "kind": "diffusion",
    "description": "micro sweep for the tests",
    "base": TINY_BASE,
    "grid": {"skips": {"full": "full", "none": "none"}, "seed": [0]},
    "eval": {"denoise_loss": True, "grad_stability": True, "buckets": 2, "spike_window": 2},
    "inference_variants": {"identity": "freeu:b1=1:b2=1:s1=1:s2=1"},
}


def write_spec(folder: Path, data: dict, name: str = "micro") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Counter:
    """Wraps ``sweep.train_cell`` and records the cells it trained."""

    def __init__(self, monkeypatch):
        self.calls, original = [], sweep.train_cell

        def counted(kind, options, *args, **kwargs):
            self.calls.append((Path(options["output_dir"]).name, options.get("resume_from_checkpoint")))
            return original(kind, options, *args, **kwargs)

        monkeypatch.setattr(sweep, "train_cell", counted)


@pytest.fixture(scope="module")
def micro_sweep(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    spec = sweep.load_spec(write_spec(folder, MICRO))
    sweep.run_sweep(spec, folder / "out", num_threads=1, log=lambda line: None)
    return folder / "out"


def test_micro_sweep_trains_and_evaluates_every_cell(micro_sweep):
    names = json.loads((micro_sweep / "sweep.json").read_text())["cells"]
    assert names == ["skips-full__seed-0", "skips-none__seed-0"]
    for name in names:
        cell = json.loads((micro_sweep / name / "cell.json").read_text())
        assert cell["status"] == "done" and cell["train_metrics"]["steps"] == 4
        assert cell["options"]["skips"] == name.split("__")[0].removeprefix("skips-")
        assert cell["overrides"]["max_train_steps"] == 4 and "learning_rate" not in cell["overrides"]
        evaluation = json.loads((micro_sweep / name / "eval" / "eval.json").read_text())
        assert {"denoise", "grad_stability"} <= set(evaluation)
        options = json.loads((micro_sweep / name / "training_options.json").read_text())
        assert options["output_dir"] == str(micro_sweep / name) and options["seed"] == 0
        # A variant replaces the trained skips: identity FreeU on the full-skip model is that model (same
        # held-out loss on the same noise); on the no-skip model it opens the skips again.
        variant = json.loads(
            (micro_sweep / name / "variants" / "identity" / "eval" / "eval.json").read_text()
        )
        assert variant["skips"][0]["gate"].startswith("fourier")
        same = variant["denoise"]["mean"] == pytest.approx(evaluation["denoise"]["mean"], rel=1e-6)
        assert same == (name == "skips-full__seed-0")


def test_relaunch_skips_finished_cells(micro_sweep, monkeypatch):
    counter = Counter(monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in micro_sweep.glob("*/cell.json")}
    records = sweep.run_sweep(sweep.parse_spec(MICRO, "micro"), micro_sweep, log=lambda line: None)
    assert counter.calls == [] and [r["status"] for r in records] == ["done", "done"]
    assert {p: p.stat().st_mtime_ns for p in micro_sweep.glob("*/cell.json")} == before


def test_interrupted_cell_resumes_from_its_checkpoint(micro_sweep, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(micro_sweep, out)
    cell = out / "skips-none__seed-0"
    losses = {r["step"]: r["loss"] for r in read_stats(cell / "stats.jsonl") if "loss" in r}
    # As if killed after the checkpoint at step 2: no cell.json, no checkpoint-4.
    (cell / "cell.json").unlink()
    shutil.rmtree(cell / "checkpoint-4")
    counter = Counter(monkeypatch)
    lines = []
    sweep.run_sweep(sweep.parse_spec(MICRO, "micro"), out, num_threads=1, log=lines.append)
    assert counter.calls == [("skips-none__seed-0", "latest")]
    assert any("resuming skips-none__seed-0 from checkpoint-2" in line for line in lines)
    assert json.loads((cell / "cell.json").read_text())["status"] == "done"
    records = [r for r in read_stats(cell / "stats.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # no duplicated steps after the resume
    resumed = {r["step"]: r["loss"] for r in records}
    assert resumed == pytest.approx(losses, rel=1e-5)  # the same run, continued


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, monkeypatch, capsys):
    counter = Counter(monkeypatch)
    sweep.main([str(write_spec(tmp_path, MICRO)), "--out", str(tmp_path / "out"), "--dry_run"])
    printed = capsys.readouterr().out
    assert "[1/2] skips-full__seed-0 (new)" in printed and "[2/2] skips-none__seed-0 (new)" in printed
    assert '"max_train_steps": 4' in printed and "identity" in printed
    assert counter.calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"base": {**TINY_BASE, "max_train_step": 4}}, r"unknown option\(s\) \['max_train_step'\]"),
        ({"grid": {"skips": [], "seed": [0]}}, "grid axis 'skips' has no values"),
        ({"grid": {"skipz": ["full"]}}, "grid axis 'skipz' is no option"),
        ({"grid": {"skips": ["full", "not-a-preset"]}}, "not-a-preset"),
        ({"grid": {"seed": [0], "learning_rate": ["1e-3"]}}, "option 'learning_rate' must be float"),
        ({"eval": {"fid": True, "num_samples": 1}}, "num_samples must be >= 2"),
        ({"inference_variants": {"bad": "learned"}}, "adds parameters"),
        ({"colour": "blue"}, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_bad_specs_raise_before_anything_runs(tmp_path, monkeypatch, change, message):
    counter = Counter(monkeypatch)
    with pytest.raises(ValueError, match=message):
        sweep.main([str(write_spec(tmp_path, {**MICRO, **change})), "--out", str(tmp_path / "out")])
    assert counter.calls == [] and not (tmp_path / "out").exists()


def test_cell_names_and_union_of_grids():
    spec = sweep.parse_spec({"kind": "diffusion", "base": TINY_BASE, "grid": [
        {"skips": {"full": "full", "markov": {"skips": "markov", "markov": "warmup_steps=2"}}, "seed": [0, 1]},
        {"skips": ["full", "scalelong:kappa=0.5"], "seed": [1]}]}, "union")  # fmt: skip
    cells = sweep.expand_cells(spec, "out")
    assert [c.name for c in cells] == ["skips-full__seed-0", "skips-full__seed-1", "skips-markov__seed-0",
                                       "skips-markov__seed-1", "skips-scalelong_kappa_0.5__seed-1"]  # fmt: skip
    assert cells[2].options["markov"] == "warmup_steps=2" and cells[0].options["markov"] == ""
    clash = {"kind": "diffusion", "base": TINY_BASE,
             "grid": [{"skips": {"a": "full"}}, {"skips": {"a": "none"}}]}  # fmt: skip
    with pytest.raises(ValueError, match="appears in two grids with different options"):
        sweep.expand_cells(sweep.parse_spec(clash, "clash"), "out")


def test_with_skips_keeps_the_weights_and_refuses_parameter_changes():
    from skipdiff import SkipUNet2DModel
    from skipdiff.presets import unet_config

    unet = SkipUNet2DModel(**unet_config("tiny", sample_size=8, channels=1)).eval()
    sample, timesteps = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    same = sweep.with_skips(unet, "freeu:b1=1:b2=1:s1=1:s2=1")
    torch.testing.assert_close(same(sample, timesteps).sample, unet(sample, timesteps).sample)
    zeroed = sweep.with_skips(unet, "none")
    assert not torch.allclose(zeroed(sample, timesteps).sample, unet(sample, timesteps).sample)
    with pytest.raises(ValueError, match="do not fit skips"):
        sweep.with_skips(unet, "rezero")


def test_report_regenerates_byte_identically(micro_sweep, tmp_path):
    first = write_report(micro_sweep, tmp_path / "a")
    second = write_report(micro_sweep, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    pngs = sorted(p.name for p in first.parent.glob("*.png"))
    assert pngs == ["grad_skips-full__seed-0.png", "grad_skips-none__seed-0.png", "loss_digits_8px.png"]
    for name in pngs:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    text = first.read_text()
    assert "| skips=full | 1 |" in text and "| skips=full · identity (inference) | 1 |" in text
    assert "not distinguishable from seed noise (one seed: no test)" in text
    assert str(micro_sweep) not in text  # no absolute paths


def test_report_adds_a_map_row_for_stochastic_skips(micro_sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(micro_sweep, copy)
    eval_path = copy / "skips-full__seed-0" / "eval" / "eval.json"
    evaluation = json.loads(eval_path.read_text())
    evaluation["map"] = {"recommended": ["keep", "zero", "keep", "zero"], "closed": [1, 3], "fraction_closed": 0.5,
                         "flops_trained": 1000, "flops_map": 750, "flops_saved_fraction": 0.25,
                         "denoise": {"mean": 0.125}}  # fmt: skip
    eval_path.write_text(json.dumps(evaluation))
    text = write_report(copy, tmp_path / "report").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| skips=full · map (inference) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in text.splitlines() if line.startswith("| configuration |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    values = dict(zip(columns, cells, strict=True))
    assert values["denoise MSE ↓"] == "0.125"
    assert values["skips closed"] == "0.5" and values["FLOPs saved"] == "0.25"
    trained = next(line for line in text.splitlines() if line.startswith("| skips=full | 1 |"))
    assert dict(zip(columns, [c.strip() for c in trained.strip("|").split("|")], strict=True))["skips closed"] == "–"


def test_rank_separates_real_differences_from_seed_noise():
    ranking = rank(
        {"a": [1.0, 1.1, 0.9], "b": [5.0, 5.1, 4.9], "c": [1.2, 0.8, 1.3], "d": [0.5]}, lower_is_better=True
    )
    verdicts = {row["configuration"]: row["verdict"] for row in ranking}
    assert ranking[0]["configuration"] == "d"  # lowest mean, but a single seed
    # d against the others: the seed variance pooled over a, b, c (0.01, 0.01, 0.07; df 6) -> a t-test.
    tests = {row["configuration"]: row["test"] for row in ranking}
    assert tests == {"d": None, "a": "pooled", "b": "pooled", "c": "pooled"}
    assert verdicts["b"] == "worse beyond seed noise"  # t = 22.5
    assert verdicts["a"] == "worse beyond seed noise"  # t = 0.5 / sqrt(0.03 * 4/3) = 2.5, p = 0.047
    from scipy.stats import t

    expected = 2 * t.sf(abs(1.0 - 0.5) / (0.03 * (1 / 3 + 1)) ** 0.5, 6)
    assert next(r["p"] for r in ranking if r["configuration"] == "a") == pytest.approx(expected, rel=1e-9)
    alone = rank({"a": [1.0], "b": [5.0]}, lower_is_better=True)  # no configuration with two seeds: no test
    assert alone[1]["test"] is None and "one seed" in alone[1]["verdict"]
    ranking = rank({"a": [1.0, 1.1, 0.9], "b": [5.0, 5.1, 4.9], "c": [1.2, 0.8, 1.3]}, lower_is_better=True)
    verdicts = {row["configuration"]: row["verdict"] for row in ranking}
    assert verdicts == {
        "a": "best",
        "b": "worse beyond seed noise",
        "c": "not distinguishable from seed noise",
    }
    best_high = rank({"x": [0.9, 0.91], "y": [0.5, 0.52]}, lower_is_better=False)
    assert [r["configuration"] for r in best_high] == ["x", "y"]


def test_classifier_cell_runs_and_reports(tmp_path):
    spec = {"kind": "classifier",
            "base": dict(model="mlp", depth=1, hidden_size=8, train_batch_size=16, max_train_steps=3, log_every=1,
                         num_threads=1, report_to="none"),
            "grid": {"data": {"iris": {"dataset": "iris"}}, "skip_connections": {"skip": True, "plain": False},
                     "seed": [0]}}  # fmt: skip
    records = sweep.run_sweep(sweep.parse_spec(spec, "cls"), tmp_path / "out", log=lambda line: None)
    assert [r["status"] for r in records] == ["done", "done"]
    text = write_report(tmp_path / "out", tmp_path / "report").read_text()
    assert "## iris" in text and "| skip_connections=skip | 1 |" in text and "test accuracy" in text


def test_builtin_specs_are_valid():
    for path in sorted((REPO / "eval" / "sweeps").glob("*.yaml")):
        spec = sweep.load_spec(path)
        cells = sweep.expand_cells(spec, "runs/sweeps/x")
        assert cells, path
