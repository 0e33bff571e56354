"""The training options users of diffusers' examples reach for, each checked by its effect, and the traps
a new user fell into (issue: "A run folder any diffusers user can load, and the training options they
reach for").

Tiny pixel-space runs (``tests/helpers/unet_runs.py``); unit-level checks where a run would prove less.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers.unet_runs import REPO, loss_records, run_train_unet, stats, tiny_args

from skipdiff import SkipUNet2DModel
from skipdiff.config import parse_args
from skipdiff.encoders import PixelEncoder, batch_latents
from skipdiff.gradients import block_of, grad_norms_by_block
from skipdiff.training import runtime
from skipdiff.training.model_source import skip_unet_from
from skipdiff.training.options import TrainOptions
from skipdiff.training.step import draw_noise

STOCK_TINY = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
)


# --------------------------------------------------------------------------------------------------
# Traps
# --------------------------------------------------------------------------------------------------


def without(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value."""
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


def test_num_epochs_is_honoured_when_max_train_steps_is_not_given(tmp_path):
    options = parse_args(TrainOptions, ["--num_epochs", "3"])
    assert options.max_train_steps is None and options.total_steps(steps_per_epoch=4) == 12
    assert parse_args(TrainOptions, []).total_steps(steps_per_epoch=4) == 1200  # the default job
    both = parse_args(TrainOptions, ["--num_epochs", "3", "--max_train_steps", "5"])
    assert both.total_steps(steps_per_epoch=4) == 5  # as in diffusers' examples, max_train_steps wins
    # 64 train images / batch 16 = 4 steps per epoch; before, the 1200-step default silently won.
    argv = without(
        tiny_args(tmp_path / "epochs", "--max_train_samples", "64", "--num_epochs", "3"), "--max_train_steps"
    )
    assert run_train_unet(argv)["steps"] == 12


def test_random_flip_works_in_pixel_space_without_touching_cache_latents(tmp_path):
    metrics = run_train_unet(tiny_args(tmp_path / "run", "--random_flip", "--max_train_steps", "2"))
    assert metrics["steps"] == 2
    torch.manual_seed(0)
    pixels = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8).repeat(32, 1, 1, 1)  # (64, 1, 8, 8)
    flipped = batch_latents(PixelEncoder(1), {"pixel_values": pixels}, random_flip=True)
    mirrored = (flipped == pixels.flip(-1)).flatten(1).all(1)
    kept = (flipped == pixels).flatten(1).all(1)
    assert bool((mirrored ^ kept).all()) and 16 < int(mirrored.sum()) < 48  # each example one or the other


def test_random_flip_with_cached_latents_picks_the_cached_mirror_image(tmp_path):
    from diffusers import AutoencoderKL

    from skipdiff.encoders import VaeEncoder, cache_encoded
    from skipdiff.presets import vae_config

    torch.manual_seed(0)
    encoder = VaeEncoder(AutoencoderKL(**vae_config("tiny", 1)))
    pixels = torch.rand(8, 1, 8, 8) * 2 - 1
    cache = cache_encoded(encoder, [{"pixel_values": pixels}], flips=True)
    assert torch.allclose(cache["latent_mean_flipped"], encoder.latent_params(pixels.flip(-1))[0])
    torch.manual_seed(3)
    chosen = batch_latents(encoder, cache, random_flip=True)
    flips = [torch.equal(chosen[i], cache["latent_mean_flipped"][i]) for i in range(8)]
    assert any(flips) and not all(flips)


def test_vae_latents_come_in_the_standard_layout_so_the_unet_runs_in_it():
    from diffusers import AutoencoderKL

    from skipdiff.encoders import VaeEncoder
    from skipdiff.presets import vae_config

    torch.manual_seed(0)
    encoder = VaeEncoder(AutoencoderKL(**vae_config("tiny", 1)))
    mean, std = encoder.latent_params(torch.rand(4, 1, 8, 8) * 2 - 1)
    assert mean.is_contiguous() and std.is_contiguous()
    unet = SkipUNet2DModel(**STOCK_TINY | {"in_channels": mean.shape[1], "out_channels": mean.shape[1]})
    assert unet.conv_in(mean).is_contiguous()  # a channels-last input would have made this channels-last


