"""Gates, the registry, skip specifications and presets, and the router's stochastic gates."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from diffusers.utils.torch_utils import apply_freeu

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
from skipdiff.gates import build_gate

torch.set_num_threads(1)

INFO = SkipInfo(
    index=0, up_block=0, layer=0, source="conv_in", resolution=8, skip_channels=4, main_channels=6
)


def run(model, inputs):
    return model(*inputs).sample


def copy_backbone(source, target):
    """Copy every tensor of ``source`` whose name and shape ``target`` also has."""
    target_state = target.state_dict()
    target.load_state_dict(
        {
            k: v
            for k, v in source.state_dict().items()
            if k in target_state and target_state[k].shape == v.shape
        },
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
    text = (
        "keep,zero,scale:0.5,learned:init=0,fourier:backbone=1.2:skip=0.5,bernoulli:p=0.3,markov,keep,remove"
    )
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

    # In the forward pass, skip k reaches its resnet multiplied by its factor.
    keep = SkipUNet2DModel(**deep_config).eval()
    keep.load_state_dict(model.state_dict())
    for m in (model, keep):
        m.skip_router.record_norms = True
        run(m, make_inputs(deep_config))
    for k in range(count):
        scaled, kept = model.skip_router.norms[k][1], keep.skip_router.norms[k][1]
        assert float(scaled / kept) == pytest.approx(factors[k], rel=1e-5)
    assert torch.equal(model.skip_router.norms[0][0], keep.skip_router.norms[0][0])  # same mid-block output


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
