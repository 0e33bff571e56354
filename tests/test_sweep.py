"""The sweep runner and the report: a 2-cell micro sweep end to end (tiny UNet, 8x8 pixels, 4 steps).

One sweep is trained once per session (``micro_sweep``); tests that change it work on a copy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from skipdiff import report, sweep
from skipdiff.config import option
from skipdiff.report import write_report
from skipdiff.report.ranking import compare
from skipdiff.runfolder import read_stats
from skipdiff.sweep import launch

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = dict(
    model="tiny",
    vae="none",
    resolution=8,
    train_batch_size=16,
    max_train_steps=4,
    num_validation_images=4,
    validation_inference_steps=2,
    report_to="none",
    log_every=1,
    num_threads=1,
    checkpointing_steps=2,
    lr_warmup_steps=1,
)
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
    """Wraps ``launch.train_cell`` and records the cells it trained."""

    def __init__(self, monkeypatch):
        self.calls, original = [], launch.train_cell

        def counted(kind, options, *args, **kwargs):
            self.calls.append((Path(options["output_dir"]).name, options.get("resume_from_checkpoint")))
            return original(kind, options, *args, **kwargs)

        monkeypatch.setattr(launch, "train_cell", counted)


@pytest.fixture(scope="module")
def micro_sweep(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    spec = sweep.load_spec(write_spec(folder, MICRO))
    sweep.run_sweep(spec, folder / "out", num_threads=1, log=lambda line: None)
    return folder / "out"


@pytest.mark.slow
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
        variant = json.loads((micro_sweep / name / "variants" / "identity" / "eval" / "eval.json").read_text())
        assert variant["skips"][0]["gate"].startswith("fourier")
        same = variant["denoise"]["mean"] == pytest.approx(evaluation["denoise"]["mean"], rel=1e-6)
        assert same == (name == "skips-full__seed-0")


@pytest.mark.slow
def test_relaunch_skips_finished_cells(micro_sweep, monkeypatch):
    counter = Counter(monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in micro_sweep.glob("*/cell.json")}
    records = sweep.run_sweep(sweep.parse_spec(MICRO, "micro"), micro_sweep, log=lambda line: None)
    assert counter.calls == [] and [r["status"] for r in records] == ["done", "done"]
    assert {p: p.stat().st_mtime_ns for p in micro_sweep.glob("*/cell.json")} == before


@pytest.mark.slow
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
        ({"eval": {"fid": True, "num_samples": 1500}}, r"needs as many held-out real images .* train 1437 / test 360"),
        ({"eval_by": {"sed": {"0": {"buckets": 2}}}}, "eval_by: 'sed' is not a grid axis"),
        ({"eval_by": {"skips": {"nope": {"buckets": 2}}}}, r"eval_by.skips: 'nope' is not one of its labels"),
        ({"eval_by": {"skips": {"none": {"fid": True, "num_samples": 1}}}}, "num_samples must be >= 2"),
    ],
)
def test_bad_specs_raise_before_anything_runs(tmp_path, monkeypatch, change, message):
    counter = Counter(monkeypatch)
    with pytest.raises(ValueError, match=message):
        sweep.main([str(write_spec(tmp_path, {**MICRO, **change})), "--out", str(tmp_path / "out")])
    assert counter.calls == [] and not (tmp_path / "out").exists()


def test_eval_by_overrides_the_evaluation_of_one_label_only():
    spec = sweep.parse_spec({**MICRO, "eval_by": {"skips": {"none": {"buckets": 3, "denoise_loss": False}}}}, "by")
    cells = {c.name: c for c in sweep.expand_cells(spec, "out")}
    assert spec.eval_for(cells["skips-none__seed-0"].axes) == {**MICRO["eval"], "buckets": 3, "denoise_loss": False}
    assert spec.eval_for(cells["skips-full__seed-0"].axes) == MICRO["eval"]


def test_cell_names_and_union_of_grids():
    spec = sweep.parse_spec(
        {
            "kind": "diffusion",
            "base": TINY_BASE,
            "grid": [
                {"skips": {"full": "full", "markov": {"skips": "markov", "markov": "warmup_steps=2"}}, "seed": [0, 1]},
                {"skips": ["full", "scalelong:kappa=0.5"], "seed": [1]},
            ],
        },
        "union",
    )
    cells = sweep.expand_cells(spec, "out")
    assert [c.name for c in cells] == [
        "skips-full__seed-0",
        "skips-full__seed-1",
        "skips-markov__seed-0",
        "skips-markov__seed-1",
        "skips-scalelong_kappa_0.5__seed-1",
    ]
    assert cells[2].options["markov"] == "warmup_steps=2" and cells[0].options["markov"] == ""
    clash = {"kind": "diffusion", "base": TINY_BASE, "grid": [{"skips": {"a": "full"}}, {"skips": {"a": "none"}}]}
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


@pytest.mark.slow
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
    assert "exploratory: 1 shared seed(s)" in text  # one seed each: values, no test
    assert str(micro_sweep) not in text  # no absolute paths


@pytest.mark.slow
def test_report_adds_a_map_row_for_stochastic_skips(micro_sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(micro_sweep, copy)
    eval_path = copy / "skips-full__seed-0" / "eval" / "eval.json"
    evaluation = json.loads(eval_path.read_text())
    evaluation["map"] = {
        "recommended": ["keep", "zero", "keep", "zero"],
        "closed": [1, 3],
        "fraction_closed": 0.5,
        "flops_trained": 1000,
        "flops_map": 750,
        "flops_saved_fraction": 0.25,
        "denoise": {"mean": 0.125},
    }
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


def test_every_row_is_tested_against_the_reference_by_seed():
    from scipy.stats import ttest_rel

    values = {
        "full": {0: 1.0, 1: 1.1, 2: 0.9},
        "b": {0: 5.0, 1: 5.2, 2: 4.9},
        "c": {0: 1.2, 1: 0.8, 2: 1.3},
        "d": {0: 0.5},
    }
    result = compare(values, "full", lower_is_better=True)
    rows = {row["configuration"]: row for row in result["rows"]}
    # d has the lowest value, but it is one seed and not the reference: it is ranked like any other row.
    assert [r["configuration"] for r in result["rows"]] == ["d", "full", "c", "b"]  # by difference from full
    assert rows["full"]["verdict"] == "reference" and rows["full"]["p"] is None
    assert {name: row["test"] for name, row in rows.items()} == {"full": None, "b": "paired", "c": "paired", "d": None}
    assert rows["b"]["p"] == pytest.approx(ttest_rel([5.0, 5.2, 4.9], [1.0, 1.1, 0.9]).pvalue, rel=1e-9)
    assert rows["c"]["p"] == pytest.approx(ttest_rel([1.2, 0.8, 1.3], [1.0, 1.1, 0.9]).pvalue, rel=1e-9)
    # d: one shared seed. It is exploratory (its values, no p): testing it against the sd of b's and c's
    # differences assumed they all share one seed noise, which made that test's size unknown (issue 26).
    assert rows["d"]["exploratory"] and rows["d"]["p"] is None and rows["d"]["verdict"].startswith("exploratory")
    assert rows["d"]["fewer_seeds"] and not rows["c"]["fewer_seeds"]
    # Holm over the two tests, by hand: sorted p's times 2, 1, made non-decreasing.
    ps = sorted((rows[n]["p"], n) for n in "bc")
    expected, running = {}, 0.0
    for k, (p, name) in enumerate(ps):
        running = max(running, min(1.0, (2 - k) * p))
        expected[name] = running
    assert {n: rows[n]["p_holm"] for n in "bc"} == pytest.approx(expected, rel=1e-12)
    assert rows["b"]["verdict"] == "worse"
    assert rows["c"]["verdict"] == "undecided at this seed count"
    alone = compare({"a": {0: 1.0}, "b": {0: 5.0}}, "a", lower_is_better=True)  # one seed: no test
    assert alone["rows"][1]["test"] is None and "exploratory: 1 shared seed" in alone["rows"][1]["verdict"]
    best_high = compare({"x": {0: 0.9, 1: 0.91}, "y": {0: 0.5, 1: 0.52}}, "y", lower_is_better=False)
    assert [r["configuration"] for r in best_high["rows"]] == ["x", "y"]
    assert best_high["rows"][0]["delta"] == pytest.approx(0.395)


def test_classifier_cell_runs_and_reports(tmp_path):
    spec = {
        "kind": "classifier",
        "base": dict(
            model="mlp",
            depth=1,
            hidden_size=8,
            train_batch_size=16,
            max_train_steps=3,
            log_every=1,
            num_threads=1,
            report_to="none",
        ),
        "grid": {
            "data": {"iris": {"dataset": "iris"}},
            "skip_connections": {"skip": True, "plain": False},
            "seed": [0],
        },
    }
    records = sweep.run_sweep(sweep.parse_spec(spec, "cls"), tmp_path / "out", log=lambda line: None)
    assert [r["status"] for r in records] == ["done", "done"]
    text = write_report(tmp_path / "out", tmp_path / "report").read_text()
    assert "## iris" in text and "| skip_connections=skip | 1 |" in text and "test accuracy" in text


def test_builtin_specs_are_valid():
    for path in sorted((REPO / "eval" / "sweeps").glob("*.yaml")):
        spec = sweep.load_spec(path)
        cells = sweep.expand_cells(spec, "runs/sweeps/x")
        assert cells, path


# --------------------------------------------------------------------------------------------------
# The report's output folder, reference and statistics on a sweep with several seeds
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_while_the_report_is_written_is_one_line_and_keeps_the_earlier_report(
    micro_sweep, tmp_path, monkeypatch, capsys
):
    """It was a traceback, and report.md was left half written (issue 28)."""
    import errno
    import pathlib

    from skipdiff.report.__main__ import cli

    out = tmp_path / "report"
    assert cli([str(micro_sweep), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def half_written_then_full(self, data, *args, **kwargs):  # a real full disk: part of the file, then ENOSPC
        with open(self, "w") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_written_then_full)
    assert cli([str(micro_sweep), "--out", str(out)]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: could not write '{out}': no space left on the device"), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file, nothing half written


@pytest.mark.slow
def test_report_never_overwrites_committed_results_by_default(micro_sweep, tmp_path, monkeypatch, capsys):
    shutil.copytree(micro_sweep, tmp_path / "runs" / "sweeps" / "micro")
    committed = tmp_path / "eval" / "results" / "micro"  # as in a checkout: a committed report of this sweep
    committed.mkdir(parents=True)
    files = {"report.md": b"committed\n", "summary.json": b"{}\n", "loss_digits_8px.png": b"committed png"}
    for name, data in files.items():
        (committed / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    report.main(["runs/sweeps/micro"])
    assert {name: (committed / name).read_bytes() for name in files} == files  # untouched, no PNG deleted
    assert "wrote runs/sweeps/micro/report/report.md" in capsys.readouterr().out
    assert (tmp_path / "runs" / "sweeps" / "micro" / "report" / "loss_digits_8px.png").is_file()
    report.main(["runs/sweeps/micro", "--out", "eval/results/micro"])  # asked for: replaced
    assert (committed / "report.md").read_text().startswith("# Sweep `micro`")
    assert (committed / "loss_digits_8px.png").read_bytes() != files["loss_digits_8px.png"]


@pytest.mark.slow
def test_report_reference_is_checked_before_anything_is_written(micro_sweep, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"--reference 'skips=half' is no configuration of table 'digits, 8px'; "
        r"choices: \['skips=full', ",
    ):
        report.main([str(micro_sweep), "--out", str(tmp_path / "out"), "--reference", "skips=half"])
    assert not (tmp_path / "out").exists()
    text = report.main([str(micro_sweep), "--out", str(tmp_path / "out"), "--reference", "skips=none"]).read_text()
    assert "### denoising MSE against skips=none (lower is better)" in text and "| **skips=none** |" in text


def add_seeds(sweep: Path, fids: dict[str, dict[int, float]], floors: dict[int, float], kids: dict) -> None:
    """Cells ``skips-<c>__seed-<s>`` for every configuration and seed of ``fids``, copied from seed 0, with
    an eval.json FID block (per sampling seed: the given floors) and no inference variants."""
    names = []
    for configuration, by_seed in fids.items():
        source = sweep / f"skips-{configuration}__seed-0"
        for seed, fid in by_seed.items():
            name = f"skips-{configuration}__seed-{seed}"
            if seed:
                shutil.copytree(source, sweep / name)
            cell = json.loads((sweep / name / "cell.json").read_text())
            cell["axes"][1]["label"], cell["options"]["seed"], cell["variants"] = str(seed), seed, {}
            (sweep / name / "cell.json").write_text(json.dumps(cell))
            eval_path = sweep / name / "eval" / "eval.json"
            evaluation = json.loads(eval_path.read_text())
            kid = kids[configuration][seed]
            evaluation["fid"] = {
                "per_seed": [{"seed": s, "fid": fid, "floor_fid": f} for s, f in floors.items()],
                "summary": {
                    "fid": {"mean": fid},
                    "floor_fid": {"mean": sum(floors.values()) / 2},
                    "kid_mean": {"mean": kid},
                    "kid_std": {"mean": kid / 10},
                },
            }
            eval_path.write_text(json.dumps(evaluation))
            names.append(name)
    meta = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**meta, "cells": names}))


@pytest.mark.slow
def test_report_pairs_seeds_shows_floors_per_sampling_seed_and_kid(micro_sweep, tmp_path):
    from scipy.stats import t, ttest_rel

    copy = tmp_path / "sweep"
    shutil.copytree(micro_sweep, copy)
    fids = {"full": {0: 6.9, 1: 6.4, 2: 6.6}, "none": {0: 7.9, 1: 7.1, 2: 7.5}}  # seed 0 worst in both
    kids = {"full": {0: 0.011, 1: 0.009, 2: 0.010}, "none": {0: 0.02, 1: 0.03, 2: 0.025}}
    add_seeds(copy, fids, {0: 0.40, 1: 0.43}, kids)
    out = tmp_path / "report"
    text = write_report(copy, out).read_text()
    summary = json.loads((out / "summary.json").read_text())["datasets"]["digits, 8px"]
    p = ttest_rel(list(fids["none"].values()), list(fids["full"].values())).pvalue
    row = next(r for r in summary["ranking"]["rows"] if r["configuration"] == "skips=none")
    assert row["test"] == "paired" and row["p"] == pytest.approx(p, rel=1e-9) and row["p_holm"] == row["p"]
    assert row["delta"] == pytest.approx((1.0 + 0.7 + 0.9) / 3)  # the mean paired difference
    ranking_line = next(line for line in text.splitlines() if line.startswith("| 2 | skips=none |"))
    assert f"| paired (3 seeds) | {p:.2g} | {p:.2g} | worse |" in ranking_line
    # The floor varies with the sampling seed: shown per seed and as mean ± std, not as one constant.
    assert "FID floor by sampling seed: seed 0: 0.4, seed 1: 0.43 (mean 0.415 ± 0.021 over 2 seed(s))." in text
    assert summary["fid_floor"]["by_sampling_seed"] == pytest.approx({"0": 0.4, "1": 0.43})
    header = next(line for line in text.splitlines() if line.startswith("| configuration |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    full = next(line for line in text.splitlines() if line.startswith("| skips=full | 3 |"))
    values = dict(zip(columns, [c.strip() for c in full.strip("|").split("|")], strict=True))
    assert values["FID floor"] == "0.415 ± 0.021"
    half = t.ppf(0.975, 2) * 0.001 / 3**0.5  # KID: mean 0.010, sd 0.001 over three training seeds
    assert values["KID ↓"] == f"0.01 [{0.010 - half:.2g}, {0.010 + half:.2g}]"
    assert "Smallest detectable difference in FID" in text and "by the paired test on 3 seeds (df 2)" in text


# --------------------------------------------------------------------------------------------------
# Kinds, launching, resuming classifiers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProbeOptions:
    """Options of a kind without training (like inference-only cells over a pretrained pipeline)."""

    output_dir: str = option("out", "the cell's folder")
    value: int = option(0, "what the cell evaluates")
    seed: int = option(0, "seed")


class ProbeKind(sweep.CellKind):
    name = "probe"
    evaluated: list = []

    def options_class(self):
        return ProbeOptions

    def evaluate(self, spec, folder, log):
        options = json.loads((folder / "cell.json").read_text())["options"]
        (folder / "result.json").write_text(json.dumps({"twice": 2 * options["value"]}))
        self.evaluated.append(folder.name)


def test_a_new_kind_of_cell_needs_no_change_to_the_loop(tmp_path, monkeypatch):
    from skipdiff.sweep import kinds

    probe = ProbeKind()
    monkeypatch.setitem(kinds.KINDS, "probe", probe)
    counter = Counter(monkeypatch)
    spec = sweep.parse_spec({"kind": "probe", "grid": {"value": [1, 2], "seed": [0]}}, "probe")
    assert not probe.trains
    records = sweep.run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert [r["status"] for r in records] == ["done", "done"] and counter.calls == []  # nothing trained
    assert probe.evaluated == ["value-1__seed-0", "value-2__seed-0"]
    assert json.loads((tmp_path / "out" / "value-2__seed-0" / "result.json").read_text()) == {"twice": 4}
    sweep.run_sweep(spec, tmp_path / "out", log=lambda line: None)  # done cells are skipped
    assert probe.evaluated == ["value-1__seed-0", "value-2__seed-0"]
    with pytest.raises(ValueError, match="already registered"):
        kinds.register_kind(ProbeKind())
    with pytest.raises(
        ValueError, match=r"kind must be one of \('diffusion', 'classifier', 'inference', 'probe'\), got 'nope'"
    ):
        sweep.parse_spec({"kind": "nope", "grid": {"seed": [0]}}, "x")
    with pytest.raises(ValueError, match="takes no eval"):
        sweep.parse_spec({"kind": "probe", "grid": {"seed": [0]}, "eval": {"fid": True}}, "x")


def test_accelerate_launch_starts_training_by_module_name():
    cell = sweep.expand_cells(sweep.parse_spec(MICRO, "micro"), "out")[0]
    command = sweep.accelerate_command(sweep.get_kind("diffusion"), cell.options, ("--num_processes", "2"))
    launcher_end = command.index("accelerate.commands.launch")
    assert command[launcher_end + 1 : launcher_end + 5] == ["--num_processes", "2", "-m", "skipdiff.cli.train_unet"]
    assert "--max_train_steps=4" in command and "--output_dir=out/skips-full__seed-0" in command
    assert not [part for part in command if part.endswith(".py") or "train_scripts" in part]
    with pytest.raises(ValueError, match="need --launcher accelerate"):
        sweep.Launcher("inprocess", ("--num_processes", "2"))


CLASSIFIER = {
    "kind": "classifier",
    "base": dict(
        model="mlp",
        depth=1,
        hidden_size=8,
        train_batch_size=16,
        max_train_steps=4,
        log_every=1,
        num_threads=1,
        report_to="none",
        checkpointing_steps=2,
    ),
    "grid": {"data": {"iris": {"dataset": "iris"}}, "seed": [0]},
}


@pytest.mark.extended
@pytest.mark.slow
def test_accelerate_launcher_trains_outside_the_source_tree(tmp_path, monkeypatch):
    """A real `accelerate launch -m skipdiff.cli.train_classifier` from a folder that is no checkout (~1 min)."""
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    records = sweep.run_sweep(
        sweep.parse_spec(CLASSIFIER, "cls"),
        "out",
        launcher="accelerate",
        accelerate_args=[
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        log=lambda line: None,
    )
    assert records[0]["status"] == "done" and records[0]["train_metrics"]["steps"] == 4


def test_interrupted_classifier_cell_resumes_without_duplicate_records(tmp_path, monkeypatch):
    spec = sweep.parse_spec(CLASSIFIER, "cls")
    sweep.run_sweep(spec, tmp_path / "out", log=lambda line: None)
    cell = tmp_path / "out" / "data-iris__seed-0"
    steps = [r["step"] for r in read_stats(cell / "stats.jsonl") if "train" in r]
    assert steps == [1, 2, 3, 4]
    (cell / "cell.json").unlink()  # as if killed after the checkpoint at step 2
    shutil.rmtree(cell / "checkpoint-4")
    counter = Counter(monkeypatch)
    sweep.run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert counter.calls == [("data-iris__seed-0", "latest")]
    assert [r["step"] for r in read_stats(cell / "stats.jsonl") if "train" in r] == [1, 2, 3, 4]


def test_ctrl_c_in_a_cell_stops_the_sweep_instead_of_moving_on(tmp_path, monkeypatch):
    from skipdiff.sweep import kinds
    from skipdiff.training.startup import TrainingInterrupted

    class Interrupted(ProbeKind):
        name, cli_module = "interrupted", "skipdiff.cli.none"

        def train(self, options):
            raise TrainingInterrupted("interrupted after step 3; checkpoint checkpoint-2")

    monkeypatch.setitem(kinds.KINDS, "interrupted", Interrupted())
    spec = sweep.parse_spec({"kind": "interrupted", "grid": {"value": [1, 2]}}, "stop")
    with pytest.raises(TrainingInterrupted):
        sweep.run_sweep(spec, tmp_path / "out", log=lambda line: None)
    assert json.loads((tmp_path / "out" / "value-1" / "cell.json").read_text())["status"] == "running"
    assert not (tmp_path / "out" / "value-2").exists()  # the next cell never started
