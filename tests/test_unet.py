"""SkipUNet2DModel and apply_skip_spec: every gate mode and preset, parity with stock diffusers,
save/load round trips (model and pipelines), FreeU parity, residual shortcuts, skip geometry."""

from __future__ import annotations

import diffusers.models.unets.unet_2d_blocks
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils.torch_utils import fourier_filter

from skipdiff import GATES, PRESETS, SkipUNet2DModel, apply_skip_spec

torch.set_num_threads(1)

NUM_TINY_SKIPS = 4  # TINY in conftest: 2 blocks x (layers_per_block=1 + 1)

# Options that make each mode do something (most defaults would too; these make the tests sharper).
# A newly registered mode is picked up automatically with its defaults.
MODE_EXAMPLES = {
    "scale": "scale:0.5",
    "learned": "learned:init=0.5",
    "learned_channel": "learned_channel:init=0.5",
    "fourier": "fourier:backbone=1.4:skip=0.3",
    "bernoulli": "bernoulli:p=0.6",
    "ramp": "ramp:low=1:high=0.25",
    "adapter": "adapter:zero_init=false",  # a zero-initialised adapter leaves the output unchanged
}
# The tiny inputs' timesteps are (666, 901): the windows below cover one example of two.
EXTRA_VARIANTS = [
    "learned_channel:form=se",
    "bernoulli:p=0.6:rescale=true",
    "markov:rescale=true",
    "fourier:backbone=1.4:skip=0.3:structure=true",
    "scale:0.5:t_max=800",
    "learned:init=0.5:t_min=700",
    "fourier:backbone=1.4:skip=0.3:t_min=700",
    "ramp:low=1.5:high=0.5:learned=true",
    "adapter:width=3",
    "adapter:ratio=0.5:t_max=800",
]


def every_skip(entry: str, count: int = NUM_TINY_SKIPS) -> list[str]:
    """One entry for every skip, as a list (the per-skip form a config stores)."""
    return [entry] * count


MODE_SPECS = {mode: every_skip(MODE_EXAMPLES.get(mode, mode)) for mode in sorted(GATES)}
MODE_SPECS.update({entry: every_skip(entry) for entry in EXTRA_VARIANTS})
VARIANTS = [pytest.param(spec, id=f"mode-{name}") for name, spec in MODE_SPECS.items()] + [
    pytest.param(name, id=f"preset-{name}") for name in sorted(PRESETS)
]


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model: torch.nn.Module, inputs) -> torch.Tensor:
    return model(*inputs).sample


def perturb_skip_state(model: SkipUNet2DModel) -> None:
    """Move gate parameters and the Markov chain away from their initial values, so that a round
    trip that rebuilt them from the config instead of loading them would be caught."""
    with torch.no_grad():
        for p in model.skip_router.parameters():
            p.uniform_(0.3, 1.7)
        if model.skip_router.chain is not None:
            model.skip_router.chain.open_prob.uniform_(0.2, 0.9)