def test_cached_latents_fetch_a_batch_at_once_with_the_rows_values():
    from torch.utils.data import DataLoader

    from skipdiff.encoders import CachedLatents

    tensors = {
        "latent_mean": torch.randn(10, 4, 2, 2),
        "latent_std": torch.rand(10, 4, 2, 2),
        "labels": torch.arange(10),
        "captions": [f"caption {i}" for i in range(10)],
    }
    dataset = CachedLatents(tensors)
    indices = [7, 2, 2, 9]
    batched = CachedLatents.collate(dataset.__getitems__(indices))
    by_rows = CachedLatents.collate([dataset[i] for i in indices])
    assert batched["captions"] == by_rows["captions"] == ["caption 7", "caption 2", "caption 2", "caption 9"]
    for key in ("latent_mean", "latent_std", "labels"):
        assert torch.equal(batched[key], by_rows[key])
    # The DataLoader takes the batched fetch: the same batches, in the same order, as fetching row by row.

    class RowByRow(CachedLatents):
        __getitems__ = None  # the DataLoader falls back to one __getitem__ per row

    def batches(data):
        loader = DataLoader(
            data,
            batch_size=4,
            shuffle=True,
            drop_last=True,
            collate_fn=CachedLatents.collate,
            generator=torch.Generator().manual_seed(1),
        )
        return [batch["labels"] for batch in loader]

    fast, slow = batches(dataset), batches(RowByRow(tensors))
    assert len(fast) == 2 and all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert not torch.equal(fast[0], torch.arange(4))  # shuffled


def test_block_gradient_norms_survive_a_torch_compile_wrapper():
    assert block_of("_orig_mod.down_blocks.0.resnets.1.conv1.weight") == "down_blocks.0"
    assert block_of("module._orig_mod.skip_router.gates.0.alpha") == "gates"
    model = SkipUNet2DModel(**STOCK_TINY, skips="learned")
    wrapped = torch.compile(model)  # lazily compiled: only the parameter names change
    sample = torch.randn(2, 1, 8, 8)
    model(sample, torch.tensor([3, 7])).sample.square().mean().backward()
    plain, compiled = grad_norms_by_block(model), grad_norms_by_block(wrapped)
    assert compiled == plain and "_orig_mod" not in " ".join(compiled) and "gates" in compiled


def test_help_keeps_the_usage_examples_as_written_and_answers_without_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "train_scripts" / "train_unet.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "\n    accelerate launch --config_file accelerate_config.yaml train_scripts/train_unet.py" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "diffusers" not in imported


# --------------------------------------------------------------------------------------------------
# Options, each by its effect
# --------------------------------------------------------------------------------------------------


def test_noise_offset_adds_a_per_channel_constant_and_input_perturbation_only_moves_the_input():
    latents = torch.zeros(256, 4, 8, 8)
    torch.manual_seed(0)
    plain = draw_noise(latents, 1000)
    torch.manual_seed(0)
    offset = draw_noise(latents, 1000, noise_offset=0.5)
    torch.manual_seed(0)
    perturbed = draw_noise(latents, 1000, input_perturbation=0.3)
    channel_means = offset.noise.mean(dim=(2, 3)) - plain.noise.mean(dim=(2, 3))  # (B, C): the added offsets
    assert torch.allclose(offset.noise - plain.noise, channel_means[..., None, None].expand_as(plain.noise), atol=1e-6)
    assert 0.4 < float(channel_means.std()) < 0.6  # 0.5 * N(0, 1) per example and channel
    assert torch.equal(perturbed.noise, plain.noise) and not torch.equal(perturbed.input_noise, plain.noise)
    assert 0.25 < float((perturbed.input_noise - plain.noise).std()) < 0.35


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = SkipUNet2DModel(**STOCK_TINY, skips="learned,scale:0.5,learned_channel,keep").train()
    sample, timesteps = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 999])

    def gradients():
        model.zero_grad()
        model(sample, timesteps).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert model.is_gradient_checkpointing
    assert all(torch.allclose(plain[n], checkpointed[n], rtol=1e-5, atol=1e-7) for n in plain)


def test_scale_lr_multiplies_by_the_global_batch_and_max_train_samples_subsets(tmp_path):
    out = tmp_path / "run"
    run_train_unet(
        tiny_args(
            out,
            "--scale_lr",
            "--lr_scheduler",
            "constant",
            "--lr_warmup_steps",
            "0",
            "--learning_rate",
            "1e-5",
            "--max_train_samples",
            "40",
            "--max_train_steps",
            "2",
        )
    )
    assert [r["lr"] for r in loss_records(out)] == pytest.approx([1e-5 * 16] * 2)
    start = stats(out)[0]
    assert start["train_images"] == 40 and start["test_images"] == 360


