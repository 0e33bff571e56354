"""What the training loop adds to the bare step, timed one component at a time on the default model.

``bench/train_loop.py`` compares whole loops; on a shared CPU its per-variant differences (a few percent)
sit inside the run-to-run noise of a 0.3-0.5 s step. This bench times the components that the loop adds
to the bare forward + backward + optimizer step directly, each in isolation on the default job's
``SkipUNet2DModel`` (1.6 M parameters): the device EMA update (as the CPU runs it, one lerp per tensor,
and as a GPU runs it, three multi-tensor passes), gradient clipping with its norm, fetching a batch of
cached latents (one index per tensor, as the loader now does, against a row at a time and a stack), and,
for scale, the bare step itself (fused AdamW, batch 128, 8x8x4 latents) fed standard-layout latents and
the channels-last latents the VAE hands out (what the loop fed the UNet before its encoder made them
contiguous). Medians of ``--repeats`` calls; JSON on stdout.

    python bench/step_components.py --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def interleaved_median_seconds(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time of each ``fn()`` over ``repeats`` rounds after ``warmup`` untimed ones; every round
    calls each function once, so a drift of the machine's speed hits them all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from skipdiff.encoders import CachedLatents
    from skipdiff.presets import unet_config
    from skipdiff.skips.unet import SkipUNet2DModel
    from skipdiff.training import ema as ema_module
    from skipdiff.training.ema import WeightEMA

    model = SkipUNet2DModel(**unet_config("digits", sample_size=8, channels=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    latents = torch.randn(args.batch, 4, 8, 8)
    ema = WeightEMA(model.parameters())

    def bare_step(inputs: torch.Tensor = latents):
        noise = torch.randn_like(inputs)
        timesteps = torch.randint(0, 1000, (args.batch,))
        loss = torch.nn.functional.mse_loss(model(inputs + noise, timesteps).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def ema_multi_tensor():
        rate = torch.tensor(0.01)
        ema_module.lerp_multi_tensor(ema.shadow, [p.detach() for p in ema.parameters], rate)

    channels_last = latents.contiguous(memory_format=torch.channels_last)
    cached = CachedLatents({"latent_mean": torch.randn(2000, 4, 8, 8), "latent_std": torch.rand(2000, 4, 8, 8)})
    rows = torch.randperm(2000)[: args.batch].tolist()
    bare_step()  # gradients exist from here on
    steps = {"bare_step": bare_step, "bare_step_channels_last_input": lambda: bare_step(channels_last)}
    components = {
        "ema_update": ema.step,
        "ema_update_multi_tensor": ema_multi_tensor,
        "clip_grad_norm": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
        "cached_batch_by_rows": lambda: CachedLatents.collate([cached[i] for i in rows]),
        "cached_batch_at_once": lambda: CachedLatents.collate(cached.__getitems__(rows)),
    }
    seconds = {
        **interleaved_median_seconds(steps, max(5, args.repeats // 3)),
        **interleaved_median_seconds(components, args.repeats),
    }
    result = {
        "bench": "step_components",
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median_seconds": seconds,
        "share_of_bare_step": {
            name: value / seconds["bare_step"] for name, value in seconds.items() if name != "bare_step"
        },
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