def shared_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every tensor of ``source`` whose name and shape ``target`` also has."""
    target_state = target.state_dict()
    state = {k: v for k, v in source.state_dict().items() if k in target_state and target_state[k].shape == v.shape}
    target.load_state_dict(state, strict=False)


def resnets(blocks) -> list[ResnetBlock2D]:
    return [m for block in blocks for m in block.modules() if isinstance(m, ResnetBlock2D)]


def shortcut_params(resnet: ResnetBlock2D) -> int:
    return 0 if resnet.conv_shortcut is None else param_count(resnet.conv_shortcut)


# --------------------------------------------------------------------------------------------------
# Every mode and every preset
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", VARIANTS)
def test_variant_shape_finite_and_every_parameter_gets_a_gradient(spec, tiny_config, make_inputs):
    model = SkipUNet2DModel(**tiny_config, skips=spec).train()
    sample, timesteps = make_inputs(tiny_config)
    out = run(model, (sample, timesteps))
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()
    out.sum().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("spec", VARIANTS)
def test_variant_save_load_round_trip(spec, tiny_config, make_inputs, tmp_path):
    model = SkipUNet2DModel(**tiny_config, skips=spec)
    perturb_skip_state(model)
    model.eval()
    inputs = make_inputs(tiny_config)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = SkipUNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.skips == model.config.skips
    assert len(loaded.config.skips) == NUM_TINY_SKIPS
    assert [g.mode for g in loaded.skip_router.gates] == [g.mode for g in model.skip_router.gates]
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key
    assert torch.equal(run(loaded, inputs), expected)


@pytest.mark.parametrize("mode", sorted(GATES))
def test_every_mode_but_keep_changes_the_output(mode, tiny_config, make_inputs):
    inputs = make_inputs(tiny_config)
    keep = SkipUNet2DModel(**tiny_config).eval()
    model = SkipUNet2DModel(**tiny_config, skips=MODE_SPECS[mode]).eval()
    shared_weights(keep, model)
    same = torch.equal(run(model, inputs), run(keep, inputs))
    assert same == (mode == "keep"), f"mode {mode!r} ({MODE_SPECS[mode][0]}): output equal to keep: {same}"


def test_zero_has_exactly_the_parameters_of_keep(tiny_config, deep_config):
    for config in (tiny_config, deep_config):
        keep = SkipUNet2DModel(**config, skips="full")
        zero = SkipUNet2DModel(**config, skips="zero")
        assert param_count(zero) == param_count(keep)
        assert {k: v.shape for k, v in zero.state_dict().items()} == {k: v.shape for k, v in keep.state_dict().items()}


@pytest.mark.parametrize("config_name", ["tiny", "deep"])
@pytest.mark.parametrize("which", ["all", "alternate"])
def test_remove_drops_exactly_the_skip_weights_of_the_receiving_resnets(config_name, which, request):
    config = request.getfixturevalue(f"{config_name}_config")
    keep = SkipUNet2DModel(**config)
    count = keep.num_skips
    removed_indices = list(range(count)) if which == "all" else list(range(0, count, 2))
    spec = ["remove" if k in removed_indices else "keep" for k in range(count)]
    removed = SkipUNet2DModel(**config, skips=spec)

    # Expected difference, derived from the keep model's receiving resnets.
    expected, shortcut_vanishes = 0, []
    for info in keep.skip_router.skips:
        if info.index not in removed_indices:
            continue
        resnet = keep.up_blocks[info.up_block].resnets[info.layer]
        main, skip, out = info.main_channels, info.skip_channels, resnet.out_channels
        assert resnet.conv1.in_channels == main + skip
        kh, kw = resnet.conv1.kernel_size
        expected += out * skip * kh * kw  # conv1 weights reading the skip's channels
        norm_per_channel = (resnet.norm1.weight.numel() + resnet.norm1.bias.numel()) // (main + skip)
        expected += norm_per_channel * skip  # norm1's affine weight and bias of the skip's channels
        # The 1x1 conv_shortcut maps (main + skip) -> out; after removal it maps main -> out, and
        # disappears when main == out.
        shortcut = resnet.conv_shortcut
        assert shortcut is not None  # main + skip != out in these UNets
        sh, sw = shortcut.kernel_size
        bias = 0 if shortcut.bias is None else out
        after = 0 if main == out else main * out * sh * sw + bias
        expected += param_count(shortcut) - after
        shortcut_vanishes.append(main == out)
        rebuilt = removed.up_blocks[info.up_block].resnets[info.layer]
        assert rebuilt.in_channels == main
        assert (rebuilt.conv_shortcut is None) == (main == out)
    assert expected > 0
    if which == "all":
        assert any(shortcut_vanishes), "the config should have a skip whose removal drops the shortcut"
    assert param_count(keep) - param_count(removed) == expected


def test_invalid_residual_shortcuts_name_the_bad_value(tiny_config):
    with pytest.raises(ValueError, match="upp"):
        SkipUNet2DModel(**tiny_config, residual_shortcuts={"upp": False})
    with pytest.raises(ValueError, match="no"):
        SkipUNet2DModel(**tiny_config, residual_shortcuts={"up": "no"})


# --------------------------------------------------------------------------------------------------
# Parity with stock diffusers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", ["tiny", "deep"])
def test_keep_is_bit_identical_to_stock_unet2dmodel(config_name, request, make_inputs):
    config = request.getfixturevalue(f"{config_name}_config")
    stock = UNet2DModel(**config)
    model = SkipUNet2DModel(**config)
    model.load_state_dict(stock.state_dict())  # strict: keep gates add no tensors
    inputs = make_inputs(config)
    out_stock, out_model = run(stock, inputs), run(model, inputs)
    assert torch.equal(out_model, out_stock)
    out_stock.sum().backward()
    out_model.sum().backward()
    model_params = dict(model.named_parameters())
    for name, p in stock.named_parameters():
        assert torch.equal(model_params[name].grad, p.grad), name
    stock.eval(), model.eval()
    assert torch.equal(run(model, inputs), run(stock, inputs))


def test_stock_checkpoint_loads_into_skip_unet(tiny_config, make_inputs, tmp_path):
    stock = UNet2DModel(**tiny_config).eval()
    stock.save_pretrained(tmp_path)
    model = SkipUNet2DModel.from_pretrained(tmp_path).eval()
    assert model.config.skips == [{"mode": "keep"}] * NUM_TINY_SKIPS
    inputs = make_inputs(tiny_config)
    assert torch.equal(run(model, inputs), run(stock, inputs))


@pytest.mark.parametrize(
    "pipeline_cls, scheduler_cls, loader",
    [(DDPMPipeline, DDPMScheduler, DiffusionPipeline), (DDIMPipeline, DDIMScheduler, DDIMPipeline)],
    ids=["ddpm", "ddim"],
)
def test_pipeline_round_trip_keeps_spec_and_samples(pipeline_cls, scheduler_cls, loader, tiny_config, tmp_path):
    spec = ["keep", "zero", "scale:0.5", "learned:init=0.5"]
    unet = SkipUNet2DModel(**tiny_config, skips=spec)
    perturb_skip_state(unet)
    unet.eval()
    pipe = pipeline_cls(unet=unet, scheduler=scheduler_cls(num_train_timesteps=50))

    def sample(pipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipeline(batch_size=2, generator=generator, num_inference_steps=3, output_type="np").images

    images = sample(pipe)
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    pipe.save_pretrained(tmp_path)
    loaded = loader.from_pretrained(tmp_path)
    assert type(loaded) is pipeline_cls
    assert type(loaded.unet) is SkipUNet2DModel
    assert loaded.unet.config.skips == unet.config.skips
    assert np.array_equal(sample(loaded), images)

    # The spec is what makes these images: the same backbone with every skip kept samples others.
    full = SkipUNet2DModel(**tiny_config).eval()
    shared_weights(unet, full)
    assert not np.array_equal(sample(pipeline_cls(unet=full, scheduler=pipe.scheduler)), images)


def tiny_condition_unet() -> UNet2DConditionModel:
    """A tiny Stable-Diffusion-style UNet (sample_size 16) with diffusers' FreeU path."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


