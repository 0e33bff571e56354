"""Named architectures: a dict of one-liners offered to the CLI as ``choices``.

A UNet preset fixes the backbone; ``sample_size``, ``in_channels``/``out_channels`` and the class
embedding are filled in from the data and the encoder by :func:`unet_config`.
"""

from __future__ import annotations

import json
from pathlib import Path

UNET_PRESETS: dict[str, dict] = {
    # Tests: seconds on a CPU.
    "tiny": dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    ),
    # Digits latents (8x8x4) or pixels (16x16x1): 3 levels, attention at the lowest.
    "digits": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    ),
    # CIFAR-10 at 32x32, DDPM's 35.7 M-parameter layout (Ho et al., 2020).
    "cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        dropout=0.1,
    ),
}

VAE_PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    # 16x16 grey digits -> 8x8x4 latents.
    "digits": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    # 32x32 colour -> 8x8x4 latents.
    "cifar10": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=32, latent_channels=4),
}


def unet_config(
    preset_or_path: str,
    *,
    sample_size: int,
    channels: int,
    num_classes: int | None = None,
    skips="full",
    residual_shortcuts: dict | None = None,
    markov: dict | None = None,
) -> dict:
    """The full ``SkipUNet2DModel`` config for a preset name or a JSON config file."""
    if preset_or_path in UNET_PRESETS:
        config = dict(UNET_PRESETS[preset_or_path])
    elif Path(preset_or_path).is_file():
        try:
            config = json.loads(Path(preset_or_path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"model config {preset_or_path!r} is not valid JSON (truncated?): {err}") from err
        if not isinstance(config, dict):
            raise ValueError(f"model config {preset_or_path!r} must hold a JSON object, got {type(config).__name__}")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        raise ValueError(f"unknown model preset or config file {preset_or_path!r}; presets: {sorted(UNET_PRESETS)}")
    config.update(sample_size=sample_size, in_channels=channels, out_channels=channels)
    if num_classes is not None:
        config.update(num_class_embeds=num_classes)
    config.update(skips=skips, residual_shortcuts=residual_shortcuts, markov=markov)
    return config


def vae_config(preset: str, channels: int) -> dict:
    """An ``AutoencoderKL`` config: the preset's widths, one down/up block per width."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; presets: {sorted(VAE_PRESETS)}")
    config = dict(VAE_PRESETS[preset])
    n = len(config["block_out_channels"])
    config.update(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
    )
    return config
