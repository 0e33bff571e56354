"""Inference sweeps: a grid of skip specifications on one pretrained pipeline, nothing trained, resumable, and
rendered by the report against the unmodified pipeline, rows paired by sampling seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_pipelines import captioned_images, ddpm_pipeline

from skipdiff.report import write_report
from skipdiff.sweep import load_spec, run_sweep
from skipdiff.targets import load_target


def write_spec(path, pipeline, images, extractor_dir):
    spec = {
        "kind": "inference",
        "description": "tiny DDPM: full, zero the innermost skip, FreeU",
        "base": {
            "checkpoint": str(pipeline),
            "train_data_dir": str(images),
            "resolution": 8,
            "fid": True,
            "num_samples": 6,
            "seeds": [0, 1, 2],
            "steps": 2,
            "denoise_loss": True,
            "buckets": 2,
            "feature_extractor": str(extractor_dir),
            "num_threads": 1,
        },
        "grid": {"skips": {"full": "full", "zero0": "zero,keep,keep,keep", "freeu": "freeu:b1=1.2:b2=1.1"}},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_an_inference_sweep_evaluates_every_spec_once_and_the_report_pairs_them(tmp_path):
    from skipdiff.classifiers import SkipResNetConfig, SkipResNetForImageClassification

    torch.manual_seed(0)
    SkipResNetForImageClassification(
        SkipResNetConfig(num_labels=3, num_channels=3, widths=[4, 8], depth=1, hidden_size=8)
    ).save_pretrained(tmp_path / "extractor")
    pipeline = ddpm_pipeline(tmp_path / "ddpm")
    images = captioned_images(tmp_path / "images")
    spec = load_spec(write_spec(tmp_path / "tiny.yaml", pipeline, images, tmp_path / "extractor"))
    before = {k: v.clone() for k, v in load_target(str(pipeline)).unet.state_dict().items()}
    out = tmp_path / "sweep"
    records = run_sweep(spec, out, log=lambda line: None)
    assert [r["status"] for r in records] == ["done"] * 3 and not any("train_metrics" in r for r in records)
    results = {r["name"]: json.loads((out / r["name"] / "eval" / "eval.json").read_text()) for r in records}
    fid = {name: [row["fid"] for row in r["fid"]["per_seed"]] for name, r in results.items()}
    assert fid["skips-zero0"] != fid["skips-full"] and fid["skips-freeu"] != fid["skips-full"]
    assert results["skips-zero0"]["skips"][0]["gate"] == "zero" and results["skips-full"]["skip_spec"] == "full"
    # The pipeline's weights are untouched by the sweep (specs are applied and detached).
    after = load_target(str(pipeline)).unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # Relaunching evaluates nothing again.
    stamps = {name: (out / name / "eval" / "eval.json").stat().st_mtime_ns for name in results}
    run_sweep(spec, out, log=lambda line: None)
    assert {name: (out / name / "eval" / "eval.json").stat().st_mtime_ns for name in results} == stamps

    report = write_report(out)
    text = report.read_text()
    assert "skips=full" in text and "paired" in text
    summary = json.loads((report.parent / "summary.json").read_text())
    (dataset,) = summary["datasets"]
    table = summary["datasets"][dataset]["configurations"]
    assert table["skips=zero0"]["seeds"] == [0, 1, 2]  # one row per sampling seed
    assert table["skips=zero0"]["values"]["fid"] == fid["skips-zero0"]
    ranking = summary["datasets"][dataset]["ranking"]
    assert ranking["reference"] == "skips=full"
    zero0 = next(r for r in ranking["rows"] if r["configuration"] == "skips=zero0")
    assert zero0["shared_seeds"] == 3 and zero0["test"].startswith("paired")


def test_inference_cells_must_share_their_sampling_seeds(tmp_path):
    import pytest

    spec = {
        "kind": "inference",
        "base": {"checkpoint": "x/y", "grid": True},
        "grid": {"skips": ["full", "none"], "seeds": [[0, 1], [0, 2]]},
    }
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="same sampling seeds"):
        run_sweep(load_spec(path), tmp_path / "out", dry_run=True, log=lambda line: None)


def test_a_skip_spec_typo_is_refused_before_any_cell_runs(tmp_path):
    """Issue 31: a typo in one cell's skips fails the whole sweep (and its --dry_run) up front, naming the cell."""
    import pytest

    pipeline = ddpm_pipeline(tmp_path / "ddpm")
    spec = {
        "kind": "inference",
        "base": {
            "checkpoint": str(pipeline),
            "denoise_loss": True,
            "buckets": 2,
            "train_data_dir": str(captioned_images(tmp_path / "images")),
            "resolution": 8,
        },
        "grid": {"skips": {"full": "full", "typo": "zeor,keep,keep,keep"}},
    }
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(spec))
    for dry_run in (True, False):
        with pytest.raises(ValueError, match="cell 'skips-typo'.*zeor"):
            run_sweep(load_spec(path), tmp_path / "sweep", dry_run=dry_run, log=lambda line: None)
    assert not (tmp_path / "sweep").exists()  # not even the first cell ran
    spec["base"]["checkpoint"] = "someone/a-hub-pipeline"  # not downloaded for the check: names only
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(
        ValueError, match="cell 'skips-typo': unknown skip mode or preset 'zeor' \\(did you mean 'zero'"
    ):
        run_sweep(load_spec(path), tmp_path / "sweep", dry_run=True, log=lambda line: None)