# 16: the configured sample_size (the FreeU operators built with the gates serve); 24 and 8: another
# runtime size, whose operators are built on first use.
@pytest.mark.parametrize("size", [16, 24, 8])
def test_freeu_spec_reproduces_diffusers_enable_freeu(size):
    unet = tiny_condition_unet()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, size, size, generator=generator)
    context = torch.randn(2, 5, 8, generator=generator)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample

    b1, b2, s1, s2 = 1.3, 1.4, 0.9, 0.2
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = forward()
    unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    reference = forward()
    unet.disable_freeu()
    assert torch.equal(forward(), plain)
    assert (reference - plain).abs().max() > 1e-3  # FreeU does something at this size

    router = apply_skip_spec(unet, f"freeu:b1={b1}:b2={b2}:s1={s1}:s2={s2}")
    # FreeU acts on the first two up blocks only; the third keeps its skips.
    assert [g.mode for g in router.gates] == ["fourier"] * 4 + ["keep"] * 2
    gated = forward()
    torch.testing.assert_close(gated, reference, atol=1e-5, rtol=0)

    router.detach()
    assert torch.equal(forward(), plain)
    state_after = unet.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


def freeu2_apply(resolution_idx, hidden_states, res_hidden_states, **factors):
    """diffusers' ``apply_freeu`` with FreeU v2's backbone factor, written from the FreeU README:
    ``h[:, :C/2] *= (b - 1) * minmax(mean_c(h)) + 1``, the min-max over each example's positions."""
    if resolution_idx not in (0, 1):
        return hidden_states, res_hidden_states
    b, s = factors[f"b{resolution_idx + 1}"], factors[f"s{resolution_idx + 1}"]
    m = hidden_states.mean(dim=1)  # (B, H, W)
    low = m.flatten(1).min(dim=1).values[:, None, None]
    high = m.flatten(1).max(dim=1).values[:, None, None]
    half = hidden_states.shape[1] // 2
    hidden_states[:, :half] = hidden_states[:, :half] * ((b - 1) * ((m - low) / (high - low)) + 1)[:, None]
    return hidden_states, fourier_filter(res_hidden_states, threshold=1, scale=s)