@pytest.mark.slow
def test_channels_last_and_dataloader_workers_train_the_same_model(tmp_path):
    base = run_train_unet(tiny_args(tmp_path / "base", "--max_train_steps", "3"))
    last = run_train_unet(
        tiny_args(tmp_path / "last", "--max_train_steps", "3", "--channels_last", "--dataloader_num_workers", "1")
    )
    assert last["final_loss"] == pytest.approx(base["final_loss"], rel=1e-4)


def test_allow_tf32_sets_the_backend_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        runtime.setup_backends(parse_args(TrainOptions, ["--allow_tf32"]))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_8bit_adam_without_bitsandbytes_is_refused_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ValueError, match="--use_8bit_adam needs bitsandbytes"):
        run_train_unet(tiny_args(tmp_path / "run", "--use_8bit_adam"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_in_offline_mode_writes_its_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "run"
    run_train_unet(
        tiny_args(out, "--report_to", "wandb", "--tracker_project_name", "skipdiff-test", "--max_train_steps", "2")
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())  # the run's event log, for `wandb sync`


# --------------------------------------------------------------------------------------------------
# Starting from pretrained weights
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def pretrained_pipeline(tmp_path):
    """A diffusers DDPMPipeline with a stock UNet2DModel and a linear-beta scheduler, as on the Hub."""
    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=UNet2DModel(**STOCK_TINY), scheduler=DDPMScheduler(beta_schedule="linear"))
    pipeline.save_pretrained(tmp_path / "ddpm")
    return tmp_path / "ddpm"


def pretrained_args(out, pretrained, *extra: str) -> list[str]:
    """The tiny run's options on a pretrained UNet (which sets the architecture: no --model)."""
    return without(tiny_args(out, "--pretrained_model_name_or_path", str(pretrained), *extra), "--model")


def test_pretrained_weights_are_the_start_and_the_pipeline_scheduler_is_kept(pretrained_pipeline, tmp_path):
    from skipdiff.training.model_source import build_unet

    options = parse_args(
        TrainOptions, pretrained_args(tmp_path / "run", pretrained_pipeline, "--skips", "scalelong:kappa=0.8")
    )
    data = runtime.TrainingData(splits=None, channels=1, classes=None)
    unet, scheduler = build_unet(options, PixelEncoder(1), data)
    stock = UNet2DModel.from_pretrained(pretrained_pipeline, subfolder="unet").state_dict()
    ours = {k: v for k, v in unet.state_dict().items() if not k.startswith("skip_router.")}
    assert sorted(ours) == sorted(stock) and all(torch.equal(ours[k], stock[k]) for k in stock)
    assert isinstance(unet, SkipUNet2DModel) and unet.skip_router.entries[0]["mode"] == "scale"
    assert scheduler.config.beta_schedule == "linear"  # the pipeline's, not the option's default

    out = tmp_path / "finetuned"
    run_train_unet(pretrained_args(out, pretrained_pipeline, "--max_train_steps", "2", "--skips", "none"))
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] == "linear"
    assert stats(out)[0]["noise_scheduler"]["beta_schedule"] == "linear"


def test_a_remove_spec_cuts_the_weights_that_read_removed_channels_and_says_so(caplog):
    torch.manual_seed(0)
    stock = UNet2DModel(**STOCK_TINY)
    with caplog.at_level("WARNING", logger="skipdiff.skips.unet"):
        unet = skip_unet_from(stock, "keep,keep,keep,remove", [], {})
    printed = caplog.text
    assert "dropped what reads removed skips" in printed and "up_blocks.1.resnets.1.conv1.weight" in printed
    conv = unet.up_blocks[1].resnets[1].conv1.weight
    assert torch.equal(conv, stock.up_blocks[1].resnets[1].conv1.weight[:, : conv.shape[1]])
    sample, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    gated = skip_unet_from(stock, "full", [], {})
    assert torch.equal(gated(sample, t).sample, stock(sample, t).sample)  # keep: exactly the stock model


def test_train_only_gates_needs_a_pretrained_model_and_gates_with_parameters(tmp_path, pretrained_pipeline):
    with pytest.raises(ValueError, match="--train_only gates tunes a pretrained UNet"):
        parse_args(TrainOptions, ["--train_only", "gates"])
    with pytest.raises(ValueError, match="no skip gate has parameters"):
        run_train_unet(
            pretrained_args(tmp_path / "run", pretrained_pipeline, "--train_only", "gates", "--skips", "full")
        )


