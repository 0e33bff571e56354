"""Sampling speed-up of feature caching (``skipdiff.skips.caching``) against its FLOP bound.

For each (branch, interval) of skip-branch caching, and encoder propagation at each interval, on two
UNets with random weights (speed does not depend on what the weights learned):

* ``digits``: the default job's ``SkipUNet2DModel`` (preset ``digits``, 8x8x4 latents) in
  ``SkipDiffPipeline`` (DDIM, ``--steps`` steps, no VAE: the latents are the output), ``--batch_size``
  images per run;
* ``sd``: a ``UNet2DConditionModel`` with Stable Diffusion 1.5's config (block_out_channels (320,
  640, 1280, 1280), cross-attention 768, 860 M parameters) in diffusers' own
  ``StableDiffusionPipeline`` (SD's DDIM scheduler, random text embeddings of 77 tokens,
  classifier-free guidance, ``output_type="latent"``) at ``--sd_latent`` latents and
  ``--sd_batch_size`` images: one 64x64-latent forward at batch 64 takes minutes on a CPU.

Each configuration is one sampling run with the cache put on the pipeline (``enable_skip_cache``:
the pipeline's scheduler drives the steps). Reported: the measured speed-up (median seconds of a run
without caching over the median with it; runs interleaved round-robin, the starting one rotating),
the FLOP bound ``T / (R + (T - R) f)`` for that run's ``R`` refreshes in ``T`` steps (equal to
``N / (1 + (N - 1) f)`` when N divides T), ``f`` being the fraction of a forward's FLOPs that a cached
step still spends (``torch.utils.flop_counter``, attention included), and measured / bound. ``f``
is also listed for every branch, and for the SD UNet at its real 64x64 latents (counted on the meta
device, no compute).

    python bench/skip_cache.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import parse_timing_args, time_interleaved  # noqa: E402  (bench/ is not a package)

from skipdiff import SkipUNet2DModel  # noqa: E402
from skipdiff.diffusion import make_scheduler  # noqa: E402
from skipdiff.eval.compute import cache_compute, speedup_bound  # noqa: E402
from skipdiff.pipeline import SkipDiffPipeline  # noqa: E402
from skipdiff.presets import unet_config  # noqa: E402
from skipdiff.skips.cache_options import SkipCacheOptions  # noqa: E402
from skipdiff.skips.caching import skip_cache  # noqa: E402
from skipdiff.skips.router import discover_skips  # noqa: E402

TARGET_RATIO = 0.9  # measured speed-up >= 0.9 of the FLOP bound (digits, batch 64, CPU)

# Stable Diffusion 1.5's UNet (stable-diffusion-v1-5/unet/config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    center_input_sample=False,
)
# ... and its scheduler, as DDIM.
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def digits_target(batch_size: int, steps: int) -> dict:
    """The default job's UNet in SkipDiffPipeline, and one UNet call's inputs for counting FLOPs."""
    torch.manual_seed(0)
    unet = SkipUNet2DModel(**unet_config("digits", sample_size=8, channels=4)).eval()
    scheduler = DDIMScheduler.from_config(
        make_scheduler(1000, "squaredcos_cap_v2", "epsilon", sample_range=None).config
    )
    pipe = SkipDiffPipeline(unet=unet, scheduler=scheduler)

    def sample() -> None:
        pipe(
            batch_size=batch_size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            show_progress=False,
        )

    return {
        "pipe": pipe,
        "sample": sample,
        "steps": steps,
        "flop_unet": unet,
        "probe": ((torch.zeros(1, 4, 8, 8), torch.tensor(500)), {}),
        "describe": {
            "unet": "digits preset SkipUNet2DModel (all skips keep), random weights",
            "latents": "8x8x4",
            "pipeline": f"SkipDiffPipeline, DDIM-{steps}, no VAE",
            "batch_size": batch_size,
            "parameters": sum(p.numel() for p in unet.parameters()),
        },
    }


def sd_target(batch_size: int, latent: int, steps: int) -> dict:
    """SD 1.5's UNet (random weights) in StableDiffusionPipeline with random text embeddings and CFG."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(batch_size, 77, 768, generator=generator)  # (B, tokens, 768): CLIP ViT-L/14's width
    negative = torch.randn(batch_size, 77, 768, generator=generator)

    def sample() -> None:
        pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=8 * latent,
            width=8 * latent,
            num_inference_steps=steps,
            guidance_scale=7.5,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )

    return {
        "pipe": pipe,
        "sample": sample,
        "steps": steps,
        "flop_unet": meta_sd_unet(),
        "probe": sd_probe(latent),
        "describe": {
            "unet": "UNet2DConditionModel with Stable Diffusion 1.5's config, random weights",
            "latents": f"{latent}x{latent}x4 (SD: 64x64x4; smaller here for CPU time)",
            "pipeline": f"diffusers StableDiffusionPipeline, DDIM-{steps}, guidance 7.5 (UNet batch "
            f"{2 * batch_size}), random 77x768 text embeddings, latents out",
            "batch_size": batch_size,
            "parameters": sum(p.numel() for p in unet.parameters()),
        },
    }


