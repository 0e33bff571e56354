"""Steps per second of skipdiff's training loop against a loop written as diffusers' examples write it.

* ``ours_cached``: the training of ``train_scripts/train_unet.py`` itself (``skipdiff.training.unet_trainer.train_unet``)
  with the default job's options (latent diffusion on digits, 8x8x4 latents, batch 128, AdamW, cosine
  schedule with warm-up, gradient clipping, EMA, a ``stats.jsonl`` record every ``--log_every`` steps)
  and latents encoded once (``--cache_latents``, the default); ``ours_uncached``: the same with
  ``--no-cache_latents``, which encodes every batch through the VAE as the reference does.
* ``reference``: the loop of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
  / ``train_text_to_image.py``: an ``Accelerator``, the same ``SkipUNet2DModel`` (same preset, seed),
  data, batch, AdamW, schedule, clipping and EMA (their ``--use_ema``), and per step
  ``vae.encode(pixels).latent_dist.sample() * scaling_factor`` under ``no_grad``, ``randn_like``,
  ``randint`` timesteps, ``add_noise``, forward, MSE, ``accelerator.backward``, clip, step, ``loss.item()``.

* ``bare``: the limit: the same ``SkipUNet2DModel`` on the same cached latents and batch size, fused AdamW
  (the optimizer ours uses), in a plain loop (draw a batch, noise, timesteps, forward, MSE, backward,
  step) without logging, EMA, clipping, scheduling or checks.
* Where our loop's remaining time goes: ``ours_no_ema`` (``--no-use_ema``), ``ours_no_clip``
  (``--max_grad_norm 0``) and ``ours_minimal`` (both): the differences
  between these and ``ours_cached`` attribute the gap to the bare step.

Seconds per step are read from the run's own clock: ``seconds_per_step`` of each ``stats.jsonl`` record
for ours (the window between two records: data, encoding, step, EMA, telemetry), the same windows for the
reference; windows inside the first ``--warmup_steps`` are dropped, so start-up (imports, data loading,
latent caching, the final validation and export) is excluded. The variants run in one process,
interleaved (the order rotating every repeat); each is summarised per repeat by its median window.
A ratio between two variants is taken within each repeat (they ran minutes apart, not a whole session:
this machine's speed drifts by 10% over minutes) and summarised by the median over repeats, every
repeat's ratio listed. Wall time per call, start-up included, is reported too. JSON on stdout.

On a CPU our trainer raises glibc's malloc thresholds (:mod:`skipdiff.cpu_memory`) for the rest of its
process; the bench raises them once before any variant, so that every loop runs with the same allocator
and the ratios compare loops (``--default_malloc`` leaves glibc's defaults for all of them instead).

The VAE is ``runs/vae-digits-16`` when it exists, else a tiny one trained for a few steps into a
temporary folder (its quality does not matter for timing).

    python bench/train_loop.py --threads 1 --repeats 3 --steps 40                       # all variants
    python bench/train_loop.py --threads 1 --repeats 12 --steps 80 --variants ours_cached bare  # the limit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from skipdiff import cpu_memory
from skipdiff.report.stats import t_interval

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.0  # ours_cached must run at least as many steps per second as the reference
BARE_TARGET = 0.95  # ... and at least this fraction of the bare step's
VARIANTS = ("ours_cached", "ours_uncached", "reference", "bare", "ours_no_ema", "ours_no_clip", "ours_minimal")


# ---------------------------------------------------------------------------------------------------
# Shared with bench/sampling.py
# ---------------------------------------------------------------------------------------------------


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons, so several runs can follow each other in one process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_train_unet(argv: list[str]) -> dict:
    """The training of ``train_scripts/train_unet.py``'s command line ``argv`` (the library's
    ``unet_trainer.train_unet``) in this process, its prints sent to stderr (stdout carries the JSON)."""
    from skipdiff.config import parse_args
    from skipdiff.training import unet_trainer
    from skipdiff.training.options import TrainOptions

    reset_accelerate()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return unet_trainer.train_unet(parse_args(TrainOptions, argv))
    finally:
        reset_accelerate()


def find_or_train_vae(scratch: Path, threads: int) -> tuple[Path, str]:
    """(VAE folder, how it was obtained): the default job's ``--vae auto`` folder, or a tiny VAE trained
    into ``scratch``."""
    from skipdiff.training.options import TrainOptions
    from skipdiff.training.runtime import auto_vae_dir

    existing = REPO / auto_vae_dir(TrainOptions())
    if (existing / "config.json").is_file():
        return existing, str(existing.relative_to(REPO))
    from skipdiff.training.vae import train_vae
    from skipdiff.training.vae_options import VaeOptions

    folder = scratch / "vae"
    reset_accelerate()
    train_vae(VaeOptions(max_train_steps=20, num_threads=threads, output_dir=str(folder)))
    reset_accelerate()
    return folder, f"trained for 20 steps ({existing.relative_to(REPO)} missing)"


# ---------------------------------------------------------------------------------------------------
# The two loops
# ---------------------------------------------------------------------------------------------------


def ours(vae: Path, out: Path, steps: int, log_every: int, threads: int, cache: bool, extra: tuple = ()) -> dict:
    """``train_unet.main`` for ``steps`` steps; seconds per step per logging window."""
    argv = [
        *extra,
        "--vae",
        str(vae),
        "--output_dir",
        str(out),
        "--max_train_steps",
        str(steps),
        "--log_every",
        str(log_every),
        "--validation_every",
        "0",
        "--checkpointing_steps",
        "0",
        "--num_validation_images",
        "4",
        "--validation_inference_steps",
        "2",
        "--report_to",
        "none",
        "--num_threads",
        str(threads),
        "--cache_latents" if cache else "--no-cache_latents",
    ]
    start = time.perf_counter()
    run_train_unet(argv)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    windows = [(r["step"], r["seconds_per_step"]) for r in records if "seconds_per_step" in r]
    return {"windows": windows, "wall": wall}


def reference(vae_dir: Path, steps: int, log_every: int, threads: int, seed: int = 0) -> dict:
    """A loop written as diffusers' train_unconditional.py / train_text_to_image.py write it."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from skipdiff import SkipUNet2DModel
    from skipdiff.config import subset
    from skipdiff.data import collate_images, image_transform, load_image_splits, with_pixel_values
    from skipdiff.data_options import DataOptions
    from skipdiff.presets import unet_config
    from skipdiff.training.options import TrainOptions

    defaults = TrainOptions()  # the default job's settings
    start = time.perf_counter()
    reset_accelerate()
    torch.set_num_threads(threads)
    accelerator = Accelerator(gradient_accumulation_steps=1)
    set_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.requires_grad_(False)
    vae.eval()
    unet = SkipUNet2DModel(
        **unet_config(defaults.model, sample_size=defaults.resolution // 2, channels=vae.config.latent_channels)
    )
    ema = EMAModel(
        unet.parameters(),
        decay=defaults.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=1.0,
        power=3 / 4,
        model_cls=SkipUNet2DModel,
        model_config=unet.config,
    )
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=defaults.num_train_timesteps,
        beta_schedule=defaults.beta_schedule,
        prediction_type=defaults.prediction_type,
    )
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=defaults.learning_rate,
        betas=(defaults.adam_beta1, defaults.adam_beta2),
        weight_decay=defaults.adam_weight_decay,
        eps=defaults.adam_epsilon,
    )
    splits = load_image_splits(subset(DataOptions, defaults))
    dataset = with_pixel_values(splits["train"], image_transform(defaults.resolution, 1))
    loader = DataLoader(
        dataset,
        batch_size=defaults.train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_images,
        num_workers=defaults.dataloader_num_workers,
    )
    lr_scheduler = get_scheduler(
        defaults.lr_scheduler, optimizer, num_warmup_steps=defaults.lr_warmup_steps, num_training_steps=steps
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    vae.to(accelerator.device)
    ema.to(accelerator.device)

    progress = tqdm(total=steps, desc="reference", disable=not accelerator.is_local_main_process)
    windows, step, window_start = [], 0, time.perf_counter()
    unet.train()
    for _ in range(math.ceil(steps / len(loader))):
        for batch in loader:
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                prediction = unet(noisy, timesteps).sample
                if noise_scheduler.config.prediction_type == "v_prediction":  # as the examples write it
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(prediction.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), defaults.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(unet.parameters())
                progress.update(1)
                step += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": step}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=step)
            if step % log_every == 0:
                windows.append((step, (time.perf_counter() - window_start) / log_every))
                window_start = time.perf_counter()
            if step >= steps:
                break
        if step >= steps:
            break
    progress.close()
    accelerator.end_training()
    reset_accelerate()
    return {"windows": windows, "wall": time.perf_counter() - start}


def bare(vae_dir: Path, steps: int, log_every: int, threads: int, seed: int = 0) -> dict:
    """The limit: forward + backward + fused AdamW step of the same model on cached latents, nothing else."""
    from diffusers import AutoencoderKL
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from skipdiff import SkipUNet2DModel
    from skipdiff.config import subset
    from skipdiff.data import collate_images, image_transform, load_image_splits, with_pixel_values
    from skipdiff.data_options import DataOptions
    from skipdiff.diffusion import make_scheduler, training_target
    from skipdiff.encoders import VaeEncoder, cache_encoded
    from skipdiff.presets import unet_config
    from skipdiff.training.options import TrainOptions

    defaults = TrainOptions()
    start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    encoder = VaeEncoder(AutoencoderKL.from_pretrained(vae_dir))
    splits = load_image_splits(subset(DataOptions, defaults))
    images = with_pixel_values(splits["train"], image_transform(defaults.resolution, 1))
    latents = cache_encoded(encoder, DataLoader(images, batch_size=256, collate_fn=collate_images))["latent_mean"]
    unet = SkipUNet2DModel(
        **unet_config(defaults.model, sample_size=defaults.resolution // encoder.downscale, channels=encoder.channels)
    ).train()
    scheduler = make_scheduler(defaults.num_train_timesteps, defaults.beta_schedule, defaults.prediction_type, None)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=defaults.learning_rate, fused=True)
    windows, window_start = [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = latents[torch.randint(0, len(latents), (defaults.train_batch_size,))]  # (B, 4, 8, 8)
        noise = torch.randn_like(batch)
        timesteps = torch.randint(0, defaults.num_train_timesteps, (batch.shape[0],))
        prediction = unet(scheduler.add_noise(batch, noise, timesteps), timesteps).sample
        loss = F.mse_loss(prediction, training_target(scheduler, batch, noise, timesteps))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0:
            windows.append((step, (time.perf_counter() - window_start) / log_every))
            window_start = time.perf_counter()
    return {"windows": windows, "wall": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------


def ratios(per_repeat: dict[str, list[float]]) -> dict:
    """The comparisons among the variants that ran: ratios of steps/s, each the median over repeats of the
    ratio *within* a repeat (variants of one repeat run back to back, so machine drift between repeats
    cancels), with every repeat's ratio listed; and the attribution of the gap to the bare step."""

    def paired(numerator: str, denominator: str) -> dict:
        # steps/s ratio = seconds ratio inverted
        values = [d / n for n, d in zip(per_repeat[numerator], per_repeat[denominator], strict=True)]
        # A t interval of the mean log ratio over repeats, back on the ratio scale: how well the repeats
        # pin the ratio down on this machine (None with one repeat).
        interval = t_interval([math.log(v) for v in values])
        return {
            "median": round(statistics.median(values), 4),
            "per_repeat": [round(v, 4) for v in values],
            "geometric_mean": round(math.exp(statistics.fmean(math.log(v) for v in values)), 4),
            "interval_95": [round(math.exp(x), 4) for x in interval] if interval else None,
        }

    out: dict = {}
    if {"ours_cached", "reference"} <= per_repeat.keys():
        versus = paired("ours_cached", "reference")
        out["ratio_ours_cached_to_reference_steps_per_second"] = versus
        out["target_ratio_at_least"] = TARGET
        out["meets_target"] = versus["median"] >= TARGET
    if {"ours_uncached", "reference"} <= per_repeat.keys():
        out["ratio_ours_uncached_to_reference_steps_per_second"] = paired("ours_uncached", "reference")
    if {"ours_cached", "ours_uncached"} <= per_repeat.keys():
        out["latent_caching_speedup"] = paired("ours_cached", "ours_uncached")
    if {"ours_cached", "bare"} <= per_repeat.keys():
        versus = paired("ours_cached", "bare")
        out["ratio_ours_cached_to_bare_steps_per_second"] = versus
        out["bare_target_ratio_at_least"] = BARE_TARGET
        out["meets_bare_target"] = versus["median"] >= BARE_TARGET
        interval = versus["interval_95"]
        out["meets_bare_target_at_interval_lower_end"] = None if interval is None else interval[0] >= BARE_TARGET
    seconds = {name: statistics.median(v) for name, v in per_repeat.items()}
    gap = {
        "ema": ("ours_cached", "ours_no_ema"),
        "clipping_and_grad_norm": ("ours_cached", "ours_no_clip"),
        "loop_plumbing (minimal ours - bare: data loader, accelerate, window stats, logging)": ("ours_minimal", "bare"),
    }
    out["where_the_gap_goes_seconds_per_step"] = {
        part: round(seconds[a] - seconds[b], 5) for part, (a, b) in gap.items() if {a, b} <= seconds.keys()
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per call")
    parser.add_argument(
        "--log_every", type=int, default=10, help="steps per timing window (the default job logs every 10)"
    )
    parser.add_argument("--warmup_steps", type=int, default=10, help="windows ending at or before are dropped")
    parser.add_argument("--repeats", type=int, default=3, help="calls per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--default_malloc",
        action="store_true",
        help="leave glibc's malloc thresholds at their defaults for every variant (our trainer "
        "raises them on a CPU, skipdiff.cpu_memory; by default the bench raises them once "
        "for all variants, so that the ratios compare loops, not allocators)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="which loops to time (default: all); e.g. 'ours_cached bare' for the limit alone",
    )
    args = parser.parse_args()
    for name in ("steps", "log_every", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.steps < args.warmup_steps + args.log_every:
        parser.error("--steps must leave at least one window after --warmup_steps")
    torch.set_num_threads(args.threads)
    if args.default_malloc:  # the trainer would raise them on its first call, for the rest of the process
        cpu_memory.keep_freed_memory = lambda: False
    else:
        cpu_memory.keep_freed_memory()

    with tempfile.TemporaryDirectory(prefix="bench-train-loop-") as scratch:
        scratch = Path(scratch)
        vae, vae_source = find_or_train_vae(scratch, args.threads)

        def our_variant(name: str, cache: bool = True, extra: tuple = ()):
            return lambda r: ours(vae, scratch / f"{name}-{r}", args.steps, args.log_every, args.threads, cache, extra)

        minimal = ("--no-use_ema", "--max_grad_norm", "0")
        variants = {
            "ours_cached": our_variant("cached"),
            "ours_uncached": our_variant("uncached", cache=False),
            "reference": lambda r: reference(vae, args.steps, args.log_every, args.threads),
            "bare": lambda r: bare(vae, args.steps, args.log_every, args.threads),
            "ours_no_ema": our_variant("no-ema", extra=("--no-use_ema",)),
            "ours_no_clip": our_variant("no-clip", extra=("--max_grad_norm", "0")),
            "ours_minimal": our_variant("minimal", extra=minimal),
        }
        names = [name for name in VARIANTS if name in args.variants]
        results: dict[str, list[dict]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            start = repeat % len(names)
            for name in names[start:] + names[:start]:
                results[name].append(variants[name](repeat))

    per_repeat = {
        name: [statistics.median(s for step, s in r["windows"] if step > args.warmup_steps) for r in runs]
        for name, runs in results.items()
    }
    seconds = {name: statistics.median(v) for name, v in per_repeat.items()}
    steps_per_second = {name: 1.0 / v for name, v in seconds.items()}
    report = {
        "bench": "train_loop",
        "what": "steps/s of train_unet.main (default job: latent digits 8x8x4, batch 128, AdamW, EMA, clipping) "
        "vs a diffusers-examples loop encoding with the VAE every step, and vs the bare step",
        "vae": vae_source,
        "steps_per_call": args.steps,
        "log_every": args.log_every,
        "warmup_steps_dropped": args.warmup_steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "malloc": "glibc defaults"
        if args.default_malloc
        else "thresholds raised for every variant (skipdiff.cpu_memory)",
        "versions": {"torch": torch.__version__},
        "seconds_per_step_median": {name: round(v, 4) for name, v in seconds.items()},
        "seconds_per_step_per_repeat": {name: [round(x, 4) for x in v] for name, v in per_repeat.items()},
        "steps_per_second": {name: round(v, 3) for name, v in steps_per_second.items()},
        "wall_seconds_per_call_median": {
            name: round(statistics.median(r["wall"] for r in runs), 2) for name, runs in results.items()
        },
        **ratios(per_repeat),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
