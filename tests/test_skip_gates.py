"""Tune only the skips of a pretrained UNet, and carry the result as a small artefact (like a LoRA adapter).

A tiny diffusers ``DDPMPipeline`` with random weights stands in for a pretrained model. Gate-only training
must leave every base weight bit-identical, keep no gradient or optimizer state for them, and write the
gates as a kilobyte artefact that loads onto a fresh copy of the base, stacks, unloads, and refuses an
incompatible UNet by name.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers.unet_runs import run_train_unet, tiny_args

from skipdiff import SkipUNet2DModel
from skipdiff.skips.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_skip_gates,
    loaded_skip_gates,
    save_skip_gates,
    skip_gates_card,
    unload_skip_gates,
)
from skipdiff.training.model_source import freeze_all_but_gates, skip_unet_from

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
GATES = "learned:init=0.8,learned_channel,learned,learned_channel:init=1.2"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved DDPM pipeline (stock UNet2DModel, linear betas)."""
    folder = tmp_path_factory.mktemp("base") / "ddpm"
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**STOCK_TINY), scheduler=DDPMScheduler(beta_schedule="linear")).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "run"
    argv = tiny_args(
        out,
        "--pretrained_model_name_or_path",
        str(base),
        "--train_only",
        "gates",
        "--skips",
        GATES,
        "--max_train_steps",
        "4",
        "--learning_rate",
        "5e-2",
        "--lr_warmup_steps",
        "0",
    )
    index = argv.index("--model")
    run_train_unet(argv[:index] + argv[index + 2 :])
    return out


def inputs():
    generator = torch.Generator().manual_seed(7)
    return torch.randn(3, 1, 8, 8, generator=generator), torch.tensor([10, 400, 900])


def test_gate_only_training_changes_the_gates_and_nothing_else(base, tuned):
    stock = UNet2DModel.from_pretrained(base, subfolder="unet").state_dict()
    trained = SkipUNet2DModel.from_pretrained(tuned, subfolder="unet").state_dict()
    assert all(torch.equal(trained[k], stock[k]) for k in stock)  # every base weight bit-identical
    gates = {k: v for k, v in trained.items() if k.startswith("skip_router.")}
    initial = SkipUNet2DModel(**STOCK_TINY, skips=GATES).skip_router.state_dict()
    assert any(not torch.equal(v, initial[k.removeprefix("skip_router.")]) for k, v in gates.items())


def test_the_artefact_is_small_and_loads_onto_a_fresh_base_with_the_same_outputs(base, tuned):
    folder = tuned / "skip_gates"
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["base_model"] == str(base) and config["unet_class"] == "SkipUNet2DModel"
    assert (folder / WEIGHTS_NAME).stat().st_size < 16_000  # bytes: the gates, not the UNet
    trained = SkipUNet2DModel.from_pretrained(tuned, subfolder="unet").eval()
    pipe = DDPMPipeline.from_pretrained(base)
    sample, t = inputs()
    before = pipe.unet(sample, t).sample
    load_skip_gates(pipe, folder)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(sample, t).sample, trained(sample, t).sample, atol=1e-6)
    assert list(loaded_skip_gates(pipe)) == [tuned.name]  # a run's <run>/skip_gates loads under the run's name
    unload_skip_gates(pipe)
    assert torch.equal(pipe.unet(sample, t).sample, before) and not loaded_skip_gates(pipe)


