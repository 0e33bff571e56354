"""Shared fixtures: tiny diffusers configs (seconds on a shared 2-core CPU) and inputs for them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every test loads from local directories only

import pytest
import torch

torch.set_num_threads(1)  # the test machine is shared; one thread keeps timings predictable

# diffusers' own test style: block_out_channels=(4, 8), norm_num_groups=2, with an attention block.
# 2 blocks x (layers_per_block + 1) = 4 long skips.
TINY = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(4, 8),
    layers_per_block=1,
    norm_num_groups=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
)

# Three levels, two resnets per block, attention in the middle level: 3 x (2 + 1) = 9 long skips,
# three resolutions (4, 8, 16) and both "in == out" and "in != out" receiving resnets.
DEEP = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(4, 8, 8),
    layers_per_block=2,
    norm_num_groups=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so weights and inputs are reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> dict:
    return dict(TINY)


@pytest.fixture
def deep_config() -> dict:
    return dict(DEEP)


@pytest.fixture
def make_inputs():
    """``make_inputs(config, batch=2)`` -> (sample (B, C, H, W), timesteps (B,)), from a fixed seed."""

    def make(config: dict, batch: int = 2, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        size = config["sample_size"]
        sample = torch.randn(batch, config["in_channels"], size, size, generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        return sample, timesteps

    return make
