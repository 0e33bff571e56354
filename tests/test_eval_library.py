"""skipdiff.eval as a library: the importance matrix's replay against full recomputation, batch-size
independence, CLIP score against torchmetrics' definition, options range-checked, results keyed by full path
and tied to the weights they scored, damaged EMA copies, and the boundary to the training code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEEP, TINY
from diffusers import DDPMScheduler, UNet2DConditionModel

from skipdiff import SkipUNet2DModel, apply_skip_spec
from skipdiff.config import from_dict
from skipdiff.encoders import PixelEncoder
from skipdiff.eval import EvalOptions, compare, denoising_loss_by_bucket, replay_flops, skip_importance
from skipdiff.eval.results import RESULTS_FILE, read_results, write_results

REPO = Path(__file__).resolve().parents[1]


def tiny_sd_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        attention_head_dim=2,
    ).eval()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["full", "freeu", "learned:init=0.5"])
def test_importance_replay_equals_full_recomputation_bit_for_bit(spec):
    unet = SkipUNet2DModel(**DEEP, skips=spec).eval()
    batches = [{"pixel_values": torch.randn(5, 1, 16, 16)}, {"pixel_values": torch.randn(3, 1, 16, 16)}]
    args = (unet, DDPMScheduler(), PixelEncoder(1), batches)
    replayed = skip_importance(*args, factors=(0.0, 0.5), buckets=3)
    full = skip_importance(*args, factors=(0.0, 0.5), buckets=3, replay=False)
    assert replayed["replay"] and not full["replay"]
    assert replayed["factors"] == full["factors"] and replayed["baseline"] == full["baseline"]
    assert np.array(replayed["factors"]["0.0"]["delta"]).shape == (9, 3)


def test_importance_on_a_text_unet_replays_and_reuses_the_embeddings():
    unet = tiny_sd_unet()
    router = apply_skip_spec(unet, "full")
    calls = []
    text = torch.randn(4, 7, 32)

    def conditioning(batch):
        calls.append(len(batch["pixel_values"]))
        return {"encoder_hidden_states": text[: len(batch["pixel_values"])]}

    batches = [{"pixel_values": torch.randn(4, 4, 8, 8)}, {"pixel_values": torch.randn(2, 4, 8, 8)}]
    args = (unet, DDPMScheduler(), PixelEncoder(4), batches)
    replayed = skip_importance(*args, buckets=2, unet_kwargs=conditioning, router=router)
    assert calls == [4, 2]  # one text encoding per batch, shared by 2 buckets x (1 + 6) forwards
    full = skip_importance(*args, buckets=2, unet_kwargs=conditioning, router=router, replay=False)
    assert replayed["factors"] == full["factors"]
    denoise = denoising_loss_by_bucket(
        unet, DDPMScheduler(), PixelEncoder(4), batches, buckets=2, unet_kwargs=conditioning
    )
    assert replayed["baseline"] == [b["loss"] for b in denoise["buckets"]]
    flops = replay_flops(unet, router, torch.randn(1, 4, 8, 8), torch.tensor([10]), {"encoder_hidden_states": text[:1]})
    assert all(
        later <= earlier < flops["full"] for earlier, later in zip(flops["partial"], flops["partial"][1:], strict=False)
    )
    assert flops["naive_over_replay"] > 1.5
    router.detach()


def test_denoising_loss_does_not_depend_on_the_batch_size():
    unet = SkipUNet2DModel(**TINY).eval()
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    split = [{"pixel_values": images[:4]}, {"pixel_values": images[4:]}]
    whole = [{"pixel_values": images}]
    a = denoising_loss_by_bucket(unet, DDPMScheduler(), PixelEncoder(3), split, buckets=4)
    b = denoising_loss_by_bucket(unet, DDPMScheduler(), PixelEncoder(3), whole, buckets=4)
    torch.testing.assert_close(a["per_example"], b["per_example"], rtol=1e-5, atol=1e-7)
    c = denoising_loss_by_bucket(unet, DDPMScheduler(), PixelEncoder(3), whole[:1], buckets=4, seed=1)
    assert not torch.allclose(c["per_example"], b["per_example"])


def test_clip_score_is_torchmetrics_definition_per_image(tmp_path):
    from helpers.tiny_pipelines import clip_model
    from transformers import CLIPModel

    from skipdiff.eval import images_to_clip_scores, load_clip

    functional = pytest.importorskip("torchmetrics.functional.multimodal")
    folder = clip_model(tmp_path / "clip")
    model, processor = load_clip(str(folder))
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    prompts = ["a cat", "red", "two dogs", "sky", "x"]
    ours = images_to_clip_scores(images, prompts, model, processor, batch_size=2)

    class TensorFeatures(torch.nn.Module):  # torchmetrics 1.9 reads get_*_features as tensors (transformers 4)
        def __init__(self, clip: CLIPModel):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, pixel_values):
            return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    wrapped = TensorFeatures(model)
    theirs = [
        float(functional.clip_score(image, prompt, model_name_or_path=lambda: (wrapped, processor)))
        for image, prompt in zip(images, prompts, strict=True)
    ]
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-4)
    assert (ours >= 0).all() and (ours == 0).any() == any(t == 0 for t in theirs)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"spike_k": -1.0, "grad_stability": True}, "spike_k"),
        ({"spike_k": float("nan"), "grad_stability": True}, "spike_k"),
        ({"guidance_scale": -1.0, "grid": True}, "guidance_scale"),
        ({"seeds": [0, 0], "grid": True}, "seeds"),
        ({"seeds": [-1], "grid": True}, "seeds"),
        ({"importance_factors": [float("inf")], "skip_importance": True}, "importance_factors"),
        ({"importance_factors": [0.0, 0.0], "skip_importance": True}, "importance_factors"),
        ({"denoise_images": 0, "denoise_loss": True}, "denoise_images"),
        ({"grid_size": 0, "grid": True}, "grid_size"),
        ({"denoise_batch_size": 0, "denoise_loss": True}, "denoise_batch_size"),
        ({"torch_dtype": "float8", "grid": True}, "torch_dtype"),
        ({"sampler": "euler", "grid": True}, "sampler"),
        ({"no_ema": True, "subfolder": "unet_raw", "grid": True}, "--subfolder or --no_ema"),
        ({"grid_variants": ["none"], "denoise_loss": True}, "grid_variants"),
        ({"test_fraction": 1.5, "denoise_loss": True}, "test_fraction"),
    ],
)
def test_numeric_and_combined_options_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        from_dict(EvalOptions, {"checkpoint": "x", **values})


def fake_result(num_samples: int, fid: float) -> dict:
    return {
        "settings": {"num_samples": num_samples, "seeds": [0], "sampler": "ddim", "steps": 50, "buckets": 10},
        "fid": {"summary": {"fid": {"mean": fid, "std": None}}},
        "parameters": 10,
    }


def test_compare_keys_results_by_full_path_and_shows_mixed_settings(tmp_path):
    for parent, samples, fid in (("a", 100, 1.0), ("b", 200, 2.0)):
        write_results(tmp_path / parent / "run" / "eval", fake_result(samples, fid), "run")
    table = compare(
        [str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), str(tmp_path / "a" / "run")], str(tmp_path / "cmp")
    )
    assert "| a/run | 1 |" in table and "| b/run | 2 |" in table and table.count("/run |") == 2
    assert "Settings differ" in table
    assert "- a/run: sampling (fid): ddim-50, no skip cache; FID: 100 samples per seed" in table
    assert "- b/run: sampling (fid): ddim-50, no skip cache; FID: 200 samples per seed" in table
    write_results(tmp_path / "c" / "other" / "eval", fake_result(100, 3.0), "other")
    shared = compare([str(tmp_path / "a" / "run"), str(tmp_path / "c" / "other")], str(tmp_path / "cmp2"))
    assert "| run | 1 |" in shared and "| other | 3 |" in shared and "Settings differ" not in shared


def test_results_are_invalidated_when_the_weights_change(tmp_path):
    from helpers.tiny_pipelines import ddpm_pipeline

    from skipdiff.eval import evaluate
    from skipdiff.targets import load_target

    folder = ddpm_pipeline(tmp_path / "ddpm")
    evaluate(EvalOptions(checkpoint=str(folder), grid=True, grid_size=1, steps=1))
    result = read_results(folder)
    assert result["weights"]["components"]["unet"]["digest"]
    assert compare([str(folder)], str(tmp_path / "cmp")).count("| ddpm |") == 1
    target = load_target(str(folder))
    with torch.no_grad():
        next(target.unet.parameters()).add_(1e-3)
    target.unet.save_pretrained(folder / "unet")
    with pytest.raises(ValueError, match="scored other weights than the folder holds now .*unet weights"):
        compare([str(folder)], str(tmp_path / "cmp"))
    assert read_results(folder, check_weights=False)["weights"] == result["weights"]


def test_a_colour_pipeline_scored_against_grey_images_is_warned(tmp_path):
    """Issue 31: an RGB pipeline scored against grey digits (converted to RGB on the way) said nothing."""
    import warnings

    from helpers.tiny_pipelines import ddpm_pipeline

    from skipdiff.eval import evaluate

    folder = ddpm_pipeline(tmp_path / "ddpm")  # 8x8 RGB
    options = dict(checkpoint=str(folder), denoise_loss=True, buckets=2, denoise_images=4, resolution=8)
    with pytest.warns(
        UserWarning, match="makes 3-channel images but the reference images are 1-channel.*grey repeated"
    ):
        evaluate(EvalOptions(**options, dataset="digits", out=str(tmp_path / "digits")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # colour reference images: nothing to say
        evaluate(EvalOptions(**options, dataset="photo_patches", out=str(tmp_path / "photos")))


def save_run(folder: Path, layout: str) -> None:
    """A skipdiff run folder: EMA in unet/ and raw in unet_raw/ (``new``), or EMA in unet_ema/ (``old``)."""
    from skipdiff.pipeline import SkipDiffPipeline

    torch.manual_seed(0)
    ema = SkipUNet2DModel(**TINY)
    SkipDiffPipeline(unet=ema, scheduler=DDPMScheduler()).save_pretrained(folder)
    torch.manual_seed(1)
    SkipUNet2DModel(**TINY).save_pretrained(folder / ("unet_raw" if layout == "new" else "unet_ema"))
    (folder / "training_options.json").write_text(json.dumps({"dataset": "digits", "resolution": 8}))


@pytest.mark.parametrize(("layout", "ema", "raw"), [("new", "unet", "unet_raw"), ("old", "unet_ema", "unet")])
def test_a_damaged_ema_copy_is_an_error_unless_no_ema(tmp_path, layout, ema, raw):
    from skipdiff.targets import load_target

    save_run(tmp_path / "run", layout)
    assert load_target(str(tmp_path / "run")).identity["subfolder"] == ema
    weights = tmp_path / "run" / ema / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=f"the run's {ema}/ weights cannot be loaded .*pass --no_ema"):
        load_target(str(tmp_path / "run"))
    target = load_target(str(tmp_path / "run"), use_ema=False)
    assert target.identity == {**target.identity, "subfolder": raw, "ema": False}


def test_every_export_is_what_it_names_even_after_its_submodules_are_imported():
    import importlib
    import inspect
    import pkgutil

    import skipdiff.eval

    for module in pkgutil.iter_modules(skipdiff.eval.__path__):
        if module.name != "__main__":
            importlib.import_module(f"skipdiff.eval.{module.name}")  # sets package attributes named like modules
    shadowed = [name for name in skipdiff.eval.__all__ if inspect.ismodule(getattr(skipdiff.eval, name))]
    assert not shadowed


@pytest.mark.slow
def test_evaluation_imports_no_training_code_and_help_needs_no_torch():
    code = (
        "import sys, skipdiff.eval.evaluation, skipdiff.eval.results, skipdiff.report, skipdiff.targets; "
        "from skipdiff.eval import evaluate, evaluate_target, skip_importance; "
        "bad = sorted(m for m in sys.modules if m.startswith('skipdiff.training')); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    code = (
        "import runpy, sys; sys.argv = ['skipdiff.eval', '--help']\n"
        "try:\n    runpy.run_module('skipdiff.eval', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True).stdout
    assert "--skips" in out and "--clip_model" in out and "--torch_dtype" in out
    assert RESULTS_FILE == "eval.json"