def test_freeu2_spec_equals_diffusers_freeu_path_with_the_v2_formula(monkeypatch):
    unet = tiny_condition_unet()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 5, 8, generator=generator)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample

    b1, b2, s1, s2 = 1.3, 1.4, 0.9, 0.2
    plain = forward()
    # The reference: diffusers' own FreeU hook points (the first two up blocks) running the v2 formula.
    monkeypatch.setattr(diffusers.models.unets.unet_2d_blocks, "apply_freeu", freeu2_apply)
    unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    reference = forward()
    unet.disable_freeu()
    monkeypatch.undo()
    unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    v1 = forward()
    unet.disable_freeu()

    router = apply_skip_spec(unet, f"freeu2:b1={b1}:b2={b2}:s1={s1}:s2={s2}")
    assert [g.structure for g in router.gates if g.mode == "fourier"] == [True] * 4
    gated = forward()
    torch.testing.assert_close(gated, reference, atol=1e-5, rtol=0)
    assert (gated - v1).abs().max() > 1e-3  # v2 differs from v1
    router.detach()
    assert torch.equal(forward(), plain)


# Modes and presets added with timestep windows, profiles and adapters, as entries for the tiny UNet.
ATTACHABLE = {
    "ramp": every_skip("ramp:low=1:high=0.25"),
    "ramp-learned-window": every_skip("ramp:learned=true:t_min=700"),
    "adapter": every_skip("adapter:zero_init=false:width=3"),
    "fourier-v2-window": every_skip("fourier:backbone=1.4:skip=0.3:structure=true:t_max=800"),
    "linear": "linear:outer=1:inner=0.25",
    "freeu2": "freeu2",
    "scalelong-window": "scalelong:kappa=0.5:t_min=700",
}


@pytest.mark.parametrize("spec", list(ATTACHABLE.values()), ids=list(ATTACHABLE))
def test_new_modes_attach_to_a_stock_unet_and_detach_bit_for_bit(spec, tiny_config, make_inputs):
    stock = UNet2DModel(**tiny_config).eval()
    inputs = make_inputs(tiny_config)  # timesteps (666, 901): the windows hold one example
    state_before = {k: v.clone() for k, v in stock.state_dict().items()}
    plain = run(stock, inputs)
    router = apply_skip_spec(stock, spec)
    gated = run(stock, inputs)
    assert not torch.allclose(gated, plain)
    # The same gates as a SkipUNet2DModel config give the same output.
    model = SkipUNet2DModel(**tiny_config, skips=spec).eval()
    shared_weights(stock, model)
    model.skip_router.load_state_dict(router.state_dict())
    assert torch.equal(run(model, inputs), gated)
    router.detach()
    assert torch.equal(run(stock, inputs), plain)
    state_after = stock.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


