"""Cost of the skip gates: forward + backward time of each mode against stock diffusers UNet2DModel.

Every model has the same backbone config; the stock ``UNet2DModel`` is the reference. Models are
timed interleaved (round-robin over models within each repeat, the starting model rotating from one
repeat to the next) after a warm-up, so that machine load drifting during the run affects all models
alike. Reports the median seconds per training step (forward, MSE loss, backward) and its ratio to
stock, as JSON on stdout (with the fastest step per model, which other load on the machine disturbs
least).

    python bench/gate_overhead.py --config digits --batch_size 64 --repeats 10 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DModel

from skipdiff import SkipUNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import parse_timing_args, time_interleaved  # noqa: E402  (bench/ is not a package)

CONFIGS = {
    # diffusers' test size: for a quick check that the script runs.
    "tiny": dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    ),
    # 16x16 grey digits, the project's CPU experiments: 3 levels, 9 long skips.
    "digits": dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    ),
}

# Mode -> skip specification; None is the stock diffusers UNet2DModel.
MODES = {
    "stock": None,
    "keep": "full",
    "zero": "none",
    "remove": "removed",
    "scale": "inv-sqrt2",
    "learned": "learned",
    "learned_channel": "learned_channel",
    "fourier": "fourier:backbone=1.5:skip=0.9",  # FreeU's SD1.5 stage-1 factors, on every skip
    "fourier_v2": "fourier:backbone=1.5:skip=0.9:structure=true",  # FreeU v2's backbone factor
    "adapter": "adapter",  # SC-Tuner bottleneck of the skip's width
    "ramp": "ramp",  # a factor linear in the timestep
    "window": "scale:0.7071:t_min=500",  # a constant scale on half the trajectory
    "bernoulli": "bernoulli",
    "markov": "markov",
}

# Largest acceptable slowdown against stock (median step time ratio).
TARGETS = {"keep": 1.03, "scale": 1.05, "learned": 1.05, "fourier": 1.15}


def build_models(config: dict) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    stock = UNet2DModel(**config)
    models: dict[str, torch.nn.Module] = {}
    for name, spec in MODES.items():
        model = stock if spec is None else SkipUNet2DModel(**config, skips=spec)
        if spec is not None:  # same backbone weights (``remove`` keeps only the tensors it still has)
            own = model.state_dict()
            model.load_state_dict(
                {k: v for k, v in stock.state_dict().items() if k in own and own[k].shape == v.shape},
                strict=False,
            )
        models[name] = model.train()
    return models


def train_step(model: torch.nn.Module, sample, timesteps, target) -> float:
    """Seconds for one forward + MSE loss + backward."""
    start = time.perf_counter()
    out = model(sample, timesteps).sample
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="digits", help="UNet backbone")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=None, help="sample size (default: the config's)")
    args = parse_timing_args(parser)

    config = dict(CONFIGS[args.config])
    if args.resolution is not None:
        config["sample_size"] = args.resolution
    models = build_models(config)

    generator = torch.Generator().manual_seed(0)
    size = config["sample_size"]
    shape = (args.batch_size, config["in_channels"], size, size)
    sample = torch.randn(shape, generator=generator)
    target = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)

    steps = {name: functools.partial(train_step, model) for name, model in models.items()}
    times = time_interleaved(steps, (sample, timesteps, target), args.repeats, args.warmup)
    names = list(models)

    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: median[name] / median["stock"] for name in names}
    report = {
        "config": {"name": args.config, **config},
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "median_seconds": {name: round(v, 5) for name, v in median.items()},
        # The fastest step of each model: less sensitive to other load on the machine.
        "min_seconds": {name: round(min(t), 5) for name, t in times.items()},
        "ratio_to_stock": {name: round(v, 4) for name, v in ratio.items()},
        "targets": TARGETS,
        "meets_target": {name: ratio[name] <= target for name, target in TARGETS.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
