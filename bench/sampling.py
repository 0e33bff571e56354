"""Sampling and evaluation speed: DDIM-50 images per second, digits feature extraction images per second,
and the wall time of ``python -m skipdiff.eval --fid --denoise_loss`` on the default model.

* ``sampling``: ``SkipDiffPipeline`` (DDIM, 50 steps, the VAE decoding the latents) with the ``digits``
  preset ``SkipUNet2DModel`` (random weights and the default job's 8x8x4 latents, or a trained run's EMA
  UNet with ``--checkpoint``) against the same pipeline holding a stock diffusers ``UNet2DModel`` with
  the same weights; interleaved, ratio of median seconds per batch.
* ``features``: the digits classifier that FID uses on digits (``skipdiff.eval.domain_extractor``, the
  torch-fidelity module built from ``resolve_extractor("digits")``) on uint8 16x16 images.
* ``evaluation``: ``skipdiff.eval.evaluate`` in this process with ``--fid --denoise_loss
  --num_samples 1000 --seeds 0 1 2`` on ``--eval_checkpoint`` (default ``runs/digits-latent``). When that
  run does not exist, a stand-in is made: the default job's options for 2 steps (the time evaluation
  takes depends on the architecture and the number of samples, not on how well the model was trained;
  its FID is meaningless and is not reported). ``--eval_checkpoint none`` skips it.

The VAE is ``runs/vae-digits-16`` when it exists, else a tiny one trained for a few steps. JSON on stdout.

    python bench/sampling.py --threads 1 --batch_size 128 --repeats 3
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

import diffusers
import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_loop import REPO, find_or_train_vae, run_train_unet  # noqa: E402  (bench/ is not a package)
from train_step import SKIP_KEYS  # noqa: E402

from skipdiff import SkipUNet2DModel  # noqa: E402
from skipdiff.diffusion import make_scheduler  # noqa: E402
from skipdiff.pipeline import SkipDiffPipeline  # noqa: E402
from skipdiff.presets import unet_config  # noqa: E402


def pipelines(checkpoint: str | None, vae_dir: Path) -> tuple[dict[str, SkipDiffPipeline], str]:
    """``{"skip": ..., "stock": ...}`` sampling pipelines with identical weights, and where they came from."""
    if checkpoint:
        from skipdiff.eval.run import load_run

        skip_pipeline, _, used_ema = load_run(checkpoint)
        skip, scheduler, vae = skip_pipeline.unet, skip_pipeline.scheduler, skip_pipeline.vae
        source = f"{checkpoint} ({'EMA' if used_ema else 'raw'} weights, skips {skip.config.skips!r})"
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir)
        torch.manual_seed(0)
        skip = SkipUNet2DModel(**unet_config("digits", sample_size=8, channels=vae.config.latent_channels))
        scheduler = make_scheduler(1000, "squaredcos_cap_v2", "epsilon", sample_range=None)  # latents: no clip
        source = "digits preset, random weights, 8x8x4 latents"
    stock = UNet2DModel(**{k: v for k, v in dict(skip.config).items() if k not in SKIP_KEYS and not k.startswith("_")})
    own = stock.state_dict()  # gate parameters and removed skips' weights have no counterpart in stock
    stock.load_state_dict(
        {k: v for k, v in skip.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False
    )
    return {
        "skip": SkipDiffPipeline(unet=skip.eval(), scheduler=scheduler, vae=vae),
        "stock": SkipDiffPipeline(unet=stock.eval(), scheduler=scheduler, vae=vae),
    }, source


def time_sampling(pipes: dict, batch_size: int, steps: int, repeats: int) -> dict[str, list[float]]:
    def once(pipe, seed: int) -> float:
        start = time.perf_counter()
        pipe(
            batch_size=batch_size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            sampler="ddim",
            output_type="pt",
            show_progress=False,
        )
        return time.perf_counter() - start

    names = list(pipes)
    for name in names:  # warm-up (small batch: allocator, caches)
        pipes[name](batch_size=2, num_inference_steps=2, sampler="ddim", output_type="pt", show_progress=False)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        start = repeat % len(names)
        for name in names[start:] + names[:start]:
            times[name].append(once(pipes[name], repeat))
    return times


@torch.no_grad()
def time_features(batch_size: int, repeats: int) -> dict:
    from skipdiff.data_options import DataOptions
    from skipdiff.eval import create_extractor, resolve_extractor

    spec = resolve_extractor("digits", data=DataOptions(resolution=16))  # trained and cached on first use (seconds)
    extractor = create_extractor(spec, cuda=torch.cuda.is_available())
    images = torch.randint(
        0, 256, (batch_size, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    extractor(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "extractor": spec.name,
        "batch_size": batch_size,
        "repeats": repeats,
        "median_seconds": round(median, 5),
        "images_per_second": round(batch_size / median, 1),
    }


def time_evaluation(
    checkpoint: str, scratch: Path, vae_dir: Path, num_samples: int, seeds: list[int], threads: int
) -> dict:
    from skipdiff.eval import EvalOptions, evaluate

    standin = checkpoint == "auto" and not (REPO / "runs" / "digits-latent" / "model_index.json").is_file()
    if checkpoint == "auto":
        checkpoint = str(REPO / "runs" / "digits-latent")
    if standin:
        checkpoint = str(scratch / "digits-latent-standin")
        run_train_unet(
            [
                "--vae",
                str(vae_dir),
                "--output_dir",
                checkpoint,
                "--max_train_steps",
                "2",
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
            ]
        )
    options = EvalOptions(
        checkpoint=checkpoint,
        fid=True,
        denoise_loss=True,
        num_samples=num_samples,
        seeds=seeds,
        out=str(scratch / "eval"),
        num_threads=threads,
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate(options)
    seconds = time.perf_counter() - start
    report = {
        "checkpoint": "stand-in: the default job's model after 2 steps (runs/digits-latent missing)"
        if standin
        else checkpoint,
        "command": f"python -m skipdiff.eval --checkpoint RUN --fid --denoise_loss --num_samples {num_samples} "
        f"--seeds {' '.join(map(str, seeds))}",
        "settings": {k: result["settings"][k] for k in ("sampler", "steps", "sample_batch_size", "feature_extractor")},
        "seconds_total": round(seconds, 1),
        "timings": {k: round(v, 1) for k, v in result["timings"].items()},
    }
    if not standin:
        report["fid"] = result.get("fid", {}).get("summary")
        report["denoise_mean"] = result.get("denoise", {}).get("mean")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a run folder to sample from (default: random digits UNet)")
    parser.add_argument("--batch_size", type=int, default=128, help="images per sampling call")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling calls per model")
    parser.add_argument("--feature_batch_size", type=int, default=500)
    parser.add_argument("--feature_repeats", type=int, default=10)
    parser.add_argument(
        "--eval_checkpoint",
        default="auto",
        help="run to evaluate: auto (runs/digits-latent or a stand-in), a folder, or none",
    )
    parser.add_argument("--eval_num_samples", type=int, default=1000)
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    for name in (
        "batch_size",
        "steps",
        "repeats",
        "feature_batch_size",
        "feature_repeats",
        "eval_num_samples",
        "threads",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as scratch:
        scratch = Path(scratch)
        vae_dir, vae_source = find_or_train_vae(scratch, args.threads)
        pipes, source = pipelines(args.checkpoint, vae_dir)
        times = time_sampling(pipes, args.batch_size, args.steps, args.repeats)
        median = {name: statistics.median(t) for name, t in times.items()}
        report = {
            "bench": "sampling",
            "threads": args.threads,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "vae": vae_source,
            "sampling": {
                "what": f"SkipDiffPipeline DDIM-{args.steps} incl. VAE decode, SkipUNet2DModel vs stock UNet2DModel",
                "unet": source,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "median_seconds_per_batch": {k: round(v, 3) for k, v in median.items()},
                "images_per_second": {k: round(args.batch_size / v, 2) for k, v in median.items()},
                "ratio_skip_to_stock_seconds": round(median["skip"] / median["stock"], 4),
            },
            "features": time_features(args.feature_batch_size, args.feature_repeats),
        }
        if args.eval_checkpoint != "none":
            report["evaluation"] = time_evaluation(
                args.eval_checkpoint, scratch, vae_dir, args.eval_num_samples, args.eval_seeds, args.threads
            )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
