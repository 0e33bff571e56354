"""What the training loop adds to the bare step, timed one component at a time on the default model.

``bench/train_loop.py`` compares whole loops; on a shared CPU its per-variant differences (a few percent)
sit inside the run-to-run noise of a 0.3-0.5 s step. This bench times the components that the loop adds
to the bare forward + backward + optimizer step directly, each in isolation on the default job's
``SkipUNet2DModel`` (1.6 M parameters): the device EMA update, gradient clipping with its norm, and, for
scale, the bare step itself (fused AdamW, batch 128, 8x8x4 latents). Medians of ``--repeats`` calls;
JSON on stdout.

    python bench/step_components.py --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from skipdiff.presets import unet_config
    from skipdiff.training.ema import WeightEMA
    from skipdiff.unet import SkipUNet2DModel

    model = SkipUNet2DModel(**unet_config("digits", sample_size=8, channels=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    latents = torch.randn(args.batch, 4, 8, 8)
    ema = WeightEMA(model.parameters())

    def bare_step():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (args.batch,))
        loss = torch.nn.functional.mse_loss(model(latents + noise, timesteps).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    bare_step()  # gradients exist from here on
    seconds = {
        "bare_step": median_seconds(bare_step, max(5, args.repeats // 3)),
        "ema_update": median_seconds(ema.step, args.repeats),
        "clip_grad_norm": median_seconds(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), args.repeats),
    }
    result = {
        "bench": "step_components",
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median_seconds": seconds,
        "share_of_bare_step": {name: value / seconds["bare_step"] for name, value in seconds.items() if name != "bare_step"},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