def test_a_fresh_adapter_leaves_a_pretrained_model_bit_identical(tiny_config, make_inputs):
    stock = UNet2DModel(**tiny_config)
    inputs = make_inputs(tiny_config)
    plain = run(stock, inputs)
    router = apply_skip_spec(stock, "adapter")
    assert torch.equal(run(stock, inputs), plain)
    # ... in training mode too, and its output layers get a gradient from the first step.
    out = run(stock, inputs)
    out.sum().backward()
    assert all(gate.up.weight.grad.abs().sum() > 0 for gate in router.gates)
    router.detach()
    # A SkipUNet2DModel built with adapters on the same backbone: the same bits.
    model = SkipUNet2DModel(**tiny_config, skips="adapter")
    shared_weights(stock, model)
    assert torch.equal(run(model, inputs), plain)


@pytest.mark.parametrize("options", ["", ":ratio=0.5", ":width=5"])
def test_adapter_parameters_are_counted_exactly(options, deep_config):
    keep = SkipUNet2DModel(**deep_config)
    model = SkipUNet2DModel(**deep_config, skips=f"adapter{options}")
    ratio, width = {"": (1.0, 0), ":ratio=0.5": (0.5, 0), ":width=5": (1.0, 5)}[options]
    expected = 0
    for info in keep.skip_router.skips:  # per skip: W1 (C x w) + b1 (w) + W2 (w x C) + b2 (C)
        channels = info.skip_channels
        hidden = width or max(1, round(ratio * channels))
        expected += 2 * channels * hidden + hidden + channels
    assert len({info.skip_channels for info in keep.skip_router.skips}) > 1  # several channel counts
    assert param_count(model) - param_count(keep) == param_count(model.skip_router) == expected


def test_apply_skip_spec_on_stock_unet(tiny_config, make_inputs):
    stock = UNet2DModel(**tiny_config).eval()
    inputs = make_inputs(tiny_config)
    keys_before = set(stock.state_dict())
    plain = run(stock, inputs)

    router = apply_skip_spec(stock, "none")
    zeroed = run(stock, inputs)
    assert not torch.allclose(zeroed, plain)
    # The same gates as a SkipUNet2DModel config give the same output.
    model = SkipUNet2DModel(**tiny_config, skips="none").eval()
    model.load_state_dict(stock.state_dict())
    assert torch.equal(run(model, inputs), zeroed)
    router.detach()
    assert torch.equal(run(stock, inputs), plain)
    assert set(stock.state_dict()) == keys_before

    with pytest.raises(ValueError, match="remove"):
        apply_skip_spec(stock, "remove")
    with pytest.raises(ValueError, match="remove"):
        apply_skip_spec(stock, "keep,remove,keep,keep")
    assert torch.equal(run(stock, inputs), plain)  # a refused spec leaves no hooks behind
    with pytest.raises(ValueError):
        apply_skip_spec(model, "none")  # a SkipUNet2DModel routes its skips through its config


# --------------------------------------------------------------------------------------------------
# Residual shortcuts inside the resnet blocks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting", [{"up": False}, {"down": False}, {"mid": False}, False], ids=["up", "down", "mid", "all"]
)
def test_residual_shortcut_switch(setting, tiny_config, make_inputs, tmp_path):
    parts = ("down", "mid", "up")
    disabled = [p for p in parts if setting is False or setting.get(p) is False]
    default = SkipUNet2DModel(**tiny_config)
    model = SkipUNet2DModel(**tiny_config, residual_shortcuts=setting)
    assert model.config.residual_shortcuts == {p: p not in disabled for p in parts}

    # The 1x1 conv_shortcut parameters disappear where they existed, nothing else.
    blocks = {"down": default.down_blocks, "mid": [default.mid_block], "up": default.up_blocks}
    vanished = sum(shortcut_params(r) for p in disabled for r in resnets(blocks[p]))
    if "up" in disabled:
        assert vanished > 0
    assert param_count(default) - param_count(model) == vanished

    # Same weights, shortcuts off: a different function, and still every parameter is trained.
    missing, _ = model.load_state_dict(
        {k: v for k, v in default.state_dict().items() if k in model.state_dict()}, strict=False
    )
    assert missing == []
    inputs = make_inputs(tiny_config)
    out = run(model, inputs)
    assert not torch.allclose(out, run(default, inputs))
    out.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []

    # A block without its shortcut outputs its residual branch alone: zero it and the block gives 0.
    part_blocks = {"down": model.down_blocks, "mid": [model.mid_block], "up": model.up_blocks}
    block = resnets(part_blocks[disabled[0]])[0]
    with torch.no_grad():
        block.conv2.weight.zero_(), block.conv2.bias.zero_()
        x = torch.randn(2, block.in_channels, 4, 4)
        temb = torch.randn(2, block.time_emb_proj.in_features)
        assert torch.equal(block(x, temb), torch.zeros(2, block.out_channels, 4, 4))

    model.eval()
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = SkipUNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.residual_shortcuts == model.config.residual_shortcuts
    assert param_count(loaded) == param_count(model)
    assert torch.equal(run(loaded, inputs), expected)


