"""Inference compute of a skip configuration: FLOPs of one forward, and what the MAP path saves."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from skipdiff import SkipUNet2DModel
from skipdiff.eval.compute import forward_flops, map_compute


def _shape(config: dict) -> tuple[int, int, int]:
    return (config["in_channels"], config["sample_size"], config["sample_size"])


def _conv_flops_of_skip(model: SkipUNet2DModel, index: int) -> int:
    """By hand: the FLOPs that dropping skip ``index``'s channels removes from its receiving resnet.

    conv1 (3x3) loses the skip's input channels; the 1x1 shortcut, present while in != out, loses
    them too, and disappears entirely when the backbone alone already has ``out`` channels.
    """
    row = model.describe_skips()[index]
    resnet = model.up_blocks[row["up_block"]].resnets[row["layer"]]
    pixels = row["resolution"] ** 2
    skip, main, out = row["skip_channels"], row["main_channels"], resnet.out_channels
    conv1 = 2 * pixels * out * skip * 9
    shortcut_before = 2 * pixels * out * (main + skip)
    shortcut_after = 2 * pixels * out * main if main != out else 0
    return conv1 + shortcut_before - shortcut_after


def test_trained_flops_are_the_stock_unets(deep_config):
    model = SkipUNet2DModel(**deep_config, skips="markov")
    result = map_compute(model, _shape(deep_config))
    assert result["flops_trained"] == forward_flops(UNet2DModel(**deep_config), _shape(deep_config))


@pytest.mark.parametrize("index", range(9))
def test_closing_one_skip_saves_exactly_its_convolution_flops(deep_config, index):
    spec = ["keep"] * 9
    spec[index] = "zero"
    model = SkipUNet2DModel(**deep_config, skips=",".join(spec))
    result = map_compute(model, _shape(deep_config))
    assert result["closed"] == [index]
    assert result["fraction_closed"] == pytest.approx(1 / 9)
    assert result["flops_trained"] - result["flops_map"] == _conv_flops_of_skip(model, index)
    assert 0 < result["flops_saved_fraction"] < 1


def test_all_open_saves_nothing_and_none_equals_the_removed_model(deep_config):
    full = map_compute(SkipUNet2DModel(**deep_config), _shape(deep_config))
    assert full["closed"] == [] and full["flops_saved_fraction"] == 0.0
    none = map_compute(SkipUNet2DModel(**deep_config, skips="none"), _shape(deep_config))
    assert none["fraction_closed"] == 1.0
    removed = SkipUNet2DModel(**deep_config, skips="removed")
    assert none["flops_map"] == forward_flops(removed, _shape(deep_config))


def test_markov_map_path_decides_what_is_closed(tiny_config):
    model = SkipUNet2DModel(**tiny_config, skips="markov")
    chain = model.skip_router.chain
    with torch.no_grad():
        chain.open_prob.fill_(0.95)
        chain.open_prob[2] = 0.05  # link 2 closes whatever came before; link 3 reopens (0.95 after closed)
    result = map_compute(model, _shape(tiny_config))
    assert result["recommended"] == ["keep", "keep", "zero", "keep"]
    assert result["closed"] == [2]
    assert result["flops_trained"] - result["flops_map"] == _conv_flops_of_skip(model, 2)