def test_loaded_gates_stack_and_unload_by_name(base, tmp_path):
    unet = UNet2DModel.from_pretrained(base, subfolder="unet")
    halve = SkipUNet2DModel(**STOCK_TINY, skips="scale:0.5")
    save_skip_gates(halve, tmp_path / "half")
    sample, t = inputs()
    plain = unet(sample, t).sample
    load_skip_gates(unet, tmp_path / "half", name="a")
    once = unet(sample, t).sample
    load_skip_gates(unet, tmp_path / "half", name="b")
    twice = unet(sample, t).sample
    reference = UNet2DModel.from_pretrained(base, subfolder="unet")
    quarter = skip_unet_from(reference, "scale:0.25", [], {})
    assert torch.allclose(twice, quarter(sample, t).sample, atol=1e-6)  # 0.5 then 0.5: a quarter
    with pytest.raises(ValueError, match="named 'a' are loaded already"):
        load_skip_gates(unet, tmp_path / "half", name="a")
    unload_skip_gates(unet, "b")
    assert torch.equal(unet(sample, t).sample, once)
    unload_skip_gates(unet, "a")
    assert torch.equal(unet(sample, t).sample, plain)


def test_two_runs_artefacts_stack_by_default_under_their_run_names(base, tmp_path):
    """Issue 31: every run saves <run>/skip_gates, so the default name was "skip_gates" for all of them and
    the second load raised; the default is now the run's name."""
    from skipdiff.skips.adapters import loaded_skip_gates

    unet = UNet2DModel.from_pretrained(base, subfolder="unet")
    for run in ("run-a", "run-b"):
        save_skip_gates(SkipUNet2DModel(**STOCK_TINY, skips="scale:0.5"), tmp_path / run / "skip_gates")
        load_skip_gates(unet, tmp_path / run / "skip_gates")
    assert list(loaded_skip_gates(unet)) == ["run-a", "run-b"]
    unload_skip_gates(unet, "run-a")
    assert list(loaded_skip_gates(unet)) == ["run-b"]


def test_an_incompatible_unet_is_refused_naming_both_geometries(tuned):
    other = UNet2DModel(**{**STOCK_TINY, "block_out_channels": (4, 8), "norm_num_groups": 2})
    with pytest.raises(
        ValueError,
        match=r"made for 4 skips with \(skip, backbone\) channels \[.*\] .* but this "
        r"UNet2DModel has 4 skips with \[\(8, 8\)",
    ):
        load_skip_gates(other, tuned / "skip_gates")


def test_a_gate_only_step_keeps_no_gradient_or_optimizer_state_for_the_base():
    torch.manual_seed(0)

    def step_memory(gates_only: bool) -> tuple[int, int]:
        model = SkipUNet2DModel(**STOCK_TINY, skips=GATES)
        if gates_only:
            freeze_all_but_gates(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, fused=True)
        sample, t = inputs()
        model(sample, t).sample.square().mean().backward()
        optimizer.step()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items() if k != "step")
        return grads, state

    full, gates = step_memory(False), step_memory(True)
    gate_bytes = sum(p.numel() * 4 for p in SkipUNet2DModel(**STOCK_TINY, skips=GATES).skip_router.parameters())
    assert gates == (gate_bytes, 2 * gate_bytes)  # gradients and the two Adam moments of the gates alone
    assert full[0] > 20 * gates[0] and full[1] > 20 * gates[1]


def test_the_card_is_valid_hub_metadata_naming_the_base_model(tuned, tmp_path):
    from huggingface_hub import ModelCard

    config = json.loads((tuned / "skip_gates" / CONFIG_NAME).read_text())
    skip_gates_card(config, "user/gates").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == config["base_model"] and "skipdiff" in card.data.tags
    assert "load_skip_gates" in card.text and "<placeholder>" not in card.text


