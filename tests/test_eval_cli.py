"""Denoising loss, gradient stability, skip importance and the ``python -m skipdiff.eval`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.unet_runs import run_train_unet, tiny_args

from skipdiff.config import from_dict
from skipdiff.eval import EvalOptions, evaluate
from skipdiff.eval.__main__ import main
from skipdiff.eval.denoise import denoising_loss_by_bucket
from skipdiff.eval.importance import gate_override, skip_importance
from skipdiff.eval.run import held_out_batches, load_run
from skipdiff.eval.stability import count_spikes, ordered_blocks, shattering_probe, stability_from_stats
from skipdiff.runfolder import read_stats


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    run_train_unet(tiny_args(out, "--max_train_steps", "6", "--skips", "scale:0.5"))
    return out


@pytest.fixture(scope="module")
def loaded(tiny_run):
    pipeline, options, used_ema = load_run(str(tiny_run))
    batches, _ = held_out_batches(options, batch_size=64)
    return pipeline, options, used_ema, batches[:2]


def test_load_run_uses_the_ema_weights(tiny_run, loaded):
    pipeline, _, used_ema, _ = loaded
    assert used_ema
    raw, _, raw_used_ema = load_run(str(tiny_run), use_ema=False)
    assert not raw_used_ema
    differs = any(not torch.equal(a, b) for a, b in zip(pipeline.unet.parameters(), raw.unet.parameters(), strict=True))
    assert differs  # EMA and raw weights are different models after 6 steps


def test_denoising_loss_is_deterministic_and_bucketed(loaded):
    pipeline, _, _, batches = loaded
    first = denoising_loss_by_bucket(pipeline.unet, pipeline.scheduler, pipeline.encoder(), batches, buckets=10)
    torch.manual_seed(123)  # the global RNG must not matter
    second = denoising_loss_by_bucket(pipeline.unet, pipeline.scheduler, pipeline.encoder(), batches, buckets=10)
    assert torch.equal(first["per_example"], second["per_example"])
    assert len(first["buckets"]) == 10
    assert [b["t_min"] for b in first["buckets"]] == list(range(0, 1000, 100))
    assert first["mean"] == pytest.approx(np.mean([b["loss"] for b in first["buckets"]]))
    other_seed = denoising_loss_by_bucket(pipeline.unet, pipeline.scheduler, pipeline.encoder(), batches, seed=1)
    assert not torch.equal(first["per_example"], other_seed["per_example"])


def test_zeroing_a_skip_through_importance_matches_a_zero_gate(loaded):
    pipeline, _, _, batches = loaded
    unet, scheduler, encoder = pipeline.unet, pipeline.scheduler, pipeline.encoder()
    result = skip_importance(unet, scheduler, encoder, batches, factors=(0.0, 0.5), buckets=4)
    delta = np.array(result["factors"]["0.0"]["delta"])
    assert delta.shape == (unet.num_skips, 4)
    # The trained gate is scale:0.5, so "scale by 0.5" is the unablated model: zero change.
    assert np.abs(np.array(result["factors"]["0.5"]["delta"])).max() == 0.0
    # The matrix entry for skip 0 equals an independent evaluation with that skip zeroed.
    with gate_override(unet.skip_router, 0, {"mode": "zero"}):
        zeroed = denoising_loss_by_bucket(unet, scheduler, encoder, batches, buckets=4)
    expected = np.array([b["loss"] for b in zeroed["buckets"]]) - np.array(result["baseline"])
    np.testing.assert_allclose(delta[0], expected, rtol=1e-12, atol=1e-12)
    assert unet.skip_router.gates[0].mode == "scale"  # the override was undone


def test_spike_rule_counts_only_outliers():
    rng = np.random.default_rng(0)
    series = list(1.0 + 0.01 * rng.standard_normal(200))
    assert count_spikes(series, window=50, k=6.0) == 0
    series[120] = 5.0
    series[180] = 9.0
    assert count_spikes(series, window=50, k=6.0) == 2
    assert count_spikes([float("nan")] * 10 + series, window=50, k=6.0) == 2  # non-finite values are ignored


def test_stability_from_stats_orders_blocks_and_finds_vanishing_ratio():
    records = [
        {
            "step": s,
            "loss": 1.0 / s,
            "grad_norm": 1.0,
            "nonfinite_total": 1 if s > 5 else 0,
            "grad_norm_by_block": {
                "up_blocks.1": 2.0,
                "conv_out": 4.0,
                "down_blocks.0": 0.5,
                "conv_in": 0.4,
                "mid_block": 1.0,
                "up_blocks.0": 1.5,
                "gates": 9.0,
            },
        }
        for s in range(1, 11)
    ]
    figures = stability_from_stats(records, window=4)
    assert list(figures["blocks"]) == [
        "conv_in",
        "down_blocks.0",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "conv_out",
    ]
    assert figures["first_to_last_ratio_median"] == pytest.approx(0.1)
    assert figures["grad_norm_cv"] == 0.0 and figures["nonfinite_total"] == 1
    with pytest.raises(ValueError, match="no gradient records"):
        stability_from_stats([{"step": 1, "loss": 1.0}])
    assert ordered_blocks(["up_blocks.10", "up_blocks.2"]) == ["up_blocks.2", "up_blocks.10"]


def test_shattering_probe_separates_smooth_from_white_noise_gradients():
    class Smooth(torch.nn.Module):  # a linear map: the same gradient everywhere
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t, class_labels=None):
            return type("Out", (), {"sample": self.conv(x)})

    class Shattered(Smooth):  # a sine of tiny period: gradients change sign between probe points
        def forward(self, x, t, class_labels=None):
            return type("Out", (), {"sample": torch.sin(self.conv(x) * 1e4)})

    smooth = shattering_probe(Smooth(), (1, 4, 4), points=32)["lag1_autocorrelation"]
    shattered = shattering_probe(Shattered(), (1, 4, 4), points=32)["lag1_autocorrelation"]
    assert smooth == pytest.approx(1.0, abs=1e-9)
    assert shattered < 0.5


@pytest.mark.slow
def test_cli_writes_json_markdown_and_plots(tiny_run, tmp_path):
    out = tmp_path / "eval"
    main(
        [
            "--checkpoint",
            str(tiny_run),
            "--denoise_loss",
            "--grad_stability",
            "--skip_importance",
            "--buckets",
            "4",
            "--out",
            str(out),
            "--num_threads",
            "1",
        ]
    )
    result = json.loads((out / "eval.json").read_text())
    assert set(result) >= {"denoise", "grad_stability", "skip_importance", "settings", "skips", "parameters"}
    assert result["settings"]["buckets"] == 4 and len(result["denoise"]["buckets"]) == 4
    assert result["grad_stability"]["num_records"] == len(
        [r for r in read_stats(tiny_run / "stats.jsonl") if r.get("grad_norm_by_block")]
    )
    for name in ("loss_by_timestep.png", "grad_norms.png", "grad_norm_heatmap.png", "skip_importance_0.0.png"):
        assert (out / name).stat().st_size > 1000
    assert "| run |" in (out / "eval.md").read_text()


def test_compare_reads_evaluated_runs(tiny_run, tmp_path):
    main(["--checkpoint", str(tiny_run), "--denoise_loss", "--buckets", "2", "--num_threads", "1"])
    main(["--compare", str(tiny_run), str(tiny_run), "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count(f"| {tiny_run.name} |") == 2
    with pytest.raises(ValueError, match="evaluate"):
        main(["--compare", str(tmp_path / "never-evaluated")])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"checkpoint": "x", "num_samples": 0, "fid": True}, "num_samples"),
        ({"checkpoint": "x", "fid": True, "num_samples": 1}, "num_samples"),
        ({"checkpoint": "x"}, "nothing to do"),
        ({"checkpoint": "x", "kid": True, "denoise_loss": True}, "need --fid"),
        ({"checkpoint": "x", "denoise_loss": True, "reference": "val"}, "reference"),
        ({"checkpoint": "x", "skip_importance": True, "importance_factors": [-1.0]}, "importance_factors"),
        ({}, "--checkpoint"),
    ],
)
def test_bad_option_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        from_dict(EvalOptions, values)


def test_a_local_looking_checkpoint_that_does_not_exist_is_refused_at_once(tmp_path, monkeypatch):
    """Issue 31: a misspelt run folder became a 20 s Hub lookup before the error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "digits-latent").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'runs/digits-latnet' does not exist.*did you mean 'digits-latent'"):
        evaluate(from_dict(EvalOptions, {"checkpoint": "runs/digits-latnet", "denoise_loss": True}))
    with pytest.raises(ValueError, match="--compare './nope' does not exist"):
        from_dict(EvalOptions, {"compare": ["runs/digits-latent", "./nope"], "denoise_loss": True}).check_sources()
    from_dict(EvalOptions, {"checkpoint": "google/ddpm-cifar10-32", "denoise_loss": True}).check_sources()  # a Hub id


