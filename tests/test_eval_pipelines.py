"""``python -m skipdiff.eval`` end to end on tiny diffusers pipelines built from random weights (DDPM, LDM,
Stable Diffusion, SDXL): the importance matrix, sample grids, FID, CLIP score, determinism, and the
pipeline left bit for bit as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.tiny_pipelines import (
    captioned_images,
    clip_model,
    ddpm_pipeline,
    ldm_pipeline,
    sd_pipeline,
    sdxl_pipeline,
)
from PIL import Image

from skipdiff.eval import EvalOptions, evaluate_target, load_target
from skipdiff.eval.__main__ import cli, main

BUILDERS = {"ddpm": ddpm_pipeline, "ldm": ldm_pipeline, "sd": sd_pipeline}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from skipdiff.classifiers import SkipResNetConfig, SkipResNetForImageClassification

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    extractor = SkipResNetForImageClassification(
        SkipResNetConfig(num_labels=3, num_channels=3, widths=[4, 8], depth=1, hidden_size=8)
    )
    extractor.save_pretrained(root / "extractor")
    (root / "prompts.txt").write_text("a red square\n\na blue circle\ngreen stripes\n")
    return {
        "images": captioned_images(root / "images"),
        "extractor": root / "extractor",
        "clip": clip_model(root / "clip"),
        "prompts": root / "prompts.txt",
    }


def numbers(result: dict) -> dict:
    """What must not change from one run to the next: everything but timings and the output folder."""
    return {k: v for k, v in result.items() if k not in ("timings", "settings")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddpm", "ldm", "sd"])
def test_eval_cli_end_to_end_on_a_tiny_pipeline(kind, assets, tmp_path):
    folder = BUILDERS[kind](tmp_path / kind)
    base = [
        "--checkpoint",
        str(folder),
        "--train_data_dir",
        str(assets["images"]),
        "--buckets",
        "3",
        "--num_threads",
        "1",
        "--steps",
        "2",
    ]
    per_kind = {
        "ddpm": [
            "--resolution",
            "8",
            "--fid",
            "--feature_extractor",
            str(assets["extractor"]),
            "--num_samples",
            "4",
            "--seeds",
            "0",
            "1",
        ],
        "ldm": ["--grid", "--grid_size", "2", "--grid_variants", "none"],
        "sd": [
            "--caption_column",
            "text",
            "--clip_score",
            "--clip_model",
            str(assets["clip"]),
            "--num_samples",
            "3",
            "--seeds",
            "0",
            "1",
            "--grid_size",
            "2",
            "--grid_variants",
            "none",
            "scale:0.5",
        ],
    }
    main(
        [
            *base,
            *per_kind[kind],
            "--denoise_loss",
            "--skip_importance",
            "--importance_factors",
            "0",
            "0.5",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    skips = len(result["skips"])
    assert skips == 4  # 2 blocks x (1 + 1) long skips
    delta = np.array(result["skip_importance"]["factors"]["0.0"]["delta"])
    assert delta.shape == (skips, 3)
    assert (np.abs(delta).sum(axis=1) > 0).all()  # zeroing any one skip changes the loss
    half = np.array(result["skip_importance"]["factors"]["0.5"]["delta"])
    assert not np.array_equal(half, delta)
    assert result["skip_importance"]["baseline"] == [b["loss"] for b in result["denoise"]["buckets"]]
    assert result["skip_importance"]["replay"] and result["skip_importance"]["flops"]["naive_over_replay"] > 1
    assert result["weights"]["components"]["unet"]["folder"] == "unet" and len(result["weights"]["digest"]) == 16
    assert (tmp_path / "eval" / "skip_importance_0.0.png").stat().st_size > 1000
    if kind == "ddpm":
        summary = result["fid"]["summary"]
        assert summary["fid"]["mean"] > 0 and "floor_fid" in summary and "grid" in result
    if kind == "sd":
        clip = result["clip_score"]
        assert [row["num_images"] for row in clip["per_seed"]] == [3, 3]
        assert 0 <= clip["summary"]["clip_score"]["mean"] <= 100
    if kind in ("ldm", "sd"):  # a prompt (or seed) per row, a variant per column, scaled up to 64 px a cell
        columns = 3 if kind == "sd" else 2
        grid = Image.open(tmp_path / "eval" / "samples.png")
        layout = result["grid"]["layout"]
        assert (layout["rows"], layout["columns"], layout["cell"]) == (2, columns, [64, 64])
        assert grid.size == tuple(layout["size"]) and layout["gap"] > 0  # spaced cells
        assert layout["top"] > 0 and layout["left"] > 0 and layout["bottom"] > 0  # variant, row labels, legend
        assert result["grid"]["variants"][0] is None and len(result["grid"]["variants"]) == columns
    # A second run gives the same numbers, bit for bit.
    main(
        [
            *base,
            *(["--resolution", "8"] if kind == "ddpm" else []),
            *(["--caption_column", "text"] if kind == "sd" else []),
            "--denoise_loss",
            "--skip_importance",
            "--importance_factors",
            "0",
            "0.5",
            "--out",
            str(tmp_path / "again"),
        ]
    )
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["skip_importance"] == result["skip_importance"] and again["denoise"] == result["denoise"]


def test_evaluating_a_skip_variant_leaves_the_pipeline_bit_identical(assets, tmp_path):
    target = load_target(str(sd_pipeline(tmp_path / "sd")))
    unet = target.unet
    sample, timesteps, kwargs = (
        torch.randn(2, 4, 8, 8),
        torch.tensor([50, 600]),
        {"encoder_hidden_states": torch.randn(2, 77, 32)},
    )
    state = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    before = unet(sample, timesteps, **kwargs).sample
    options = dict(
        checkpoint=str(tmp_path / "sd"),
        train_data_dir=str(assets["images"]),
        caption_column="text",
        denoise_loss=True,
        skip_importance=True,
        buckets=2,
        grid=True,
        grid_size=2,
        steps=2,
    )
    plain = evaluate_target(target, EvalOptions(**options), out=tmp_path / "plain")
    variant = evaluate_target(target, EvalOptions(**options, skips="scale:0.5"), out=tmp_path / "variant")
    assert variant["denoise"]["mean"] != plain["denoise"]["mean"]
    assert variant["skip_spec"] == "scale:0.5" and {row["gate"] for row in variant["skips"]} == {"scale:factor=0.5"}
    assert torch.equal(unet(sample, timesteps, **kwargs).sample, before)
    assert all(torch.equal(state[name], tensor) for name, tensor in unet.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())
    assert not any("forward" in vars(m) for m in unet.modules())  # no replayed forward left behind


def test_sdxl_is_evaluated_with_its_two_text_encoders(assets, tmp_path):
    folder = sdxl_pipeline(tmp_path / "xl")
    main(
        [
            "--checkpoint",
            str(folder),
            "--train_data_dir",
            str(assets["images"]),
            "--caption_column",
            "text",
            "--prompts",
            str(assets["prompts"]),
            "--denoise_loss",
            "--grid",
            "--grid_size",
            "2",
            "--steps",
            "2",
            "--buckets",
            "2",
            "--guidance_scale",
            "3",
            "--negative_prompt",
            "blurry",
            "--num_threads",
            "1",
        ]
    )
    result = json.loads((folder / "eval" / "eval.json").read_text())
    assert result["target"]["pipeline_class"] == "StableDiffusionXLPipeline"
    assert set(result["target"]["conditioning"]["text_encoders"]) == {"text_encoder", "text_encoder_2"}
    assert result["grid"]["rows"] == ["a red square", "a blue circle"]  # blank lines of the prompt file skipped
    assert np.isfinite(result["denoise"]["mean"])


def test_text_pipelines_without_prompts_and_bad_combinations_are_clear_errors(assets, tmp_path, capsys):
    folder = sd_pipeline(tmp_path / "sd")
    with pytest.raises(ValueError, match="text-conditioned: give --prompts FILE"):
        main(["--checkpoint", str(folder), "--grid"])
    with pytest.raises(ValueError, match="name the reference images"):
        main(["--checkpoint", str(folder), "--denoise_loss"])
    with pytest.raises(ValueError, match=r"needs captions \(--caption_column\)"):
        main(["--checkpoint", str(folder), "--denoise_loss", "--train_data_dir", str(assets["images"])])
    ddpm = ddpm_pipeline(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="--clip_score needs a text-conditioned pipeline"):
        main(["--checkpoint", str(ddpm), "--clip_score"])
    with pytest.raises(ValueError, match="not text-conditioned"):
        main(["--checkpoint", str(ddpm), "--grid", "--prompts", str(assets["prompts"])])
    with pytest.raises(ValueError, match="--no_ema applies to skipdiff runs"):
        main(["--checkpoint", str(ddpm), "--grid", "--no_ema"])
    capsys.readouterr()
    assert cli(["--checkpoint", str(ddpm), "--grid", "--skips", "zero:typo"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.strip().splitlines()[-1]]
    assert err.strip().splitlines()[-1].startswith("error: ") and "zero:typo" in err and "Traceback" not in err


def test_a_missing_feature_extractor_fails_before_any_sampling(assets, tmp_path, monkeypatch, capsys):
    from skipdiff.eval import InceptionUnavailableError, evaluation, extractor_choice

    def offline(*args, **kwargs):
        raise InceptionUnavailableError("Inception-v3 weights are not cached (offline)")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the feature extractor was checked")

    monkeypatch.setattr(extractor_choice, "inception_kwargs", offline)
    monkeypatch.setattr(evaluation, "sample_images", no_sampling)
    folder = ddpm_pipeline(tmp_path / "ddpm")
    argv = [
        "--checkpoint",
        str(folder),
        "--train_data_dir",
        str(assets["images"]),
        "--resolution",
        "8",
        "--fid",
        "--grid",
        "--num_samples",
        "4",
    ]
    capsys.readouterr()
    assert cli(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: Inception-v3 weights are not cached (offline)"


def test_eval_md_and_compare_state_what_was_computed_with_the_cache_and_its_bound(assets, tmp_path):
    """Issue 31: eval.md listed FID settings of a grid-only evaluation, the requested --denoise_images instead of
    the images used, and no cache (cached and uncached rows looked alike); a text pipeline's eval.json cache held
    only the options, not the FLOP bound."""
    folder = sd_pipeline(tmp_path / "sd")
    base = [
        "--checkpoint",
        str(folder),
        "--train_data_dir",
        str(assets["images"]),
        "--caption_column",
        "text",
        "--prompts",
        str(assets["prompts"]),
        "--grid",
        "--grid_size",
        "2",
        "--steps",
        "3",
        "--denoise_loss",
        "--buckets",
        "2",
        "--denoise_images",
        "1000",
        "--num_threads",
        "1",
    ]
    main([*base, "--out", str(tmp_path / "plain")])
    main([*base, "--cache", "skip_branch", "--cache_interval", "3", "--out", str(tmp_path / "cached")])
    cached = json.loads((tmp_path / "cached" / "eval.json").read_text())
    compute = cached["cache"]["compute"]  # the FLOP bound, for a text-conditioned UNet too
    assert compute["probe"]["conditioning"] == "text" and compute["branch"] == 3
    assert 0 < compute["cached_fraction"] < 1 and 1 < compute["bound_run"] <= 3
    used = cached["denoise"]["settings"]["num_images"]
    assert used < 1000
    summary = (tmp_path / "cached" / "eval.md").read_text()
    footer = summary.split("\n\n", 1)[1]
    assert (
        f"skip cache skip_branch at branch 3, a refresh every 3 steps, FLOP bound {compute['bound_run']:.3g}x" in footer
    )
    assert f"{used} held-out (test split) images" in footer and "1000" not in footer
    assert "FID" not in footer and "samples per seed" not in footer and "CLIP" not in footer  # not computed
    assert "no skip cache" in (tmp_path / "plain" / "eval.md").read_text()
    main(["--compare", str(tmp_path / "plain"), str(tmp_path / "cached"), "--out", str(tmp_path / "cmp")])
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in (tmp_path / "cmp" / "compare.md").read_text().splitlines()
        if line.startswith("| plain") or line.startswith("| cached")
    }
    assert rows["plain"].endswith("| none |") and f"skip_branch b3 N3 (≤ {compute['bound_run']:.3g}x)" in rows["cached"]