def test_the_offline_environment_is_set():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_attention_runs_through_pytorch_sdpa():
    """diffusers' default processor calls F.scaled_dot_product_attention (flash / memory-efficient kernels
    on a GPU); a router on the model must not replace it."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    model = SkipUNet2DModel(**STOCK_TINY, skips="learned")
    processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_from_unet_is_the_one_way_to_a_new_skip_model_and_skip_unet_from_is_deprecated(tmp_path):
    from skipdiff import SkipUNet2DModel

    torch.manual_seed(0)
    stock = UNet2DModel(**STOCK_TINY)
    scaled = SkipUNet2DModel.from_unet(stock, skips="scale:0.5", residual_shortcuts={"mid": False})
    assert [e["mode"] for e in scaled.config.skips] == ["scale"] * scaled.num_skips
    assert scaled.config.residual_shortcuts == {"down": True, "mid": False, "up": True}
    scaled.save_pretrained(tmp_path / "unet")
    again = SkipUNet2DModel.from_pretrained(tmp_path / "unet")
    sample, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    torch.testing.assert_close(again(sample, t).sample, scaled(sample, t).sample)
    back = SkipUNet2DModel.from_unet(scaled, skips="full", residual_shortcuts={"mid": False})  # replaced, not merged
    assert [e["mode"] for e in back.config.skips] == ["keep"] * back.num_skips
    with pytest.raises(ValueError, match="do not fit skips"):
        SkipUNet2DModel.from_unet(scaled, skips="learned", strict=True)  # learned gates have parameters
    with pytest.warns(DeprecationWarning, match="SkipUNet2DModel.from_unet"):
        skip_unet_from(stock, "full", [], {})


def test_validation_is_sized_to_the_run_and_states_its_cost(tmp_path, capsys):
    """Issue 31: 64 validation images every 400 steps, one column per prompt (512 x 32768 px for the README's SD 1.5
    command) cost ~26 PFLOP there, more than the ~19 PFLOP of the training it watched."""
    from skipdiff.config import from_dict
    from skipdiff.training.options import TrainOptions
    from skipdiff.training.runtime import text_grid_layout, validation_cost, validation_images

    # The README's SD 1.5 command: 2000 steps at batch 4, 512 px, one validation prompt, guidance 7.5.
    sd = from_dict(
        TrainOptions,
        {
            "resolution": 512,
            "train_batch_size": 4,
            "max_train_steps": 2000,
            "validation_prompts": ["a ninja with blue eyes"],
        },
    )
    images = validation_images(sd, text_conditioned=True)
    assert images == 4 and text_grid_layout(images, sd.validation_prompts) == (4, 2, None)  # 2 x 2: 1024 x 1024 px
    cost = validation_cost(sd, 2000, images, guidance=True)
    assert (cost["grids"], cost["unet_forwards"], cost["training_forwards"]) == (5, 5 * 4 * 50 * 2, 2000 * 4 * 3)
    # At the README's 0.80 TFLOP per forward: 1.6 PFLOP, about 8% of the training (the old 64 images: 133%).
    assert 0.8e12 * cost["unet_forwards"] == pytest.approx(1.6e15) and cost["fraction_of_training"] < 0.1
    assert validation_cost(sd, 2000, 64, guidance=True)["fraction_of_training"] > 1
    assert text_grid_layout(4, ["a", "b"]) == (4, 2, ["a", "b"])  # a labelled column per prompt
    # Other UNets: as many images as fill a ~1024 px square grid, 4 to 64.
    for resolution, expected in ((8, 64), (16, 64), (128, 64), (256, 16), (512, 4), (1024, 4)):
        assert validation_images(from_dict(TrainOptions, {"resolution": resolution}), False) == expected
    assert validation_images(from_dict(TrainOptions, {"num_validation_images": 7}), True) == 7  # as asked
    with pytest.raises(ValueError, match="num_validation_images"):
        from_dict(TrainOptions, {"num_validation_images": 0})
    # A run says what its validation costs, and records it.
    out = tmp_path / "run"
    run_train_unet(tiny_args(out, "--max_train_steps", "3", "--validation_every", "2"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("validation:"))
    assert line.startswith(
        "validation: 2 grid(s) (every 2 steps and at the end) of 4 images x 2 DDIM steps = 16 UNet "
        "forwards, 11.1% of the training's 144"
    )  # 3 steps x 16 images x 3 forwards
    assert stats(out)[0]["validation"]["unet_forwards"] == 16