@pytest.mark.slow
def test_lora_training_saves_a_plain_model_with_the_adapters_merged(base, tmp_path):
    from skipdiff.training.model_source import add_lora, plain_model

    stock = UNet2DModel.from_pretrained(base, subfolder="unet")
    unet = skip_unet_from(stock, "full", [], {})
    sample, t = inputs()
    before = unet(sample, t).sample
    trainable = add_lora(unet, rank=2)
    assert 0 < trainable < sum(p.numel() for p in stock.parameters()) / 3
    assert torch.equal(unet(sample, t).sample, before)  # fresh adapters change nothing
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    merged = plain_model(unet)
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged(sample, t).sample, unet(sample, t).sample, atol=1e-5)

    out = tmp_path / "lora"
    argv = tiny_args(
        out,
        "--pretrained_model_name_or_path",
        str(base),
        "--train_only",
        "lora",
        "--lora_rank",
        "2",
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--lr_warmup_steps",
        "0",
    )
    index = argv.index("--model")
    run_train_unet(argv[:index] + argv[index + 2 :])
    saved = SkipUNet2DModel.from_pretrained(out, subfolder="unet_raw").state_dict()
    reference = stock.state_dict()
    changed = [k for k in reference if not torch.equal(saved[k], reference[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in ("conv1", "conv2", "to_q", "to_k", "to_v", "0") for k in changed)


def test_without_peft_lora_is_refused_naming_its_extra_and_other_runs_do_not_need_it(base, tmp_path, monkeypatch):
    import sys

    import diffusers.utils.import_utils

    from skipdiff.presets import unet_config
    from skipdiff.training.model_source import plain_model

    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError: not installed
    monkeypatch.setattr(diffusers.utils.import_utils, "_peft_available", False)  # as diffusers then finds it
    argv = tiny_args(tmp_path / "lora", "--pretrained_model_name_or_path", str(base), "--train_only", "lora")
    index = argv.index("--model")
    with pytest.raises(ValueError, match=r'--train_only lora needs peft: pip install "skipdiff\[lora\]"'):
        run_train_unet(argv[:index] + argv[index + 2 :])
    assert not (tmp_path / "lora" / "stats.jsonl").exists()  # refused before training
    unet = SkipUNet2DModel(**unet_config("tiny", sample_size=8, channels=1))
    assert plain_model(unet) is unet  # the export of every other run does not import peft


# --------------------------------------------------------------------------------------------------
# Stable Diffusion: gates on a UNet2DConditionModel, captions through the pipeline's own text encoder
# --------------------------------------------------------------------------------------------------


def test_gate_only_training_on_a_tiny_stable_diffusion_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    from helpers.tiny_pipelines import captioned_images, sd_pipeline

    from skipdiff.runfolder import read_stats

    pipeline = sd_pipeline(tmp_path / "sd")
    images = captioned_images(tmp_path / "images", count=24, size=16)
    out = tmp_path / "run"
    argv = tiny_args(
        out,
        "--pretrained_model_name_or_path",
        str(pipeline),
        "--train_only",
        "gates",
        "--skips",
        "adapter:width=2",
        "--train_data_dir",
        str(images),
        "--caption_column",
        "text",
        "--resolution",
        "16",
        "--max_train_steps",
        "3",
        "--learning_rate",
        "5e-2",
        "--lr_warmup_steps",
        "0",
        "--validation_prompts",
        "a red square",
        "a blue circle",
        "--num_validation_images",
        "2",
        "--random_flip",
    )
    index = argv.index("--model")
    run_train_unet(argv[:index] + argv[index + 2 :])
    # The artefact alone: no copy of the UNet, the base named; the grid holds the validation prompts.
    assert not (out / "unet").exists() and (out / "skip_gates" / WEIGHTS_NAME).is_file()
    assert json.loads((out / "skip_gates" / CONFIG_NAME).read_text())["base_model"] == str(pipeline)
    assert (out / "samples" / "step-000003.png").is_file()
    start = read_stats(out / "stats.jsonl")[0]
    assert start["vae"].endswith("(the pipeline's own)") and 0 < start["num_trainable_parameters"] < 500

    fresh = StableDiffusionPipeline.from_pretrained(pipeline)
    base = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    sample = torch.randn(2, 4, 2, 2)
    text = torch.randn(2, 77, 32)
    before = fresh.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    load_skip_gates(fresh, out / "skip_gates")
    after = fresh.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    assert not torch.equal(before, after)  # the trained adapters act
    assert all(torch.equal(v, base[k]) for k, v in fresh.unet.state_dict().items())  # base weights untouched
    unload_skip_gates(fresh)
    assert torch.equal(fresh.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample, before)