def test_a_cache_sweeps_report_speaks_of_sampling_seeds_names_its_folder_and_spec_and_shows_the_speedup(
    tmp_path, monkeypatch
):
    """Issue 31: the inference report spoke of training seeds, named runs/sweeps/<name> and eval/sweeps/<name>.yaml
    whatever the real folder and spec were, drew no figure and had no speed-up column for a cache sweep."""
    from skipdiff.classifiers import SkipResNetConfig, SkipResNetForImageClassification

    torch.manual_seed(0)
    SkipResNetForImageClassification(
        SkipResNetConfig(num_labels=3, num_channels=3, widths=[4, 8], depth=1, hidden_size=8)
    ).save_pretrained(tmp_path / "extractor")
    spec = {
        "kind": "inference",
        "base": {
            "checkpoint": str(ddpm_pipeline(tmp_path / "ddpm")),
            "resolution": 8,
            "fid": True,
            "train_data_dir": str(captioned_images(tmp_path / "images")),
            "num_samples": 6,
            "seeds": [0, 1],
            "steps": 4,
            "feature_extractor": str(tmp_path / "extractor"),
            "num_threads": 1,
        },
        "grid": {"cache": {"off": {"cache": None}, "N2": {"cache": "skip_branch", "cache_interval": 2}}},
    }
    monkeypatch.chdir(tmp_path)  # paths as a user gives them, relative to where they work
    path, out = Path("specs/tiny_cache.yaml"), Path("elsewhere")
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    run_sweep(load_spec(path), out, log=lambda line: None)
    report = write_report(out, reference="cache=off")
    text = report.read_text()
    assert "`python -m skipdiff.report elsewhere`" in text
    assert "relaunching `python -m skipdiff.sweep specs/tiny_cache.yaml --out elsewhere` finishes" in text
    assert "runs/sweeps" not in text and "eval/sweeps" not in text and str(tmp_path) not in text
    assert "training seed" not in text and "on the sampling seeds they share" in text
    summary = json.loads((report.parent / "summary.json").read_text())
    (entry,) = summary["datasets"].values()
    cached = entry["speed"]["rows"]["cache=N2"]
    assert entry["speed"]["reference"] == "cache=off" and len(cached["speedup_by_seed"]) == 2
    assert cached["speedup"] > 0 and 1 < cached["flop_bound"] <= 2  # interval 2: at most twice as fast
    assert entry["speed"]["rows"]["cache=off"]["flop_bound"] is None
    assert "| configuration | s/image | measured speed-up | FLOP bound |" in text
    assert "| cache=N2 | " in text and f"| {cached['flop_bound']:.3g} |" in text
    for figure in ("metric_", "speed_"):
        (png,) = report.parent.glob(f"{figure}*.png")
        assert png.stat().st_size > 1000 and f"({png.name})" in text


def test_a_sweep_built_in_code_records_the_command_that_relaunches_it(tmp_path, monkeypatch):
    """A search's confirmation sweep has no spec file: its report names the search command, not
    runs/sweeps/<name>-confirm."""
    from types import SimpleNamespace

    from skipdiff.search.confirm import search_command
    from skipdiff.sweep.spec import parse_spec

    monkeypatch.chdir(tmp_path)
    search = SimpleNamespace(name="s", source="eval/searches/s.yaml")
    assert search_command(search, Path("runs/searches/s")) == {
        "module": "skipdiff.search",
        "spec": "eval/searches/s.yaml",
        "out": None,
    }
    spec = {
        "kind": "inference",
        "base": {"checkpoint": str(ddpm_pipeline(tmp_path / "ddpm")), "grid": True, "grid_size": 1, "steps": 1},
        "grid": {"skips": ["full"]},
    }
    folder = Path("searched/confirm")
    run_sweep(
        parse_spec(spec, "s-confirm"), folder, log=lambda line: None, relaunch=search_command(search, Path("searched"))
    )
    text = write_report(folder).read_text()
    assert "relaunching `python -m skipdiff.search eval/searches/s.yaml --out searched` finishes missing cells" in text
    assert "`python -m skipdiff.report searched/confirm`" in text and "runs/sweeps" not in text
    # An absolute folder outside the working directory is not written into the report: a placeholder is.
    text = write_report(tmp_path / "searched" / "confirm", Path("again")).read_text()
    assert "`python -m skipdiff.report searched/confirm`" in text  # inside the working directory: relative
    monkeypatch.chdir(tmp_path / "ddpm")
    text = write_report(tmp_path / "searched" / "confirm", tmp_path / "third").read_text()
    assert str(tmp_path) not in text and "`python -m skipdiff.report <folder>`" in text and "fill in" in text
