"""Study targets: which pipelines are accepted (and refused before any weights), how they are loaded,
conditioned and sampled, and that an inference-time skip spec leaves the model bit for bit as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY
from helpers.tiny_pipelines import ddpm_pipeline, ldm_pipeline, sd_pipeline, sdxl_pipeline

from skipdiff import SkipUNet2DModel
from skipdiff.encoders import VqEncoder
from skipdiff.sampling import image_generators, sample_images
from skipdiff.targets import load_target


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return {"ddpm": ddpm_pipeline(root / "ddpm"), "ldm": ldm_pipeline(root / "ldm"), "sd": sd_pipeline(root / "sd")}


def write_index(folder, pipeline: str, **components) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "DDIMScheduler"]}
    index.update({name: ["diffusers", cls] for name, cls in components.items()})
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("pipeline", "transformer"),
    [
        ("DiTPipeline", "DiTTransformer2DModel"),
        ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
        ("FluxPipeline", "FluxTransformer2DModel"),
    ],
)
def test_transformer_denoisers_are_refused_by_class_and_reason(tmp_path, pipeline, transformer):
    write_index(tmp_path / "p", pipeline, transformer=transformer, vae="AutoencoderKL")
    with pytest.raises(
        ValueError, match=f"{pipeline} whose denoiser is a {transformer}, a transformer: it has no long"
    ):
        load_target(str(tmp_path / "p"))


def test_a_hub_pipeline_is_refused_from_its_index_alone(tmp_path, monkeypatch):
    import diffusers
    import huggingface_hub

    snapshot = tmp_path / "models--x--flux" / "snapshots" / "abc123"
    write_index(snapshot, "FluxPipeline", transformer="FluxTransformer2DModel")
    fetched = []

    def download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        return str(snapshot / filename)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match="FluxTransformer2DModel, a transformer"):
        load_target("black-forest-labs/FLUX.1-dev")
    assert fetched == [("black-forest-labs/FLUX.1-dev", "model_index.json")]


def test_unet_pipelines_skipdiff_cannot_condition_are_named(tmp_path):
    write_index(tmp_path / "p", "StableDiffusionInpaintPipeline", unet="UNet2DConditionModel", vae="AutoencoderKL")
    with pytest.raises(ValueError, match="StableDiffusionInpaintPipeline: its UNet2DConditionModel is a UNet, but"):
        load_target(str(tmp_path / "p"))
    with pytest.raises(ValueError, match="not a skipdiff run folder or a diffusers pipeline"):
        load_target(str(tmp_path))


def test_float16_is_refused_on_a_cpu_and_bfloat16_works(folders):
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        load_target(str(folders["sd"]), torch_dtype="float16", device="cpu")
    target = load_target(str(folders["sd"]), torch_dtype="bfloat16", device="cpu")
    assert target.unet.dtype == torch.bfloat16 and target.identity["torch_dtype"] == "bfloat16"
    images = sample_images(target, 2, seed=0, steps=2, prompts=["a cat"], progress=False).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_pixel_sampling_is_the_ddpm_pipelines_own_and_per_image(folders):
    from diffusers import DDPMPipeline

    target = load_target(str(folders["ddpm"]))
    ours = sample_images(target, 3, seed=5, steps=3, sampler="pipeline", progress=False).images  # (3, 3, 8, 8)
    pipeline = DDPMPipeline.from_pretrained(folders["ddpm"])
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        batch_size=3, generator=image_generators(5, range(3)), num_inference_steps=3, output_type="np"
    ).images  # (3, 8, 8, 3) in [0, 1]
    np.testing.assert_allclose(((ours + 1) / 2).permute(0, 2, 3, 1).numpy(), theirs, atol=1e-6)
    # Image i depends on (seed, i) only, not on the batch it was drawn in (up to the kernels' batch-size rounding).
    one_by_one = sample_images(target, 3, seed=5, steps=3, sampler="pipeline", batch_size=1, progress=False).images
    later = sample_images(target, 2, seed=5, steps=3, sampler="pipeline", start=1, progress=False).images
    torch.testing.assert_close(one_by_one, ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(later, ours[1:], rtol=0, atol=1e-4)
    other_seed = sample_images(target, 1, seed=6, steps=3, sampler="pipeline", progress=False).images
    assert (other_seed - ours[:1]).abs().max() > 0.1


def test_run_sampling_is_the_skipdiff_pipelines_own(tmp_path):
    from diffusers import DDPMScheduler

    from skipdiff.pipeline import SkipDiffPipeline

    torch.manual_seed(0)
    pipeline = SkipDiffPipeline(unet=SkipUNet2DModel(**TINY, skips="scale:0.5").eval(), scheduler=DDPMScheduler())
    pipeline.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "training_options.json").write_text(json.dumps({"dataset": "digits", "resolution": 8}))
    target = load_target(str(tmp_path / "run"))
    assert target.kind == "skipdiff-run" and target.identity["ema"] is False
    ours = sample_images(target, 2, seed=3, steps=3, sampler="ddpm", progress=False).images
    theirs = pipeline(
        batch_size=2,
        generator=image_generators(3, range(2)),
        num_inference_steps=3,
        sampler="ddpm",
        output_type="pt",
        show_progress=False,
    ).images
    assert torch.equal(ours, theirs)


def test_ldm_targets_use_vq_latents_with_the_declared_scale_or_none(folders, tmp_path):
    from diffusers import LDMPipeline

    target = load_target(str(folders["ldm"]))
    assert isinstance(target.encoder, VqEncoder) and target.encoder.scaling_factor == pytest.approx(0.18215)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents, std = target.encoder.latent_params(pixels)
    vqvae = target.pipeline.vqvae
    torch.testing.assert_close(latents, vqvae.encode(pixels).latents * 0.18215)
    assert std.abs().max() == 0
    torch.testing.assert_close(target.encoder.decode(latents), vqvae.decode(latents / 0.18215).sample)
    ours = sample_images(target, 2, seed=1, steps=3, sampler="pipeline", progress=False).images
    pipeline = LDMPipeline.from_pretrained(folders["ldm"])
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        batch_size=2, generator=image_generators(1, range(2)), num_inference_steps=3, output_type="np"
    ).images
    np.testing.assert_allclose(((ours + 1) / 2).permute(0, 2, 3, 1).numpy(), theirs, atol=1e-5)
    # A VQ config saved without a scaling factor (CompVis' LDMs) means unscaled latents, as the LDM paper trains.
    old = tmp_path / "ldm-old"
    shutil.copytree(folders["ldm"], old)
    config = json.loads((old / "vqvae" / "config.json").read_text())
    del config["scaling_factor"]
    (old / "vqvae" / "config.json").write_text(json.dumps(config))
    assert load_target(str(old)).encoder.describe()["scaling_factor"] == 1.0


def test_text_conditioning_goes_through_the_pipelines_own_encoders(folders, tmp_path):
    target = load_target(str(folders["sd"]))
    batch = {"pixel_values": torch.zeros(2, 3, 16, 16), "captions": ["a red cat", "dog"]}
    kwargs = target.conditioning.unet_kwargs(batch)
    expected, _ = target.pipeline.encode_prompt(["a red cat", "dog"], "cpu", 1, False)
    assert torch.equal(kwargs["encoder_hidden_states"], expected) and set(kwargs) == {"encoder_hidden_states"}
    with pytest.raises(ValueError, match="--caption_column"):
        target.conditioning.unet_kwargs({"pixel_values": torch.zeros(1, 3, 16, 16)})
    xl = load_target(str(sdxl_pipeline(tmp_path / "xl")))
    kwargs = xl.conditioning.unet_kwargs(batch)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert kwargs["encoder_hidden_states"].shape == (2, 77, 64)  # both encoders' hidden states, concatenated
    out = xl.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), **kwargs).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_an_inference_skip_spec_leaves_a_pipeline_bit_identical(folders):
    target = load_target(str(folders["sd"]))
    unet = target.unet
    sample, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, 32)}
    state = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    before = unet(sample, timesteps, **kwargs).sample
    with target.skips_applied("none"):
        ablated = unet(sample, timesteps, **kwargs).sample
    after = unet(sample, timesteps, **kwargs).sample
    assert not torch.equal(ablated, before)
    assert torch.equal(after, before)
    assert all(torch.equal(state[name], tensor) for name, tensor in unet.state_dict().items())
    assert not any(m._forward_pre_hooks for m in unet.modules())  # every hook is gone


def test_a_runs_trained_gates_come_back_after_another_spec(tmp_path):
    from skipdiff.targets import skip_spec_applied

    torch.manual_seed(0)
    unet = SkipUNet2DModel(**TINY, skips="learned:init=0.7").eval()
    original = unet.skip_router
    sample, timesteps = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    before = unet(sample, timesteps).sample
    with skip_spec_applied(unet, "zero") as router:
        assert unet.skip_router is router and [g.mode for g in router.gates] == ["zero"] * 4
        zeroed = unet(sample, timesteps).sample
    assert unet.skip_router is original and not torch.equal(zeroed, before)
    assert torch.equal(unet(sample, timesteps).sample, before)
    removed = SkipUNet2DModel(**TINY, skips="remove,keep,keep,keep")
    with pytest.raises(ValueError, match=r"removed skips \[0\] have no channels"):
        with skip_spec_applied(removed, "full"):
            pass