def test_missing_or_mismatched_checkpoints_fail_clearly(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(from_dict(EvalOptions, {"checkpoint": str(tmp_path / "nope"), "denoise_loss": True}))
    with pytest.raises(ValueError, match="not a skipdiff run folder"):
        evaluate(from_dict(EvalOptions, {"checkpoint": str(tmp_path), "denoise_loss": True}))
    # The same run evaluated at another resolution than it was trained for.
    mismatched = tmp_path / "mismatched"
    import shutil

    shutil.copytree(tiny_run, mismatched, ignore=shutil.ignore_patterns("checkpoint-*", "eval"))
    options = json.loads((mismatched / "training_options.json").read_text())
    (mismatched / "training_options.json").write_text(json.dumps({**options, "resolution": 16}))
    with pytest.raises(ValueError, match="8px images but the dataset is evaluated at 16px"):
        evaluate(from_dict(EvalOptions, {"checkpoint": str(mismatched), "denoise_loss": True}))


@pytest.mark.slow
def test_stochastic_skips_are_also_scored_under_their_map_path(tiny_run, tmp_path):
    run = tmp_path / "markov"
    run_train_unet(
        tiny_args(run, "--max_train_steps", "4", "--skips", "markov", "--markov", "warmup_steps=0,min_count=1")
    )
    main(["--checkpoint", str(run), "--denoise_loss", "--buckets", "2", "--num_threads", "1"])
    result = json.loads((run / "eval" / "eval.json").read_text())
    score = result["map"]
    assert len(score["recommended"]) == 4 and set(score["recommended"]) <= {"keep", "zero"}
    assert score["fraction_closed"] == score["recommended"].count("zero") / 4
    assert score["flops_map"] <= score["flops_trained"]
    assert len(score["denoise"]["buckets"]) == 2
    # Under map every gate is 0 or 1 / P(open): the loss differs from the expected-value forward's.
    assert score["denoise"]["mean"] != result["denoise"]["mean"]
    main(["--checkpoint", str(run), "--denoise_loss", "--buckets", "2", "--no-map", "--out", str(tmp_path / "e")])
    assert "map" not in json.loads((tmp_path / "e" / "eval.json").read_text())
    main(["--checkpoint", str(tiny_run), "--denoise_loss", "--buckets", "2", "--out", str(tmp_path / "d")])
    assert "map" not in json.loads((tmp_path / "d" / "eval.json").read_text())  # deterministic skips only


@pytest.mark.slow
def test_evaluation_samples_with_a_skip_cache_and_records_its_bound(tiny_run, tmp_path):
    """--cache: FID of cached sampling next to the FLOP bound; interval 1 scores exactly as no cache."""
    common = [
        "--checkpoint",
        str(tiny_run),
        "--fid",
        "--num_samples",
        "20",
        "--seeds",
        "0",
        "--steps",
        "6",
        "--feature_extractor",
        "digits",
        "--num_threads",
        "1",
    ]
    results = {}
    for name, extra in {
        "plain": [],
        "interval1": ["--cache", "skip_branch", "--cache_interval", "1"],
        "interval3": ["--cache", "skip_branch", "--cache_interval", "3"],
    }.items():
        main([*common, *extra, "--out", str(tmp_path / name)])
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    fid = {name: r["fid"]["summary"]["fid"]["mean"] for name, r in results.items()}
    assert fid["interval1"] == fid["plain"] and fid["interval3"] != fid["plain"]
    assert "cache" not in results["plain"]
    compute = results["interval3"]["cache"]["compute"]
    assert 0 < compute["cached_fraction"] < 1 and 1 < compute["bound_interval"] < 3


def test_loss_spikes_are_counted_on_per_step_losses():
    """A one-step spike that a 10-step window mean dilutes below the rule's threshold is still counted."""
    generator = torch.Generator().manual_seed(0)
    records = []
    for window in range(12):
        steps = (1.0 + 0.2 * torch.randn(10, generator=generator)).tolist()
        if window == 10:
            steps[4] = 3.5  # one step ~12 per-step MADs above the median
        records.append(
            {
                "step": 10 * (window + 1),
                "loss": sum(steps) / 10,
                "step_losses": steps,
                "grad_norm": 1.0,
                "grad_norm_by_block": {"conv_in": 1.0, "conv_out": 1.0},
            }
        )
    result = stability_from_stats(records, window=20, k=6.0)
    assert result["loss_spikes"] == 1 and result["loss_spikes_counted_on"] == "per-step losses"
    assert result["loss_spikes_window_means"] == 0
