"""Gates, the registry, skip specifications and presets, and the router's stochastic gates."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import apply_freeu, fourier_filter

from skipdiff import (
    GATES,
    PRESETS,
    SkipGate,
    SkipInfo,
    SkipUNet2DModel,
    register_gate,
    register_preset,
    resolve_spec,
)
from skipdiff.diffusion import per_example_loss
from skipdiff.skips.router import batch_timesteps
from skipdiff.skips.spec import build_gate

torch.set_num_threads(1)

INFO = SkipInfo(index=0, up_block=0, layer=0, source="conv_in", resolution=8, skip_channels=4, main_channels=6)


def run(model, inputs):
    return model(*inputs).sample


def copy_backbone(source, target):
    """Copy every tensor of ``source`` whose name and shape ``target`` also has."""
    target_state = target.state_dict()
    target.load_state_dict(
        {k: v for k, v in source.state_dict().items() if k in target_state and target_state[k].shape == v.shape},
        strict=False,
    )


# --------------------------------------------------------------------------------------------------
# Gates on tensors
# --------------------------------------------------------------------------------------------------


def tensors(batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    main = torch.randn(batch, INFO.main_channels, 8, 8, generator=generator)
    skip = torch.randn(batch, INFO.skip_channels, 8, 8, generator=generator)
    return main, skip


def test_deterministic_gates_on_tensors():
    main, skip = tensors()
    for entry, expected_skip in [
        ({"mode": "keep"}, skip),
        ({"mode": "zero"}, torch.zeros_like(skip)),
        ({"mode": "remove"}, skip[:, :0]),
        ({"mode": "scale", "factor": 0.25}, skip * 0.25),
        ({"mode": "learned", "init": 0.5}, skip * 0.5),
        ({"mode": "learned_channel", "init": 2.0}, skip * 2.0),
    ]:
        out_main, out_skip = build_gate(entry, INFO)(main, skip)
        assert torch.equal(out_main, main), entry  # only fourier touches the backbone
        assert out_skip.shape == expected_skip.shape and torch.equal(out_skip, expected_skip), entry


def test_learned_channel_se_gives_a_per_example_per_channel_coefficient_in_0_1():
    gate = build_gate({"mode": "learned_channel", "form": "se", "reduction": 2}, INFO)
    main, skip = tensors()
    _, out = gate(main, skip)
    coefficient = out / skip  # (B, C, H, W), constant over H, W
    assert torch.allclose(coefficient, coefficient[:, :, :1, :1].expand_as(coefficient), atol=1e-5)
    assert ((coefficient > 0) & (coefficient < 1)).all()
    assert not torch.allclose(coefficient[0], coefficient[1])  # depends on the example


@pytest.mark.parametrize("resolution_idx", [0, 1])
def test_fourier_gate_equals_diffusers_apply_freeu(resolution_idx):
    main, skip = tensors()
    b, s = (1.3, 0.9) if resolution_idx == 0 else (1.4, 0.2)
    gate = build_gate({"mode": "fourier", "backbone": b, "skip": s}, INFO)
    out_main, out_skip = gate(main, skip)
    ref_main, ref_skip = apply_freeu(resolution_idx, main.clone(), skip, b1=1.3, s1=0.9, b2=1.4, s2=0.2)
    torch.testing.assert_close(out_main, ref_main, atol=0, rtol=0)
    torch.testing.assert_close(out_skip, ref_skip, atol=1e-6, rtol=0)
    # FreeU: the first half of the backbone channels is scaled, the skip's DC component is scaled.
    half = INFO.main_channels // 2
    torch.testing.assert_close(out_main[:, :half], main[:, :half] * b)
    assert torch.equal(out_main[:, half:], main[:, half:])
    torch.testing.assert_close(out_skip.mean(dim=(2, 3)), s * skip.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)


def test_stochastic_gate_multiplies_each_example_by_its_state():
    main, skip = tensors()
    for mode in ("bernoulli", "markov"):
        gate = build_gate({"mode": mode}, INFO)
        state = torch.tensor([1.0, 0.0, 0.5])
        _, out = gate(main, skip, state)
        assert torch.equal(out, skip * state[:, None, None, None])
        with pytest.raises(RuntimeError):
            gate(main, skip, None)


def freeu2_backbone(h: torch.Tensor, b: float) -> torch.Tensor:
    """FreeU v2's backbone factor written out from the formula in the FreeU README: the mean over
    channels, min-max normalised over each example's positions, gives (b - 1) * m + 1 on the first
    half of the channels."""
    m = h.mean(dim=1)  # (B, H, W)
    low = m.flatten(1).min(dim=1).values[:, None, None]
    high = m.flatten(1).max(dim=1).values[:, None, None]
    normalized = (m - low) / (high - low)
    out = h.clone()
    half = h.shape[1] // 2
    out[:, :half] = h[:, :half] * ((b - 1) * normalized + 1)[:, None]
    return out


@pytest.mark.parametrize("b", [1.5, 0.7])
def test_freeu2_backbone_factor_equals_the_published_formula(b):
    main, skip = tensors()
    gate = build_gate({"mode": "fourier", "backbone": b, "skip": 0.9, "structure": True}, INFO)
    out_main, out_skip = gate(main, skip)
    assert torch.equal(out_main, freeu2_backbone(main, b))
    # Structure-aware: per example and position the factor runs from 1 (weakest mean activation) to b
    # (strongest), while v1 multiplies every position by b; the other half of the channels is untouched.
    factor = out_main[:, :3] / main[:, :3]  # (B, 3, H, W), equal over the channels
    mean = main.mean(dim=1).flatten(1)
    for example in range(main.shape[0]):
        flat = factor[example, 0].flatten()
        assert flat[mean[example].argmax()] == pytest.approx(b, abs=1e-5)
        assert flat[mean[example].argmin()] == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(out_main[:, 3:], main[:, 3:])
    v1_main, v1_skip = build_gate({"mode": "fourier", "backbone": b, "skip": 0.9}, INFO)(main, skip)
    assert not torch.allclose(out_main, v1_main)
    assert torch.equal(out_skip, v1_skip)  # the skip is filtered as in v1
    torch.testing.assert_close(out_skip, fourier_filter(skip, threshold=1, scale=0.9), atol=1e-5, rtol=1e-5)


def test_freeu2_on_a_constant_map_is_v1_with_finite_gradients():
    info = SkipInfo(index=0, up_block=0, layer=0, source="conv_in", resolution=1, skip_channels=4, main_channels=6)
    main = torch.randn(2, 6, 1, 1, requires_grad=True)  # 1 x 1: max == min, the formula's 0 / 0
    out, _ = build_gate({"mode": "fourier", "backbone": 1.5, "structure": True}, info)(main, torch.randn(2, 4, 1, 1))
    assert torch.equal(out[:, :3], main[:, :3] * 1.5) and torch.equal(out[:, 3:], main[:, 3:])
    out.sum().backward()
    assert torch.isfinite(main.grad).all()


WINDOWED = [
    {"mode": "zero"},
    {"mode": "scale", "factor": 0.5},
    {"mode": "learned", "init": 0.5},
    {"mode": "learned_channel", "init": 2.0},
    {"mode": "fourier", "backbone": 1.3, "skip": 0.4, "structure": True},
    {"mode": "adapter", "zero_init": False},
    {"mode": "ramp", "low": 2.0, "high": 0.5},
]


@pytest.mark.parametrize("entry", WINDOWED, ids=[e["mode"] for e in WINDOWED])
def test_timestep_window_acts_inside_and_leaves_the_rest_bit_identical(entry):
    main, skip = tensors(batch=4)
    timesteps = torch.tensor([100, 500, 799, 800])  # [t_min, t_max) = [500, 800) holds examples 1 and 2
    windowed = build_gate({**entry, "t_min": 500, "t_max": 800}, INFO)
    plain = build_gate(entry, INFO)
    plain.load_state_dict(windowed.state_dict())
    assert windowed.needs_timestep and (plain.needs_timestep == (entry["mode"] == "ramp"))
    out, ref = windowed(main, skip, None, timesteps), plain(main, skip, None, timesteps)
    inside, outside = [1, 2], [0, 3]
    for got, expected, original in zip(out, ref, (main, skip), strict=True):
        assert torch.equal(got[inside], expected[inside])
        assert torch.equal(got[outside], original[outside])
    assert not torch.equal(out[1][inside], skip[inside])  # the gate does act inside
    with pytest.raises(RuntimeError, match="timesteps"):
        windowed(main, skip)


def test_ramp_factor_is_linear_in_t_between_its_anchors():
    entry = {"mode": "ramp", "low": 1.0, "high": 0.5, "t_low": 100, "t_high": 900}
    timesteps = torch.tensor([0, 100, 300, 500, 900, 999])
    expected = torch.tensor([1.0, 1.0, 0.875, 0.75, 0.5, 0.5])  # clamped outside [t_low, t_high]
    main, skip = tensors(batch=6)
    for gate in (build_gate(entry, INFO), build_gate({**entry, "learned": True}, INFO)):
        assert torch.equal(gate.factor(timesteps), expected)
        out_main, out_skip = gate(main, skip, None, timesteps)
        assert torch.equal(out_main, main) and torch.equal(out_skip, skip * expected[:, None, None, None])
    # Learned: two scalars, the factors at t_low and at t_high, each with its share of the gradient.
    assert [p.numel() for p in gate.parameters()] == [2]
    out_skip.sum().backward()
    fraction = torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 1.0])
    per_example = skip.sum(dim=(1, 2, 3))
    expected_grad = torch.stack([((1 - fraction) * per_example).sum(), (fraction * per_example).sum()])
    torch.testing.assert_close(gate.factors.grad, expected_grad)


def test_adapter_is_a_zero_initialised_residual_bottleneck():
    main, skip = tensors()
    gate = build_gate({"mode": "adapter", "width": 3}, INFO)
    out_main, out_skip = gate(main, skip)
    assert torch.equal(out_main, main) and torch.equal(out_skip, skip)  # freshly attached: the identity
    channels, width = INFO.skip_channels, 3
    assert sum(p.numel() for p in gate.parameters()) == 2 * channels * width + width + channels
    # With trained weights: skip + W2 GELU(W1 skip + b1) + b2, 1x1 convolutions over the skip's channels.
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    w1, b1 = gate.down.weight[:, :, 0, 0], gate.down.bias
    w2, b2 = gate.up.weight[:, :, 0, 0], gate.up.bias
    hidden = torch.einsum("wc,bchv->bwhv", w1, skip) + b1[None, :, None, None]
    expected = skip + torch.einsum("cw,bwhv->bchv", w2, torch.nn.functional.gelu(hidden)) + b2[None, :, None, None]
    torch.testing.assert_close(gate(main, skip)[1], expected, atol=1e-5, rtol=1e-5)
    # The width: given, or the ratio times the skip's channels (at least 1).
    assert [build_gate({"mode": "adapter", **o}, INFO).width for o in ({}, {"ratio": 0.5}, {"ratio": 0.01})] == [
        4,
        2,
        1,
    ]


def test_batch_timesteps_broadcasts_one_timestep_and_refuses_a_wrong_count():
    expected = torch.tensor([7, 7, 7])
    for timestep in (7, torch.tensor(7), torch.tensor([7])):
        assert torch.equal(batch_timesteps(timestep, 3, torch.device("cpu")), expected)
    per_example = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(batch_timesteps(per_example, 3, torch.device("cpu")), per_example)
    with pytest.raises(ValueError, match="2 values for a batch of 3"):
        batch_timesteps(torch.tensor([1, 2]), 3, torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="'keep'"):
        register_gate("keep")(type("AnotherKeep", (SkipGate,), {}))
    with pytest.raises(ValueError, match="'full'"):
        register_preset("full")(lambda skips: [{"mode": "keep"} for _ in skips])
    assert GATES["keep"].__name__ == "KeepGate"


def test_a_registered_gate_is_usable_by_name(tiny_config, make_inputs):
    @register_gate("negate-for-test")
    class NegateGate(SkipGate):
        def gate_skip(self, skip, state):
            return -skip

    try:
        model = SkipUNet2DModel(**tiny_config, skips="negate-for-test").eval()
        zero = SkipUNet2DModel(**tiny_config, skips="zero").eval()
        zero.load_state_dict(model.state_dict())
        assert model.config.skips == [{"mode": "negate-for-test"}] * model.num_skips
        assert not torch.allclose(run(model, make_inputs(tiny_config)), run(zero, make_inputs(tiny_config)))
    finally:
        del GATES["negate-for-test"]


# --------------------------------------------------------------------------------------------------
# Specifications
# --------------------------------------------------------------------------------------------------

NAN_LIST = [{"mode": "scale", "factor": float("nan")}] * 4

INVALID_SPECS = [
    ("keeep", "keeep"),  # unknown mode
    ("keep,zero", "2 entries"),  # wrong length (the tiny UNet has 4 skips)
    (["keep"] * 5, "5 entries"),
    ("scale:-0.5", "-0.5"),  # negative scale
    ("keep,zero,scale:-1,keep", "-1"),
    ("scale:nan", "nan"),  # NaN scale
    (NAN_LIST, "nan"),
    ("scalelng", "scalelng"),  # preset typo
    ("scalelng:kappa=0.5", "scalelng"),
    ("scale:fctor=0.5", "fctor"),  # unknown option key of a mode
    ("scalelong:kapa=0.5", "kapa"),  # unknown option key of a preset
    ("freeu:b3=1.2", "b3"),
    ("none:foo=1", "foo"),  # a one-mode preset passes its options to the gate, which refuses this one
    ("scalelong:kappa=1.5", "1.5"),
    ("bernoulli:p=1.5", "1.5"),
    (["learned:init=inf"] * 4, "inf"),
    ("learned_channel:form=conv", "conv"),
    ([{"factor": 0.5}] * 4, "factor"),  # an entry without a mode
    ("scale:0.5:t_min=800:t_max=100", "t_min=800"),  # an empty timestep window
    ("scale:0.5:t_max=-1", "-1"),
    ("learned:t_min=nan", "nan"),
    ("keep:t_min=500", "t_min"),  # nothing to switch
    ("bernoulli:p=0.5:t_max=500", "t_max"),  # stochastic gates take no window
    ("remove:t_min=1", "t_min"),
    ("markov:t_min=500", "markov"),  # nor does a preset of them
    ("stochastic-depth:t_max=500", "bernoulli"),
    ("ramp:t_low=900:t_high=100", "900"),
    ("ramp:low=-1", "-1"),  # a fixed factor is a scale (a learned one may start anywhere)
    ("adapter:width=-2", "-2"),
    ("adapter:width=1.5", "1.5"),
    ("fourier:structure=maybe", "maybe"),
    ("linear:inner=nan", "nan"),
    ("linear:deepest=0.5", "deepest"),
    ("freeu2:structure=false", "structure"),  # freeu2 is the structure-aware preset
]


@pytest.mark.parametrize("spec, bad", INVALID_SPECS, ids=[str(s)[:40] for s, _ in INVALID_SPECS])
def test_invalid_spec_raises_value_error_naming_the_bad_value(spec, bad, tiny_config):
    with pytest.raises(ValueError, match=re.escape(bad)):
        SkipUNet2DModel(**tiny_config, skips=spec)


@pytest.mark.parametrize("markov, bad", [({"p_inti": 0.5}, "p_inti"), ({"p_init": 1.5}, "1.5")])
def test_invalid_markov_options_raise_value_error(markov, bad, tiny_config):
    with pytest.raises(ValueError, match=re.escape(bad)):
        SkipUNet2DModel(**tiny_config, skips="markov", markov=markov)


def test_per_skip_spec_string_and_list_agree(deep_config):
    skips = SkipUNet2DModel(**deep_config).skip_router.skips
    text = "keep,zero,scale:0.5,learned:init=0,fourier:backbone=1.2:skip=0.5,bernoulli:p=0.3,markov,keep,remove"
    resolved = resolve_spec(text, skips)
    assert resolved == resolve_spec(text.split(","), skips)
    assert resolved[2] == {"mode": "scale", "factor": 0.5}
    assert resolved[4] == {"mode": "fourier", "backbone": 1.2, "skip": 0.5}
    # A mode that is also a preset name takes the mode's options for every skip.
    for entry in ("learned:init=0.5", "markov:rescale=true", "scale:0.25"):
        assert resolve_spec(entry, skips) == resolve_spec([entry] * len(skips), skips), entry


@pytest.mark.parametrize("spec", sorted(PRESETS) + sorted(GATES))
def test_resolved_spec_resolves_to_itself(spec, deep_config):
    # from_pretrained feeds the stored (resolved) spec back through resolve_spec.
    skips = SkipUNet2DModel(**deep_config).skip_router.skips
    resolved = resolve_spec(spec, skips)
    assert len(resolved) == len(skips)
    assert resolve_spec(resolved, skips) == resolved


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, kappa", [("scalelong", 0.7), ("scalelong:kappa=0.5", 0.5)])
def test_scalelong_scales_skip_k_by_kappa_to_the_k_minus_1_minus_k(spec, kappa, deep_config, make_inputs):
    model = SkipUNet2DModel(**deep_config, skips=spec).eval()
    count = model.num_skips
    assert [e["mode"] for e in model.config.skips] == ["scale"] * count
    factors = [e["factor"] for e in model.config.skips]
    assert factors == pytest.approx([kappa ** (count - 1 - k) for k in range(count)])
    assert factors[-1] == 1.0 and factors[0] == min(factors)  # innermost scaled most, outermost by 1
    assert all(a < b for a, b in itertools.pairwise(factors))

    assert_forward_scales_skips(model, factors, deep_config, make_inputs)


def assert_forward_scales_skips(model, factors, deep_config, make_inputs):
    """In the forward pass, skip k reaches its resnet multiplied by ``factors[k]``, measured against the
    same weights with every skip kept (the mid-block output, before any skip, is identical)."""
    model.eval()
    keep = SkipUNet2DModel(**deep_config).eval()
    keep.load_state_dict(model.state_dict())
    for m in (model, keep):
        m.skip_router.record_norms = True
        run(m, make_inputs(deep_config))
    for k, factor in enumerate(factors):
        ratio = model.skip_router.norms[k][1] / keep.skip_router.norms[k][1]
        assert float(ratio) == pytest.approx(factor, rel=1e-5), k
    assert torch.equal(model.skip_router.norms[0][0], keep.skip_router.norms[0][0])


def test_freeu_preset_acts_on_the_first_two_up_blocks(deep_config):
    skips = SkipUNet2DModel(**deep_config).skip_router.skips
    resolved = resolve_spec("freeu:b1=1.1:b2=1.2:s1=0.5:s2=0.6", skips)
    for info, entry in zip(skips, resolved, strict=True):
        expected = {
            0: {"mode": "fourier", "backbone": 1.1, "skip": 0.5},
            1: {"mode": "fourier", "backbone": 1.2, "skip": 0.6},
        }.get(info.up_block, {"mode": "keep"})
        assert entry == expected, info


def test_outer_and_inner_only_keep_one_resolution(deep_config):
    skips = SkipUNet2DModel(**deep_config).skip_router.skips
    resolutions = [s.resolution for s in skips]
    for preset, level in (("outer-only", max(resolutions)), ("inner-only", min(resolutions))):
        modes = [e["mode"] for e in resolve_spec(preset, skips)]
        assert modes == ["keep" if r == level else "zero" for r in resolutions]
        assert 0 < modes.count("keep") < len(skips)


@pytest.mark.parametrize("outer, inner", [(1.0, 0.5), (0.25, 1.0)])
def test_linear_profile_scales_skip_k_linearly_in_depth(outer, inner, deep_config, make_inputs):
    model = SkipUNet2DModel(**deep_config, skips=f"linear:outer={outer}:inner={inner}").eval()
    count = model.num_skips
    assert [e["mode"] for e in model.config.skips] == ["scale"] * count
    factors = [e["factor"] for e in model.config.skips]
    # Exact: inner at the innermost skip (0), outer at the outermost (K-1), equal steps between.
    assert factors == [inner + (outer - inner) * k / (count - 1) for k in range(count)]
    assert factors[0] == inner and factors[-1] == outer
    steps = [b - a for a, b in itertools.pairwise(factors)]
    assert steps == pytest.approx([(outer - inner) / (count - 1)] * (count - 1), abs=1e-12)
    assert_forward_scales_skips(model, factors, deep_config, make_inputs)


def test_freeu2_preset_is_freeu_with_the_structure_aware_factor(deep_config):
    skips = SkipUNet2DModel(**deep_config).skip_router.skips
    options = "b1=1.1:b2=1.2:s1=0.5:s2=0.6"
    v1, v2 = resolve_spec(f"freeu:{options}", skips), resolve_spec(f"freeu2:{options}", skips)
    assert resolve_spec(f"freeu:{options}:structure=true", skips) == v2
    for entry_v1, entry_v2 in zip(v1, v2, strict=True):
        expected = {**entry_v1, "structure": True} if entry_v1["mode"] == "fourier" else entry_v1
        assert entry_v2 == expected
    assert sum(e["mode"] == "fourier" for e in v2) == 6  # the first two up blocks' skips


def test_a_preset_window_goes_on_every_entry_that_acts(deep_config):
    skips = SkipUNet2DModel(**deep_config).skip_router.skips
    freeu = resolve_spec("freeu2:t_min=500", skips)
    assert [e for e in freeu if e["mode"] == "keep"] == [{"mode": "keep"}] * 3  # keep stays keep
    assert freeu == [e if e["mode"] == "keep" else {**e, "t_min": 500} for e in resolve_spec("freeu2", skips)]
    linear = resolve_spec("linear:inner=0.5:t_min=100:t_max=300", skips)
    assert linear == [{**e, "t_min": 100, "t_max": 300} for e in resolve_spec("linear:inner=0.5", skips)]
    # One mode for all, a one-mode preset and an entry list say the same thing.
    expected = [{"mode": "zero", "t_min": 500}] * len(skips)
    assert resolve_spec("zero:t_min=500", skips) == resolve_spec("none:t_min=500", skips) == expected
    assert resolve_spec(["zero:t_min=500"] * len(skips), skips) == expected


@pytest.mark.parametrize("form", ["per-example", "0-d tensor", "one-element tensor", "int", "keywords"])
def test_router_hands_each_forward_timesteps_to_the_gates_that_need_them(form, tiny_config, make_inputs):
    model = SkipUNet2DModel(**tiny_config, skips=["keep", "ramp", "scale:0.5:t_min=500", "zero"]).eval()
    sample, _ = make_inputs(tiny_config, batch=3)
    timestep = {
        "per-example": torch.tensor([600, 600, 600]),
        "0-d tensor": torch.tensor(600),
        "one-element tensor": torch.tensor([600]),
        "int": 600,
        "keywords": torch.tensor(600),
    }[form]
    if form == "keywords":
        out = model(sample=sample, timestep=timestep).sample
    else:
        out = model(sample, timestep).sample
    assert torch.equal(model.skip_router.timesteps, torch.tensor([600, 600, 600]))
    # The same output as giving every example its own copy of the timestep.
    assert torch.equal(out, model(sample, torch.tensor([600, 600, 600])).sample)
    # Another forward, other timesteps: the window now closes for the examples below t_min.
    model(sample, torch.tensor([100, 600, 900]))
    assert torch.equal(model.skip_router.timesteps, torch.tensor([100, 600, 900]))


def test_gates_that_need_no_timestep_leave_the_router_without_one(tiny_config, make_inputs):
    model = SkipUNet2DModel(**tiny_config, skips=["keep", "zero", "scale:0.5", "learned"])
    run(model, make_inputs(tiny_config))
    assert model.skip_router.timesteps is None
    assert not any(g.needs_timestep for g in model.skip_router.gates)


# --------------------------------------------------------------------------------------------------
# Learned gates
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [["learned:init=0"] * 4, ["learned_channel:init=0"] * 4, "rezero"],
    ids=["scalar", "channel", "rezero"],
)
def test_zero_initialised_learned_gates_close_the_skip_and_still_learn(spec, tiny_config, make_inputs):
    model = SkipUNet2DModel(**tiny_config, skips=spec)
    inputs = make_inputs(tiny_config)
    # At init the skip is closed: the output equals the all-zero-skip model with the same weights.
    zero = SkipUNet2DModel(**tiny_config, skips="none")
    copy_backbone(model, zero)
    out = run(model, inputs)
    torch.testing.assert_close(out, run(zero, inputs), atol=1e-6, rtol=0)
    # ... yet every gate parameter (every skip, every channel) gets a non-zero gradient.
    out.sum().backward()
    gate_params = list(model.skip_router.named_parameters())
    assert len(gate_params) == model.num_skips
    for name, p in gate_params:
        assert p.grad is not None and (p.grad != 0).all(), name


TIMESTEP_LEARNED = [
    "ramp:low=1:high=0.5:learned=true",
    "learned:init=1:t_min=500",
    "adapter:t_max=500",
    "learned_channel:t_max=300",
]


def test_training_timestep_dependent_learned_gates_changes_their_parameters(tiny_config):
    # Nothing in the loop knows about timestep gates: the router reads the timestep from the forward.
    model = SkipUNet2DModel(**tiny_config, skips=TIMESTEP_LEARNED).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.skip_router.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([100, 400, 600, 900])  # inside and outside every window
    for _ in range(3):
        images = torch.randn(4, 3, 8, 8, generator=generator)
        noise = torch.randn(4, 3, 8, 8, generator=generator)
        loss = per_example_loss(model, scheduler, images, noise, timesteps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Every gate parameter moved, the adapter's first conv too once its zero-initialised second had.
    moved = [name for name, p in model.skip_router.named_parameters() if not torch.equal(p, before[name])]
    assert moved == list(before)

    # A windowed gate learns from the examples inside its window only.
    model.zero_grad()
    images, noise = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    per_example_loss(model, scheduler, images, noise, torch.tensor([10, 100, 200, 499])).mean().backward()
    gates = model.skip_router.gates
    assert float(gates[1].alpha.grad) == 0.0  # t_min=500: no example inside
    assert (gates[0].factors.grad != 0).all() and (gates[3].weight.grad != 0).any()


# --------------------------------------------------------------------------------------------------
# Stochastic gates through the router
# --------------------------------------------------------------------------------------------------

STOCHASTIC = {
    "bernoulli": dict(skips=["bernoulli:p=0.5"] * 4),
    "markov": dict(skips="markov", markov={"p_init": 0.5}),
}
# A chain whose marginals differ per skip and whose most likely path mixes open and closed skips:
# rows are [P(open | previous closed), P(open | previous open)] (row 0: P(open) of skip 0).
OPEN_PROB = torch.tensor([[0.7, 0.7], [0.8, 0.1], [0.9, 0.2], [0.3, 0.6]])


def stochastic_model(kind: str, config: dict) -> SkipUNet2DModel:
    model = SkipUNet2DModel(**config, **STOCHASTIC[kind])
    if kind == "markov":
        model.skip_router.chain.open_prob.copy_(OPEN_PROB)
    return model


def states_of(model) -> dict[int, torch.Tensor]:
    return {k: v.clone() for k, v in model.skip_router.states.items()}


@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
def test_training_forward_depends_on_the_global_seed_only(kind, tiny_config, make_inputs):
    model = stochastic_model(kind, tiny_config).train()
    inputs = make_inputs(tiny_config, batch=4)

    def forward(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return run(model, inputs), states_of(model)

    (a, states_a), (b, states_b), (c, states_c) = forward(10), forward(10), forward(11)
    assert torch.equal(a, b) and all(torch.equal(states_a[k], states_b[k]) for k in states_a)
    assert not torch.allclose(a, c)
    assert sorted(states_a) == list(range(model.num_skips))
    values = torch.cat([*states_a.values(), *states_c.values()])
    assert set(values.tolist()) == {0.0, 1.0}  # per-example 0/1 states, both occurring

    # Control: without stochastic gates a training forward does not depend on the seed.
    keep = SkipUNet2DModel(**tiny_config).train()
    torch.manual_seed(10)
    first = run(keep, inputs)
    torch.manual_seed(11)
    assert torch.equal(run(keep, inputs), first)


def chain_marginals(open_prob: torch.Tensor) -> list[float]:
    p = [float(open_prob[0, 1])]
    for k in range(1, len(open_prob)):
        p.append((1 - p[-1]) * float(open_prob[k, 0]) + p[-1] * float(open_prob[k, 1]))
    return p


@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
def test_expected_inference_is_deterministic_and_uses_keep_probabilities(kind, tiny_config, make_inputs):
    model = stochastic_model(kind, tiny_config).eval()
    router = model.skip_router
    assert router.inference == "expected"  # the default at inference
    router.set_inference("expected")
    inputs = make_inputs(tiny_config, batch=4)
    torch.manual_seed(1)
    a = run(model, inputs)
    torch.manual_seed(2)
    assert torch.equal(run(model, inputs), a)

    keep = [0.5] * 4 if kind == "bernoulli" else chain_marginals(OPEN_PROB)
    assert router.keep_probabilities() == pytest.approx(keep, abs=1e-6)
    # Expected mode = every skip scaled by its keep probability.
    scaled = SkipUNet2DModel(**tiny_config, skips=[{"mode": "scale", "factor": p} for p in keep]).eval()
    copy_backbone(model, scaled)
    torch.testing.assert_close(a, run(scaled, inputs), atol=1e-5, rtol=1e-5)

    # ... which is the mean of the training-mode states.
    router.train()
    states = router.sample_states(20000, torch.device("cpu"))
    means = [float(states[k].mean()) for k in range(4)]
    assert means == pytest.approx(keep, abs=0.02)


@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
def test_sample_inference_is_reproducible_from_its_seed(kind, tiny_config, make_inputs):
    model = stochastic_model(kind, tiny_config).eval()
    router = model.skip_router
    inputs = make_inputs(tiny_config, batch=4)
    router.set_inference("sample", seed=3)
    a, states = run(model, inputs), states_of(model)
    torch.manual_seed(12345)  # the global RNG plays no part
    router.set_inference("sample", seed=3)
    assert torch.equal(run(model, inputs), a)
    assert set(torch.cat(list(states.values())).tolist()) <= {0.0, 1.0}
    router.set_inference("sample", seed=4)
    assert not torch.allclose(run(model, inputs), a)
    with pytest.raises(ValueError, match="bogus"):
        router.set_inference("bogus")


def most_likely_path(open_prob: torch.Tensor) -> list[int]:
    def probability(path):
        p = float(open_prob[0, 1]) if path[0] else 1 - float(open_prob[0, 1])
        for k in range(1, len(path)):
            q = float(open_prob[k, path[k - 1]])
            p *= q if path[k] else 1 - q
        return p

    return list(max(itertools.product((0, 1), repeat=len(open_prob)), key=probability))


@pytest.mark.parametrize("kind", ["bernoulli", "markov"])
def test_map_inference_gives_0_1_gates(kind, tiny_config, make_inputs):
    if kind == "bernoulli":
        model = SkipUNet2DModel(**tiny_config, skips=["bernoulli:p=0.7", "bernoulli:p=0.3"] * 2)
        expected = [1, 0, 1, 0]
    else:
        model = stochastic_model("markov", tiny_config)
        expected = most_likely_path(OPEN_PROB)
        assert 0 < sum(expected) < 4  # a path that mixes open and closed skips
    model.eval()
    model.skip_router.set_inference("map")
    inputs = make_inputs(tiny_config, batch=3)
    out = run(model, inputs)
    states = states_of(model)
    for k, state in enumerate(expected):
        assert torch.equal(states[k], torch.full((3,), float(state))), (k, states[k])
    # The same as the deterministic keep/zero model the router recommends.
    recommended = model.skip_router.recommended_spec()
    assert [e["mode"] for e in recommended] == ["keep" if s else "zero" for s in expected]
    fixed = SkipUNet2DModel(**tiny_config, skips=recommended).eval()
    copy_backbone(model, fixed)
    torch.testing.assert_close(out, run(fixed, inputs), atol=1e-6, rtol=0)


def test_rescale_makes_the_expected_skip_the_kept_skip(tiny_config, make_inputs):
    model = SkipUNet2DModel(**tiny_config, skips=["bernoulli:p=0.25:rescale=true"] * 4).eval()
    keep = SkipUNet2DModel(**tiny_config).eval()
    copy_backbone(model, keep)
    inputs = make_inputs(tiny_config)
    torch.testing.assert_close(run(model, inputs), run(keep, inputs), atol=1e-5, rtol=1e-5)
    model.train()
    states = model.skip_router.sample_states(1000, torch.device("cpu"))
    assert set(states[0].tolist()) == {0.0, 1 / 0.25}
    assert float(states[0].mean()) == pytest.approx(1.0, abs=0.2)  # E[state] = 1


def test_recording_norms_leaves_a_kept_skip_untouched(deep_config, make_inputs):
    # On a logging step an identity gate's hook only measures: the UNet's output is bit-identical, and every
    # skip's (backbone, skip) norms are the norms of the two halves of the resnet's input.
    model = SkipUNet2DModel(**deep_config).eval()
    inputs = make_inputs(deep_config)
    plain = run(model, inputs)
    model.skip_router.record_norms = True
    seen = {}
    handles = [
        model.up_blocks[info.up_block]
        .resnets[info.layer]
        .register_forward_pre_hook(
            lambda module, args, index=info.index: seen.__setitem__(index, args[0].detach().clone())
        )
        for info in model.skip_router.skips
    ]
    recorded = run(model, inputs)
    for handle in handles:
        handle.remove()
    assert torch.equal(plain, recorded)
    assert sorted(model.skip_router.norms) == sorted(seen) and len(seen) == len(model.skip_router.skips)
    for info in model.skip_router.skips:
        split = info.main_channels
        backbone, skip = model.skip_router.norms[info.index]
        assert torch.equal(backbone, seen[info.index][:, :split].float().norm())
        assert torch.equal(skip, seen[info.index][:, split:].float().norm())