def meta_sd_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet on the meta device: FLOPs are counted without computing (same counts as on a CPU)."""
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET).eval()


def sd_probe(latent: int) -> tuple[tuple, dict]:
    """One UNet call of one image under guidance (a doubled batch), on the meta device."""
    sample = torch.zeros(2, 4, latent, latent, device="meta")  # (2B, 4, h, w)
    context = torch.zeros(2, 77, 768, device="meta")  # (2B, tokens, 768)
    return (sample, torch.tensor(500, device="meta")), {"encoder_hidden_states": context}


def configurations(num_skips: int, branches: list[int], intervals: list[int], propagation: list[int]) -> dict:
    """name -> options (None: no caching). Negative branches count from the outermost (-1 = K-1)."""
    out: dict[str, SkipCacheOptions | None] = {"none": None}
    for branch in branches:
        b = branch % num_skips if branch < 0 else branch
        for n in intervals:
            out[f"branch{b}-N{n}"] = SkipCacheOptions(cache="skip_branch", cache_branch=b, cache_interval=n)
    for n in propagation:
        out[f"propagation-N{n}"] = SkipCacheOptions(cache="encoder_propagation", cache_interval=n)
    return out


def flop_table(unet: torch.nn.Module, probe: tuple, intervals: list[int]) -> list[dict]:
    """f and the bound at each interval for every branch and for encoder propagation."""
    rows = []
    branches = [SkipCacheOptions(cache="skip_branch", cache_branch=info.index) for info in discover_skips(unet)]
    for options in [*branches, SkipCacheOptions(cache="encoder_propagation")]:
        f = cache_compute(unet, options, *probe, num_steps=2)["cached_fraction"]
        row = {"mode": options.cache, "branch": options.cache_branch, "cached_fraction": round(f, 4)}
        if options.cache_branch is not None:
            info = discover_skips(unet)[options.cache_branch]
            row.update(source=info.source, receiver=f"up_blocks.{info.up_block}.resnets.{info.layer}")
        row.update({f"bound_N{n}": round(speedup_bound(n, f), 3) for n in intervals})
        rows.append(row)
    return rows


def measure(target: dict, configs: dict, repeats: int, warmup: int) -> dict:
    """Time every configuration interleaved; speed-ups against no caching and against the FLOP bound."""
    calls: dict[str, dict] = {}

    def timed(name: str, options: SkipCacheOptions | None):
        def run() -> float:
            with skip_cache(target["pipe"], options) as cache:
                start = time.perf_counter()
                target["sample"]()
                seconds = time.perf_counter() - start
                if cache is not None:
                    calls[name] = {k: cache.stats[k] for k in ("refresh_calls", "cached_calls", "forced_refreshes")}
            return seconds

        return run

    times = time_interleaved({name: timed(name, o) for name, o in configs.items()}, (), repeats, warmup)
    base = statistics.median(times["none"])
    results = {"none": {"median_seconds": round(base, 4), "min_seconds": round(min(times["none"]), 4)}}
    for name, options in configs.items():
        if options is None:
            continue
        compute = cache_compute(target["flop_unet"], options, *target["probe"], num_steps=target["steps"])
        median = statistics.median(times[name])
        speedup = base / median
        per_repeat = statistics.median(b / t for b, t in zip(times["none"], times[name], strict=True))
        results[name] = {
            "mode": options.cache,
            "branch": options.cache_branch,
            "interval": options.cache_interval,
            "median_seconds": round(median, 4),
            "min_seconds": round(min(times[name]), 4),
            "cached_fraction": round(compute["cached_fraction"], 4),
            "refresh_steps": compute["refresh_steps"],
            "calls_last_run": calls[name],
            "cached_mib_per_probe": round(compute["cached_bytes"] / 2**20, 3),
            "speedup": round(speedup, 3),
            "speedup_median_per_repeat": round(per_repeat, 3),
            "bound": round(compute["bound_run"], 3),
            "bound_interval": round(compute["bound_interval"], 3),
            "ratio_to_bound": round(speedup / compute["bound_run"], 3),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64, help="digits: images per sampling run")
    parser.add_argument(
        "--steps", type=int, default=30, help="digits: DDIM steps (30: every interval 2, 3, 5 divides it)"
    )
    parser.add_argument(
        "--branches",
        type=int,
        nargs="+",
        default=[-1, -2, -3],
        help="skip branches to time (skip indices; negative from the outermost, -1 = K-1)",
    )
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5], help="digits: refresh intervals")
    parser.add_argument("--sd", action=argparse.BooleanOptionalAction, default=True, help="also the SD-shaped UNet")
    parser.add_argument("--sd_batch_size", type=int, default=1, help="SD: images per run (x2 under guidance)")
    parser.add_argument("--sd_latent", type=int, default=8, help="SD: latent height and width")
    parser.add_argument("--sd_steps", type=int, default=6, help="SD: DDIM steps")
    parser.add_argument("--sd_branches", type=int, nargs="+", default=[-1, -2])
    parser.add_argument("--sd_intervals", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--sd_repeats", type=int, default=3, help="SD: timed runs per configuration")
    args = parse_timing_args(parser)
    for name in ("steps", "sd_batch_size", "sd_latent", "sd_steps", "sd_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("intervals", "sd_intervals"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} must all be >= 1, got {getattr(args, name)}")
    started = time.perf_counter()

    report = {
        "bench": "skip_cache",
        "what": "sampling run time without / with feature caching, against the FLOP bound T / (R + (T-R) f)",
        "command": "python bench/skip_cache.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "repeats": args.repeats,
        "sd_repeats": args.sd_repeats,
        "warmup": args.warmup,
        "machine": platform.machine(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "target_ratio": TARGET_RATIO,
    }
    digits = digits_target(args.batch_size, args.steps)
    skips = len(discover_skips(digits["pipe"].unet))
    configs = configurations(skips, args.branches, args.intervals, args.intervals)
    results = measure(digits, configs, args.repeats, args.warmup)
    report["digits"] = {
        **digits["describe"],
        "steps": args.steps,
        "num_skips": skips,
        "results": results,
        "meets_target": {n: r["ratio_to_bound"] >= TARGET_RATIO for n, r in results.items() if n != "none"},
        "flops_per_branch": flop_table(digits["flop_unet"], digits["probe"], args.intervals),
    }
    if args.sd:
        sd = sd_target(args.sd_batch_size, args.sd_latent, args.sd_steps)
        skips = len(discover_skips(sd["pipe"].unet))
        configs = configurations(skips, args.sd_branches, args.sd_intervals, args.sd_intervals)
        report["sd"] = {
            **sd["describe"],
            "steps": args.sd_steps,
            "num_skips": skips,
            "results": measure(sd, configs, args.sd_repeats, args.warmup),
            "flops_per_branch": flop_table(sd["flop_unet"], sd["probe"], args.sd_intervals),
            "flops_per_branch_at_64x64_latents": flop_table(sd["flop_unet"], sd_probe(64), [2, 3, 5]),
        }
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
