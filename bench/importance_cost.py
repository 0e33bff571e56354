"""Cost of the skip-importance matrix on a text-conditioned (Stable Diffusion) target: measured and counted.

Three ways to compute the same K x buckets matrix (one factor, zeroing), all giving the same numbers:

* ``naive``: what skipdiff did before: for each ablated skip the whole held-out denoising loss again
  (images re-encoded by the VAE, captions re-embedded by the text encoder, every UNet forward in full);
* ``shared``: one noised batch per bucket, encoded and embedded once, every ablated forward in full
  (``skip_importance(..., replay=False)``);
* ``replay``: the same, each ablated forward replaying the part of the UNet the ablation does not change
  (``skip_importance``, what ``python -m skipdiff.eval --skip_importance`` runs).

``--config tiny`` is the tests' pipeline (16 px); ``--config sd15`` uses Stable Diffusion 1.5's UNet, VAE and
CLIP ViT-L text-encoder configurations with random weights (the cost does not depend on the weights) at
``--resolution``. Timed on this machine's CPU, interleaved over ``--repeats`` (minimum kept).

The FLOP count (``--flops``, on the meta device: no weights, no memory) covers SD 1.5 at 512 px and SDXL at
1024 px: one UNet forward, each skip's replayed (partial) forward, the VAE encoder and decoder (SD 1.5's VAE
architecture for both; SDXL's has the same layout), and the resulting ratios. JSON on stdout.

    python bench/importance_cost.py --config tiny --threads 1
    python bench/importance_cost.py --config sd15 --resolution 128 --images 2 --buckets 2 --threads 1
    python bench/importance_cost.py --flops
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.tiny_pipelines import CAPTIONS, sd_pipeline, write_clip_tokenizer  # noqa: E402

from skipdiff.conditioning import TextConditioning  # noqa: E402
from skipdiff.encoders import VaeEncoder  # noqa: E402
from skipdiff.eval.denoise import denoising_loss_by_bucket  # noqa: E402
from skipdiff.eval.importance import gate_override, replay_flops, skip_importance  # noqa: E402
from skipdiff.skips.unet import apply_skip_spec  # noqa: E402
from skipdiff.targets import StudyTarget, load_target  # noqa: E402

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def sd15_target(resolution: int, folder: Path) -> StudyTarget:
    """Stable Diffusion 1.5's architecture with random weights, as a study target (nothing saved)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768).eval()
    vae = AutoencoderKL(**SD15_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).eval()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return StudyTarget(
        "random sd15", "text", pipeline, unet, scheduler, scheduler, VaeEncoder(vae), TextConditioning(pipeline), {}, {}
    )


def batches_for(images: int, batch_size: int, resolution: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(images, 3, resolution, resolution, generator=generator) * 2 - 1
    return [
        {
            "pixel_values": pixels[i : i + batch_size],
            "captions": [CAPTIONS[j % len(CAPTIONS)] for j in range(i, min(i + batch_size, images))],
        }
        for i in range(0, images, batch_size)
    ]


def naive(target: StudyTarget, router, batches, buckets: int) -> list:
    """The loop before: the whole denoising loss per ablation (re-encoding and re-embedding every time)."""
    args = (target.unet, target.noise_scheduler, target.encoder, batches, buckets)
    kwargs = {"unet_kwargs": target.conditioning.unet_kwargs}
    base = denoising_loss_by_bucket(*args, **kwargs)["per_example"].mean(0)
    rows = []
    for info in router.skips:
        with gate_override(router, info.index, {"mode": "zero"}):
            rows.append((denoising_loss_by_bucket(*args, **kwargs)["per_example"].mean(0) - base).tolist())
    return rows


def timed_runs(target: StudyTarget, batches, buckets: int, repeats: int) -> dict:
    router = apply_skip_spec(target.unet, "full")
    runs = {
        "naive": lambda: naive(target, router, batches, buckets),
        "shared": lambda: skip_importance(
            target.unet,
            target.noise_scheduler,
            target.encoder,
            batches,
            (0.0,),
            buckets,
            unet_kwargs=target.conditioning.unet_kwargs,
            router=router,
            replay=False,
        )["factors"]["0.0"]["delta"],
        "replay": lambda: skip_importance(
            target.unet,
            target.noise_scheduler,
            target.encoder,
            batches,
            (0.0,),
            buckets,
            unet_kwargs=target.conditioning.unet_kwargs,
            router=router,
        )["factors"]["0.0"]["delta"],
    }
    seconds = {name: float("inf") for name in runs}
    deltas = {}
    for repeat in range(repeats):
        for name in list(runs)[repeat % 3 :] + list(runs)[: repeat % 3]:  # rotate the order between repeats
            start = time.perf_counter()
            deltas[name] = torch.tensor(runs[name]())
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    router.detach()
    return {
        "seconds": seconds,
        "naive_over_replay": seconds["naive"] / seconds["replay"],
        "shared_over_replay": seconds["shared"] / seconds["replay"],
        "max_abs_difference_vs_naive": {name: float((d - deltas["naive"]).abs().max()) for name, d in deltas.items()},
        "skips": len(router.skips),
    }


def count_flops() -> dict:
    """FLOPs (meta device) of SD 1.5 at 512 px and SDXL at 1024 px: UNet forward, partial forwards, VAE encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        sdxl = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    cases = {
        "sd15_512px": (sd15, 64, {"encoder_hidden_states": torch.zeros(1, 77, 768, device="meta")}, 512),
        "sdxl_1024px": (
            sdxl,
            128,
            {
                "encoder_hidden_states": torch.zeros(1, 77, 2048, device="meta"),
                "added_cond_kwargs": {
                    "text_embeds": torch.zeros(1, 1280, device="meta"),
                    "time_ids": torch.zeros(1, 6, device="meta"),
                },
            },
            1024,
        ),
    }
    for name, (unet, size, kwargs, pixels) in cases.items():
        router = apply_skip_spec(unet, "full")
        flops = replay_flops(
            unet, router, torch.zeros(1, 4, size, size, device="meta"), torch.zeros(1, device="meta"), kwargs
        )
        with FlopCounterMode(display=False) as counter:
            vae.encode(torch.zeros(1, 3, pixels, pixels, device="meta"))
        with FlopCounterMode(display=False) as decoder:
            vae.decode(torch.zeros(1, 4, pixels // 8, pixels // 8, device="meta"))
        skips = len(flops["partial"])
        flops.update(
            skips=skips,
            vae_encoder=int(counter.get_total_flops()),
            vae_decoder=int(decoder.get_total_flops()),
            partial_over_full=[p / flops["full"] for p in flops["partial"]],
            # per image, per bucket, per factor: baseline + K ablations, in units of one full UNet forward
            forwards_naive=1 + skips,
            forwards_replay=(flops["full"] + sum(flops["partial"])) / flops["full"],
        )
        router.detach()
        out[name] = flops
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=128, help="image size for --config sd15")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--buckets", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flops", action="store_true", help="only count FLOPs for SD 1.5 and SDXL (meta device)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.flops:
        print(json.dumps(count_flops(), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        if args.config == "tiny":
            target, resolution = load_target(str(sd_pipeline(Path(tmp) / "sd"))), 16
        else:
            target, resolution = sd15_target(args.resolution, Path(tmp)), args.resolution
        batches = batches_for(args.images, args.batch_size, resolution)
        result = timed_runs(target, batches, args.buckets, args.repeats)
    result.update(
        config=args.config, resolution=resolution, images=args.images, buckets=args.buckets, threads=args.threads
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
