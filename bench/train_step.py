"""Training step time of ``SkipUNet2DModel`` (every skip ``keep``) against stock diffusers ``UNet2DModel``.

One step is what ``train_unet.py`` does per batch: noise the latents (DDPM ``add_noise``), forward,
MSE to the noise, backward, AdamW step, zero the gradients. Both models are built from the same preset
(``digits`` by default) at the default job's latent shape (8x8x4, batch 128), or with ``--pixel`` at
the pixel-space shape (16x16x1), with the same initial weights, inputs and optimizer settings. They are
timed interleaved (round-robin, the starting model rotating every repeat) after a warm-up, and the
ratio of median step times is reported as JSON on stdout.

    python bench/train_step.py --threads 1 --repeats 10
    python bench/train_step.py --pixel --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import diffusers
import torch
from diffusers import UNet2DModel

from skipdiff import SkipUNet2DModel
from skipdiff.diffusion import make_scheduler
from skipdiff.presets import UNET_PRESETS, unet_config

TARGET_RATIO = 1.03  # SkipUNet2DModel (keep) may be at most 3% slower than stock
SKIP_KEYS = ("skips", "residual_shortcuts", "markov")  # SkipUNet2DModel-only config keys


def build(preset: str, sample_size: int, channels: int, skips: str = "full") -> dict[str, torch.nn.Module]:
    """``{"stock": UNet2DModel, "skip": SkipUNet2DModel}`` with identical weights."""
    config = unet_config(preset, sample_size=sample_size, channels=channels, skips=skips)
    stock_config = {k: v for k, v in config.items() if k not in SKIP_KEYS}
    torch.manual_seed(0)
    stock = UNet2DModel(**stock_config)
    skip = SkipUNet2DModel(**config)
    skip.load_state_dict(stock.state_dict())
    return {"stock": stock.train(), "skip": skip.train()}


def make_step(model: torch.nn.Module, scheduler, lr: float = 2e-3):
    """A closure running one training step on ``model`` with its own AdamW; returns seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def step(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> float:
        start = time.perf_counter()
        noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, H, W)
        prediction = model(noisy, timesteps).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def time_interleaved(steps: dict, inputs: tuple, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin over ``steps`` within each repeat, the starting one rotating."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name](*inputs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        start = repeat % len(names)
        for name in names[start:] + names[:start]:
            times[name].append(steps[name](*inputs))
    return times


def parse_timing_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add ``--repeats``, ``--warmup`` and ``--threads`` to a bench's ``parser`` (which has ``--batch_size``),
    parse, reject values below 1 and set torch's thread count."""
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(UNET_PRESETS), default="digits", help="UNet preset")
    parser.add_argument("--pixel", action="store_true", help="pixel space 16x16x1 instead of latents 8x8x4")
    parser.add_argument("--batch_size", type=int, default=128)
    args = parse_timing_args(parser)

    size, channels = (16, 1) if args.pixel else (8, 4)
    models = build(args.model, size, channels)
    scheduler = make_scheduler(1000, "squaredcos_cap_v2", "epsilon")
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, channels, size, size)
    inputs = (
        torch.randn(shape, generator=generator),
        torch.randn(shape, generator=generator),
        torch.randint(0, 1000, (args.batch_size,), generator=generator),
    )
    steps = {name: make_step(model, scheduler) for name, model in models.items()}
    times = time_interleaved(steps, inputs, args.repeats, args.warmup)

    median = {name: statistics.median(t) for name, t in times.items()}
    # Headline: ratio of the median step times. Also the median of per-repeat ratios (the two steps of
    # a repeat run back to back, so load drifting over the run affects both alike).
    ratio = median["skip"] / median["stock"]
    per_repeat = statistics.median(s / k for s, k in zip(times["skip"], times["stock"], strict=True))
    report = {
        "bench": "train_step",
        "what": "noise + forward + MSE + backward + AdamW step + zero_grad, SkipUNet2DModel (all keep) vs UNet2DModel",
        "model": args.model,
        "space": "pixel 16x16x1" if args.pixel else "latent 8x8x4",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": platform.machine(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "median_seconds": {name: round(v, 5) for name, v in median.items()},
        "min_seconds": {name: round(min(t), 5) for name, t in times.items()},
        "ratio_skip_to_stock": round(ratio, 4),
        "median_per_repeat_ratio": round(per_repeat, 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
