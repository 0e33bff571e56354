"""Training throughput (images/s) on one GPU: skipdiff's loop vs a diffusers-examples loop vs the bare step.

Two shapes, as the GPU preset trains them: 32x32 RGB pixels (the ``cifar10`` UNet preset, DDPM's 35.7 M
layout) and 64x64x4 latents (the same preset on latents of a small random VAE, cached as the default job
caches them). For each shape and each setting (fp32, bf16 autocast, bf16 + torch.compile):

* ``ours``: ``train_unet`` itself (in this process) on a synthetic image folder written once, telemetry at
  its defaults (a record every 10 steps, EMA, clipping); seconds per step from its own ``stats.jsonl``
  windows after the first ``--warmup`` steps;
* ``reference``: a loop written as diffusers' ``train_unconditional.py`` writes it (images decoded and
  encoded every step, ``loss.item()`` every step, ``EMAModel``);
* ``bare``: forward + backward + fused AdamW step on in-memory tensors, nothing else.

Prints one JSON object (device, versions, images/s per loop and setting, ratios). Made to finish in under
8 minutes on one H200 with the defaults; ``--quick`` is a CPU check of the script itself (tiny model, few
steps). Run it through ``bench/gpu.sh``, which records the date and device with the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_loop import reset_accelerate, run_train_unet  # noqa: E402  (bench/ is not a package)

SETTINGS = {"fp32": ("no", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}


def write_images(folder: Path, count: int, size: int) -> Path:
    """``count`` smooth random RGB images (PNG) of ``size`` x ``size``: data for timing only."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        low = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return folder


def write_vae(folder: Path) -> Path:
    """A random 4-channel AutoencoderKL that halves the resolution (its weights do not matter for timing)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(folder)
    return folder


def ours(
    data: Path, vae: str, resolution: int, model: str, batch: int, steps: int, warmup: int, setting: str, out: Path
) -> float:
    """Seconds per step of ``train_unet`` (median over its logging windows after ``warmup`` steps)."""
    precision, compile_ = SETTINGS[setting]
    argv = [
        "--train_data_dir",
        str(data),
        "--resolution",
        str(resolution),
        "--vae",
        vae,
        "--model",
        model,
        "--train_batch_size",
        str(batch),
        "--max_train_steps",
        str(steps),
        "--output_dir",
        str(out),
        "--mixed_precision",
        precision,
        "--validation_every",
        "0",
        "--num_validation_images",
        "2",
        "--validation_inference_steps",
        "1",
        "--checkpointing_steps",
        "0",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        *(["--torch_compile"] if compile_ else []),
    ]
    run_train_unet(argv)
    windows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds_per_step"] for r in windows if "seconds_per_step" in r and r["step"] > warmup)


def synthetic_batches(data: Path, vae: str, resolution: int):
    """(pixels (N, 3, r, r) in [-1, 1], the VAE or None) on the device."""
    from diffusers import AutoencoderKL
    from torchvision.transforms.functional import pil_to_tensor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pixels = torch.stack([pil_to_tensor(Image.open(p).convert("RGB")) for p in sorted(data.glob("*.png"))])
    pixels = (pixels.float() / 127.5 - 1).to(device)
    autoencoder = None if vae == "none" else AutoencoderKL.from_pretrained(vae).to(device).eval().requires_grad_(False)
    return pixels, autoencoder


def unet_for(model: str, sample_size: int, channels: int, device):
    from skipdiff import SkipUNet2DModel
    from skipdiff.presets import unet_config

    torch.manual_seed(0)
    return SkipUNet2DModel(**unet_config(model, sample_size=sample_size, channels=channels)).to(device).train()


def loop(
    kind: str, data: Path, vae: str, resolution: int, model: str, batch: int, steps: int, warmup: int, setting: str
) -> float:
    """Seconds per step of the ``reference`` or the ``bare`` loop (median of 10-step windows after warm-up)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    precision, compile_ = SETTINGS[setting]
    pixels, autoencoder = synthetic_batches(data, vae, resolution)
    device = pixels.device
    scale = 2 if autoencoder is not None else 1
    channels = 4 if autoencoder is not None else 3
    unet = unet_for(model, resolution // scale, channels, device)
    if compile_:
        unet.compile()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=kind == "bare")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75) if kind == "reference" else None
    latents_all = None
    if kind == "bare" and autoencoder is not None:
        with torch.no_grad():
            latents_all = torch.cat([autoencoder.encode(p).latent_dist.mean for p in pixels.split(256)])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    windows, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(pixels), (batch,), device=device)
        if latents_all is not None:
            latents = latents_all[index]
        elif autoencoder is not None:  # the reference encodes every step
            with torch.no_grad():
                latents = autoencoder.encode(pixels[index]).latent_dist.sample()
        else:
            latents = pixels[index]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        with autocast:
            prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        if kind == "reference":
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unet.parameters())
            loss.item()  # the examples log the loss every step
        if step % 10 == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            windows.append((step, (time.perf_counter() - start) / 10))
            start = time.perf_counter()
    return statistics.median(s for i, s in windows if i > warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="steps per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing (compilation)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="a CPU check of this script: tiny model, few steps")
    args = parser.parse_args()
    model = "tiny" if args.quick else "cifar10"
    if args.quick:
        args.steps, args.warmup, args.batch_size = 20, 10, 8
        torch.set_num_threads(1)
    shapes = {"32x32 RGB pixels": (32, "none"), "64x64x4 latents": (128, "vae")}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        scratch = Path(scratch)
        vae = str(write_vae(scratch / "vae"))
        for shape, (resolution, encoder) in shapes.items():
            data = write_images(scratch / f"images-{resolution}", 512 if args.quick else 2048, resolution)
            vae_arg = vae if encoder == "vae" else "none"
            for setting in args.settings:
                row = {}
                for name in ("bare", "reference", "ours"):
                    reset_accelerate()
                    if name == "ours":
                        seconds = ours(
                            data,
                            vae_arg,
                            resolution,
                            model,
                            args.batch_size,
                            args.steps,
                            args.warmup,
                            setting,
                            scratch / f"run-{resolution}-{setting}",
                        )
                    else:
                        seconds = loop(
                            name, data, vae_arg, resolution, model, args.batch_size, args.steps, args.warmup, setting
                        )
                    row[name] = round(args.batch_size / seconds, 1)
                row["ours_to_bare"] = round(row["ours"] / row["bare"], 3)
                row["ours_to_reference"] = round(row["ours"] / row["reference"], 3)
                results.setdefault(shape, {})[setting] = row
                print(f"{shape} {setting}: {row}", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        json.dumps(
            {
                "bench": "gpu_throughput",
                "device": device,
                "model_preset": model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup_steps": args.warmup,
                "versions": {"torch": torch.__version__},
                "images_per_second": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
