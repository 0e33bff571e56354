"""Tests for skipdiff.classifiers: tiny configs, properties rather than snapshots."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

from skipdiff.classifiers import (
    ResidualMLPConfig,
    ResidualMLPForClassification,
    SkipResNetConfig,
    SkipResNetForImageClassification,
    first_last_grad_ratio,
    reference_resnet,
    unit_of,
)
from skipdiff.gradients import grad_norms_by_block
from skipdiff.skips.markov import MarkovChain

torch.set_num_threads(1)

SWITCHES = [(skip, bn) for skip in (True, False) for bn in (True, False)]
SWITCH_IDS = [f"skip={skip}-bn={bn}" for skip, bn in SWITCHES]


def tiny_resnet(skip=True, bn=True, widths=(4, 8), depth=1, hidden=6, **kwargs) -> SkipResNetForImageClassification:
    config = SkipResNetConfig(
        num_channels=1,
        widths=widths,
        depth=depth,
        hidden_size=hidden,
        num_labels=3,
        skip_connections=skip,
        batch_norm=bn,
        **kwargs,
    )
    return SkipResNetForImageClassification(config)


def tiny_mlp(skip=True, bn=True, depth=2, **kwargs) -> ResidualMLPForClassification:
    config = ResidualMLPConfig(
        num_features=5, width=8, depth=depth, num_labels=3, skip_connections=skip, batch_norm=bn, **kwargs
    )
    return ResidualMLPForClassification(config)


def images(batch=4, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, generator=generator), torch.randint(0, 3, (batch,), generator=generator)


def rows(batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, generator=generator), torch.randint(0, 3, (batch,), generator=generator)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip, bn", SWITCHES, ids=SWITCH_IDS)
def test_resnet_shapes(skip, bn):
    model = tiny_resnet(skip, bn, widths=(4, 8, 8))
    x, y = images(size=8)
    out = model(x, labels=y, output_hidden_states=True)
    assert out.logits.shape == (4, 3)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # stem at 8x8, then one block per stage at 8x8, 4x4, 2x2
    assert [tuple(h.shape) for h in out.hidden_states] == [
        (4, 4, 8, 8),
        (4, 4, 8, 8),
        (4, 8, 4, 4),
        (4, 8, 2, 2),
    ]
    assert model.features(x).shape == (4, 6)  # (B, hidden_size): the input of the last FC layer
    assert model(x).loss is None
    logits, *_ = model(x, return_dict=False)
    assert logits.shape == (4, 3)


@pytest.mark.parametrize("skip, bn", SWITCHES, ids=SWITCH_IDS)
def test_mlp_shapes(skip, bn):
    model = tiny_mlp(skip, bn, depth=3)
    x, y = rows()
    out = model(x, labels=y, output_hidden_states=True)
    assert out.logits.shape == (4, 3)
    assert torch.isfinite(out.loss)
    assert len(out.hidden_states) == 1 + 3
    assert model.features(x).shape == (4, 8)


def test_features_are_the_input_of_the_last_layer():
    model = tiny_resnet().eval()
    x, _ = images()
    assert torch.allclose(model.classifier(model.features(x)), model(x).logits)


# ---- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip, bn", SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("kind", ["resnet", "mlp"])
def test_every_parameter_receives_a_gradient(kind, skip, bn):
    torch.manual_seed(0)
    model = tiny_resnet(skip, bn, widths=(4, 8, 8)) if kind == "resnet" else tiny_mlp(skip, bn)
    x, y = images(batch=8) if kind == "resnet" else rows(batch=8)
    model(x, labels=y).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_grad_norms_by_block_order_and_errors():
    # The classifiers' grouping (unit_of) for the one gradient-norm helper of the training telemetry.
    model = tiny_resnet(widths=(4, 8), depth=2)
    x, y = images()
    with pytest.raises(ValueError, match="backward"):
        first_last_grad_ratio(model)
    model(x, labels=y).loss.backward()
    norms = grad_norms_by_block(model, unit_of(model))
    assert list(norms) == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head", "classifier"]
    assert all(value > 0 for value in norms.values())
    assert first_last_grad_ratio(model) == pytest.approx(norms["blocks.0"] / norms["blocks.3"])
    # each unit's norm is the norm of exactly its own parameters' gradients
    expected = torch.cat([p.grad.flatten() for p in model.blocks[2].parameters()]).norm()
    assert norms["blocks.2"] == pytest.approx(float(expected), rel=1e-6)

    reference = reference_resnet(num_labels=3, num_channels=1, widths=(4, 8), depth=2)
    reference(pixel_values=x, labels=y).loss.backward()
    reference_norms = grad_norms_by_block(reference, unit_of(reference))
    assert list(reference_norms) == ["stem", *[f"blocks.{k}" for k in range(4)], "classifier"]

    with pytest.raises(ValueError, match="Linear"):
        unit_of(torch.nn.Linear(2, 2))


def mean_log_ratio(skip: bool, depth: int) -> float:
    """log(first / last block gradient norm) at init, averaged over 4 seeds x 2 batches."""
    logs = []
    for seed in range(4):
        torch.manual_seed(seed)
        # hidden=32: a handful of FC units can all be dead at init, which stops every gradient
        model = tiny_resnet(skip, bn=False, widths=(4, 8), depth=depth, hidden=32)
        for batch in range(2):
            x, y = images(batch=16, seed=100 * seed + batch)
            model.zero_grad()
            model(x, labels=y).loss.backward()
            logs.append(math.log(first_last_grad_ratio(model)))
    return sum(logs) / len(logs)


def test_deep_plain_nets_without_bn_lose_gradient_towards_the_input():
    # 20 blocks (2 stages x 10) against 2 (2 x 1), BatchNorm off, He init. Over 40 seeds (2 batches
    # each) the mean log ratio is -4.9 (sd 1.3) for the deep plain net, -0.7 (sd 0.7) for the deep
    # skip net and -0.7 (sd 0.3) for the shallow plain net: averaged over 4 seeds, a margin of log(4)
    # leaves more than 3 standard errors to spare whatever the seeds.
    plain_deep = mean_log_ratio(skip=False, depth=10)
    skip_deep = mean_log_ratio(skip=True, depth=10)
    plain_shallow = mean_log_ratio(skip=False, depth=1)
    assert plain_deep < skip_deep - math.log(4)
    assert plain_deep < plain_shallow - math.log(4)


# ---- parameter counts -----------------------------------------------------------------------------


def expected_resnet_params(num_channels, widths, depth, hidden, labels, skip, bn) -> int:
    """Count by hand: convs have a bias only without BN; a BN has 2 parameters per channel."""

    def conv(cin, cout, k):
        return cin * cout * k * k + (0 if bn else cout)

    def norm(c):
        return 2 * c if bn else 0

    total = conv(num_channels, widths[0], 3) + norm(widths[0])  # stem
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for index in range(depth):
            stride = 2 if stage > 0 and index == 0 else 1
            total += conv(cin, cout, 3) + norm(cout) + conv(cout, cout, 3) + norm(cout)
            if skip and (cin != cout or stride != 1):
                total += conv(cin, cout, 1) + norm(cout)  # the projection
            cin = cout
    return total + widths[-1] * hidden + hidden + hidden * labels + labels  # two FC layers


@pytest.mark.parametrize("bn", [True, False])
def test_resnet_parameter_counts(bn):
    widths, depth = (4, 8, 8), 2  # stage 2 halves the resolution at constant width: 8 -> 8, stride 2
    skip = tiny_resnet(True, bn, widths=widths, depth=depth)
    plain = tiny_resnet(False, bn, widths=widths, depth=depth)
    assert count(skip) == expected_resnet_params(1, widths, depth, 6, 3, skip=True, bn=bn)
    assert count(plain) == expected_resnet_params(1, widths, depth, 6, 3, skip=False, bn=bn)
    # plain and skip differ by exactly the two projections (4 -> 8 and 8 -> 8, both stride 2)
    projections = (4 * 8 + 2 * 8) + (8 * 8 + 2 * 8) if bn else (4 * 8 + 8) + (8 * 8 + 8)
    assert count(skip) - count(plain) == projections
    assert count(skip) == (5303 if bn else 5203)  # the numbers the formula gives, written out


@pytest.mark.parametrize("bn", [True, False])
def test_mlp_parameter_counts(bn):
    def linear(i, o):
        return i * o + (0 if bn else o) + (2 * o if bn else 0)  # weight, bias without BN, BN

    expected = linear(5, 8) + 2 * 2 * linear(8, 8) + 8 * 3 + 3
    assert count(tiny_mlp(True, bn)) == count(tiny_mlp(False, bn)) == expected  # no projections


def test_in_equals_out_downsampling_block_gets_a_projection():
    model = tiny_resnet(widths=(8, 8), depth=2)
    kinds = [block.shortcut_kind for block in model.blocks]
    assert kinds == ["identity", "identity", "projection", "identity"]
    projection = model.blocks[2].shortcut[0]
    assert projection.kernel_size == (1, 1) and projection.stride == (2, 2)
    assert model(images()[0]).logits.shape == (4, 3)
    assert [block.shortcut_kind for block in tiny_resnet(skip=False, widths=(8, 8), depth=2).blocks] == ["none"] * 4


# ---- the reference baseline -----------------------------------------------------------------------


def test_reference_resnet_runs_on_small_images_and_matches_our_blocks():
    reference = reference_resnet(num_labels=3, num_channels=1, widths=(4, 8, 8), depth=2)
    x, y = images(batch=2, size=16)
    out = reference(pixel_values=x, labels=y)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    assert reference.config.layer_type == "basic" and reference.config.embedding_size == 4

    # with skips and BN on, block k of ours has exactly the parameters of block k of transformers'
    ours = tiny_resnet(widths=(4, 8, 8), depth=2)
    theirs = [layer for stage in reference.resnet.encoder.stages for layer in stage.layers]
    assert [count(block) for block in ours.blocks] == [count(layer) for layer in theirs]
    assert [block.shortcut_kind == "projection" for block in ours.blocks] == [
        not isinstance(layer.shortcut, torch.nn.Identity) for layer in theirs
    ]


# ---- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["resnet", "mlp"])
def test_save_load_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "resnet":
        model, data, auto = (
            tiny_resnet(skip=False, bn=True, gate_target="residual"),
            images(),
            AutoModelForImageClassification,
        )
    else:
        model, data, auto = (
            tiny_mlp(skip=True, bn=True, gate_target="skip"),
            rows(),
            AutoModelForSequenceClassification,
        )
    x, _ = data
    model.train()
    model(x)  # move the BatchNorm running statistics away from their init
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    for loaded in (type(model).from_pretrained(tmp_path), auto.from_pretrained(tmp_path)):
        assert type(loaded) is type(model)
        loaded.eval()
        assert torch.equal(loaded(x).logits, model(x).logits)
        for name in model.config.own_options():
            assert getattr(loaded.config, name) == getattr(model.config, name), name
        assert loaded.config.num_labels == 3


# ---- gates ----------------------------------------------------------------------------------------


def test_block_gates_follow_the_markov_chain_interface():
    model = tiny_resnet(widths=(4, 8), depth=2).eval()
    x, _ = images()
    chain = MarkovChain(num_links=model.num_blocks)
    gates = chain.sample(4, torch.Generator().manual_seed(0))  # (B, K) of 0/1
    assert model(x, block_gates=gates).logits.shape == (4, 3)
    assert torch.allclose(model(x, block_gates=torch.ones(4, model.num_blocks)).logits, model(x).logits)

    # gates act per example: closing every block of example 0 leaves the others untouched
    closed = torch.ones(4, model.num_blocks)
    closed[0] = 0
    gated, ungated = model(x, block_gates=closed).logits, model(x).logits
    assert not torch.allclose(gated[0], ungated[0])
    assert torch.allclose(gated[1:], ungated[1:])


def test_closed_residual_gates_reduce_blocks_to_their_shortcut():
    model = tiny_resnet(widths=(4,), depth=3).eval()  # identity shortcuts only
    x, _ = images()
    closed = model.features(x, block_gates=torch.zeros(4, 3))
    assert torch.allclose(closed, model.head(model.pool(model.stem(x)).flatten(1)))


def test_closed_skip_gates_make_the_net_plain():
    skip = tiny_resnet(widths=(4,), depth=3, gate_target="skip").eval()
    plain = tiny_resnet(skip=False, widths=(4,), depth=3).eval()
    plain.load_state_dict(skip.state_dict())  # identity shortcuts have no parameters
    x, _ = images()
    assert torch.allclose(skip(x, block_gates=torch.zeros(4, 3)).logits, plain(x).logits)
    with pytest.raises(ValueError, match="skip_connections=True"):
        tiny_resnet(skip=False, gate_target="skip")(x, block_gates=torch.zeros(4, 2))


def test_block_gates_shape_is_checked():
    model = tiny_resnet(widths=(4, 8), depth=2)
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 3\)"):
        model(images()[0], block_gates=torch.ones(4, 3))


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({"depth": 0}, "depth=0"),
        ({"widths": ()}, r"widths=\[\]"),
        ({"widths": (8, 0)}, r"widths=\[8, 0\]"),
        ({"widths": (8, -4)}, r"widths=\[8, -4\]"),
        ({"num_labels": 1}, "num_labels=1"),
        ({"hidden_size": 0}, "hidden_size=0"),
        ({"batch_norm": "yes"}, "batch_norm='yes'"),
        ({"gate_target": "both"}, "'both'"),
        ({"skip_conections": False}, r"unknown option\(s\) \['skip_conections'\]"),
    ],
)
def test_resnet_config_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        SkipResNetConfig(**options)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"depth": 0}, "depth=0"),
        ({"width": -1}, "width=-1"),
        ({"num_labels": 1}, "num_labels=1"),
        ({"dept": 3}, "dept"),
    ],
)
def test_mlp_config_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        ResidualMLPConfig(**options)


def test_edited_config_is_checked_when_the_model_is_built():
    config = SkipResNetConfig()
    config.depth = 0
    with pytest.raises(ValueError, match="depth=0"):
        SkipResNetForImageClassification(config)


def test_reference_resnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth=0"):
        reference_resnet(num_labels=3, depth=0)
    with pytest.raises(ValueError, match=r"widths=\[\]"):
        reference_resnet(num_labels=3, widths=())


def test_mlp_rejects_images():
    with pytest.raises(ValueError, match=r"\(batch, features\).*4-D"):
        tiny_mlp()(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="num_features=5"):
        tiny_mlp()(torch.randn(2, 7))


def test_resnet_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(batch, 1, height, width\), got \(2, 3, 8, 8\)"):
        tiny_resnet()(torch.randn(2, 3, 8, 8))