# --------------------------------------------------------------------------------------------------
# Skip geometry
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", ["tiny", "deep"])
def test_describe_skips_matches_the_tensors_of_a_forward(config_name, request, make_inputs, capsys):
    config = request.getfixturevalue(f"{config_name}_config")
    model = SkipUNet2DModel(**config).eval()
    rows = model.describe_skips()
    n_blocks = len(config["block_out_channels"])
    count = n_blocks * (config["layers_per_block"] + 1)
    assert len(rows) == model.num_skips == count
    assert [r["index"] for r in rows] == list(range(count))
    # Decoder order: receiving (up_block, layer) strictly increasing, resolution non-decreasing.
    receivers = [(r["up_block"], r["layer"]) for r in rows]
    assert receivers == sorted(receivers) and len(set(receivers)) == count
    resolutions = [r["resolution"] for r in rows]
    assert resolutions == sorted(resolutions)
    assert resolutions[0] == config["sample_size"] // 2 ** (n_blocks - 1)
    assert resolutions[-1] == config["sample_size"]
    assert rows[-1]["source"] == "conv_in" and rows[0]["source"] == (
        f"down_blocks.{n_blocks - 1}.resnets.{config['layers_per_block'] - 1}"  # the deepest resnet
    )
    assert all(r["gate"] == "keep" for r in rows)

    # Channels and sizes match what the forward actually passes.
    seen_sources, seen_inputs, handles = {}, {}, []
    for r in rows:
        source = model.get_submodule(r["source"])
        handles.append(
            source.register_forward_hook(lambda m, a, out, name=r["source"]: seen_sources.__setitem__(name, out.shape))
        )
        receiver = model.up_blocks[r["up_block"]].resnets[r["layer"]]
        handles.append(
            receiver.register_forward_pre_hook(lambda m, a, i=r["index"]: seen_inputs.__setitem__(i, a[0].shape))
        )
    run(model, make_inputs(config))
    for handle in handles:
        handle.remove()
    for r in rows:
        _, channels, height, _ = seen_sources[r["source"]]
        assert (channels, height) == (r["skip_channels"], r["resolution"]), r
        _, in_channels, in_height, _ = seen_inputs[r["index"]]
        assert (in_channels, in_height) == (r["main_channels"] + r["skip_channels"], r["resolution"]), r

    print(model.skip_table())
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + count  # header, rule, one line per skip
    for line, r in zip(table[2:], rows, strict=True):
        assert r["source"] in line and line.split()[0] == str(r["index"]) and line.rstrip().endswith("keep")


@pytest.mark.parametrize("old", ["gates", "router", "markov", "unet", "caching", "cache_options", "adapters"])
def test_the_old_skip_module_paths_warn_and_reach_the_new_modules(old, monkeypatch):
    import importlib
    import sys

    import skipdiff.skips

    monkeypatch.delitem(sys.modules, f"skipdiff.{old}", raising=False)  # import the shim afresh
    with pytest.warns(DeprecationWarning, match=f"skipdiff.{old} has moved to skipdiff.skips"):
        module = importlib.import_module(f"skipdiff.{old}")
    if old == "gates":  # five modules now: the names it held, re-exported
        assert module.SkipGate is skipdiff.skips.SkipGate and module.GATES is skipdiff.skips.GATES
        assert module.build_gate is skipdiff.skips.build_gate and module.PRESETS is skipdiff.skips.PRESETS
    else:
        assert module is importlib.import_module(f"skipdiff.skips.{old}")
