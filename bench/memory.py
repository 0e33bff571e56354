"""Peak memory of one training step: stock diffusers ``UNet2DModel`` vs ``SkipUNet2DModel`` in a few
skip modes, same preset and shape as ``bench/train_step.py``.

On a CPU every model is measured in a fresh subprocess (``tracemalloc`` does not see torch's
allocations): the growth of the process's peak resident set size (``getrusage`` max RSS) from just
before the first step (model, optimizer and inputs built) to after ``--steps`` steps, i.e. gradients,
AdamW state and the peak of the activations. With CUDA, ``torch.cuda.max_memory_allocated`` over the
same steps (also in a fresh subprocess, so nothing is shared). The subprocesses run one after the
other, the models' order rotating across repeats; the median per model is reported, as JSON on
stdout, with its ratio to stock.

    python bench/memory.py --threads 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import SKIP_KEYS  # noqa: E402  (bench/ is not a package)

# Name -> skip specification; None is the stock diffusers UNet2DModel.
MODES = {
    "stock": None,
    "keep": "full",
    "zero": "none",
    "remove": "removed",
    "learned": "learned",
    "fourier": "freeu",
    "bernoulli": "stochastic-depth",
    "markov": "markov",
}


def measure(mode: str, preset: str, pixel: bool, batch_size: int, steps: int, threads: int) -> dict:
    """Runs in the child: build the model and one step's inputs, then measure ``steps`` steps."""
    from diffusers import UNet2DModel

    from skipdiff import SkipUNet2DModel
    from skipdiff.diffusion import make_scheduler
    from skipdiff.presets import unet_config

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, channels = (16, 1) if pixel else (8, 4)
    spec = MODES[mode]
    config = unet_config(preset, sample_size=size, channels=channels, skips=spec or "full")
    torch.manual_seed(0)
    if spec is None:
        model = UNet2DModel(**{k: v for k, v in config.items() if k not in SKIP_KEYS})
    else:
        model = SkipUNet2DModel(**config)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = make_scheduler(1000, "squaredcos_cap_v2", "epsilon")
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, channels, size, size)
    latents = torch.randn(shape, generator=generator).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(steps):
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = torch.nn.functional.mse_loss(model(noisy, timesteps).sample.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        how = "cuda max_memory_allocated - memory_allocated before the first step"
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        how = "max RSS growth (getrusage) from before the first step"
    return {
        "mode": mode,
        "peak_mib": peak_mib,
        "how": how,
        "device": device.type,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="UNet preset")
    parser.add_argument("--pixel", action="store_true", help="pixel space 16x16x1 instead of latents 8x8x4")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="training steps measured per process")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per mode")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one mode
    args = parser.parse_args()
    for name in ("batch_size", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    if args.child is not None:
        print(json.dumps(measure(args.child, args.model, args.pixel, args.batch_size, args.steps, args.threads)))
        return

    modes = ["stock", *[m for m in args.modes if m != "stock"]]
    common = [
        "--model",
        args.model,
        "--batch_size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        *(["--pixel"] if args.pixel else []),
    ]
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        start = repeat % len(modes)
        for mode in modes[start:] + modes[:start]:
            child = subprocess.run(
                [sys.executable, __file__, "--child", mode, *common], capture_output=True, text=True, check=True
            )
            results[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))

    peak = {mode: statistics.median(r["peak_mib"] for r in rs) for mode, rs in results.items()}
    first = results["stock"][0]
    report = {
        "bench": "memory",
        "what": f"peak memory of {args.steps} training steps (noise, forward, MSE, backward, AdamW), fresh process per run",
        "how": first["how"],
        "device": first["device"],
        "model": args.model,
        "space": "pixel 16x16x1" if args.pixel else "latent 8x8x4",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "modes": {mode: MODES[mode] or "stock diffusers UNet2DModel" for mode in modes},
        "parameters": {mode: rs[0]["parameters"] for mode, rs in results.items()},
        "peak_mib_median": {mode: round(v, 1) for mode, v in peak.items()},
        "peak_mib_all": {mode: [round(r["peak_mib"], 1) for r in rs] for mode, rs in results.items()},
        "ratio_to_stock": {mode: round(v / peak["stock"], 3) for mode, v in peak.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
