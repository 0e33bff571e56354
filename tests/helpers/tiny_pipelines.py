"""Tiny diffusers pipelines built in code from random weights, as diffusers' own pipeline tests build them.

Nothing is downloaded: the CLIP tokenizer is written by :func:`write_clip_tokenizer` (a vocabulary of single
characters, no merges), text encoders and CLIP models come from small configs. Each builder saves its
pipeline to a folder and returns the folder; images are 16x16 (latents 8x8) so that a pipeline samples,
encodes and denoises in milliseconds on a CPU.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CHARACTERS = string.ascii_lowercase + string.digits + ".,!?'-"
TEXT = dict(
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=32,
)
UNET_2D = dict(
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
AUTOENCODER = dict(
    block_out_channels=[4, 8],
    in_channels=3,
    out_channels=3,
    norm_num_groups=2,
    sample_size=16,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)
CAPTIONS = ["a red square", "a blue circle", "green stripes", "a dark corner", "light sky", "two dots"]


def write_clip_tokenizer(folder: Path):
    """A ``CLIPTokenizer`` over single characters (each also as a word end), saved to and loaded from ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for character in CHARACTERS:
        for token in (character, character + "</w>"):
            vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def _text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**TEXT, vocab_size=len(tokenizer))


def ddpm_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``DDPMPipeline`` (pixels, 8x8 RGB) saved to ``folder``."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    DDPMPipeline(unet=UNet2DModel(**UNET_2D), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def ldm_pipeline(folder: Path, seed: int = 0) -> Path:
    """An ``LDMPipeline`` (a VQModel 16x16 -> 8x8x3, a UNet2DModel, DDIM) saved to ``folder``."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(seed)
    vqvae = VQModel(**AUTOENCODER, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3)
    LDMPipeline(vqvae=vqvae, unet=UNet2DModel(**UNET_2D), scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def sd_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionPipeline`` (16x16 images, 8x8x4 latents, a 2-layer CLIP text model) saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = write_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=AutoencoderKL(**AUTOENCODER, latent_channels=4),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionXLPipeline`` (two text encoders, added time ids; 16x16 images) saved to ``folder``."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = write_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=2,
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    config = _text_config(tokenizer)
    pipeline = StableDiffusionXLPipeline(
        unet=unet,
        vae=AutoencoderKL(**AUTOENCODER, latent_channels=4),
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def clip_model(folder: Path, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` and its ``CLIPProcessor`` (32x32 images) saved to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = write_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    torch.manual_seed(seed)
    text = {key: value for key, value in TEXT.items() if key != "projection_dim"}
    vision = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config={**text, "vocab_size": len(tokenizer)}, vision_config=vision, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def captioned_images(folder: Path, count: int = 24, size: int = 16, seed: int = 0) -> Path:
    """``count`` smooth random RGB PNGs with a ``metadata.jsonl`` giving each a ``text`` caption (imagefolder)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": CAPTIONS[i % len(CAPTIONS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder
