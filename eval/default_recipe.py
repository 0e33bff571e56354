"""The default-recipe study: cost of each candidate, and its results gathered into a table.

The runs themselves are the cells of ``eval/sweeps/default_recipe.yaml`` (each the default job with one
change), run one by one with ``python -m skipdiff.sweep ... --only <cell>``. This script adds what the
sweep runner does not give:

    python eval/default_recipe.py bench --repeats 15        # seconds per UNet step, interleaved, vs the default
    python eval/default_recipe.py ema                       # the EMA schedule of each EMA candidate at 1200 steps
    python eval/default_recipe.py recon                     # FID of VAE reconstructions: the latent model's floor
    python eval/default_recipe.py collect                   # -> eval/results/default_recipe/{results.json,table.md,grids}

Cost (the issue's budget is wall-clock on an idle 2-core CPU, but the machine is shared): ``bench`` times
one training step of every candidate round-robin against the default in one process, so all of them see
the same machine state, and reports the ratio of medians; a candidate's cost is ``steps x s/step`` as a
ratio of the default's 1200 steps, converted to the idle machine with the default job's measured 8 min 58 s
(VAE stage 70 s of it, the same for every candidate).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from skipdiff.report.markdown import SIGN_FLIP_HEADING, comparison_section
from skipdiff.report.ranking import compare

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "runs" / "sweeps" / "default_recipe"
OUT = REPO / "eval" / "results" / "default_recipe"
DEFAULT_STEPS = 1200
SCREEN_SEED = 0  # the training seed the screen ran on: selection data, left out of the confirmation
IDLE_TOTAL_S = 8 * 60 + 58  # the default job on the idle 2-core CPU at 2 threads (README), VAE stage included
IDLE_VAE_S = 70
LATENT = (4, 8, 8)  # the default job's latents (C, H, W)

# label -> what changes the cost of a step (everything else in a candidate costs the same per step)
BENCH = {
    "default": {},
    "bs64": {"batch": 64},
    "bs96": {"batch": 96},
    "bs256": {"batch": 256},
    "snr5": {"snr_gamma": 5.0},
    "vpred": {"prediction_type": "v_prediction"},
}


# --------------------------------------------------------------------------------------------------
# bench: seconds per training step, interleaved
# --------------------------------------------------------------------------------------------------


def _step_closure(model_source: str, batch: int, prediction_type: str, snr_gamma: float | None, seed: int = 0):
    """One training step as the default job takes it: noise, forward, (Min-SNR) MSE, backward, clip to 1,
    fused AdamW, EMA update. Returns ``step() -> seconds``."""
    import torch

    from skipdiff.diffusion import make_scheduler, per_example_loss
    from skipdiff.presets import unet_config
    from skipdiff.skips.unet import SkipUNet2DModel
    from skipdiff.training.ema import WeightEMA

    torch.manual_seed(seed)
    unet = SkipUNet2DModel(**unet_config(model_source, sample_size=LATENT[1], channels=LATENT[0])).train()
    scheduler = make_scheduler(1000, "squaredcos_cap_v2", prediction_type, sample_range=None)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=1e-4, fused=True)
    ema = WeightEMA(unet.parameters())
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *LATENT, generator=generator)  # (B, 4, 8, 8)

    def step() -> float:
        start = time.perf_counter()
        noise = torch.randn(latents.shape)  # (B, 4, 8, 8)
        timesteps = torch.randint(0, 1000, (batch,))  # (B,)
        loss = per_example_loss(unet, scheduler, latents, noise, timesteps, snr_gamma=snr_gamma).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step()
        return time.perf_counter() - start

    return step, sum(p.numel() for p in unet.parameters())


def bench(labels: list[str], repeats: int, warmup: int, threads: int, models: dict[str, str]) -> dict:
    """Median seconds per step of each candidate, timed round-robin (start rotating) with the default."""
    import torch

    torch.set_num_threads(threads)
    specs = {label: BENCH.get(label, {}) for label in labels}
    for label, source in models.items():
        specs[label] = {"model": source}
    steps, params = {}, {}
    for label, spec in specs.items():
        steps[label], params[label] = _step_closure(
            spec.get("model", "digits"),
            spec.get("batch", 128),
            spec.get("prediction_type", "epsilon"),
            spec.get("snr_gamma"),
        )
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {label: [] for label in steps}
    names = list(steps)
    for repeat in range(repeats):
        start = repeat % len(names)
        for name in names[start:] + names[:start]:
            times[name].append(steps[name]())
    base = statistics.median(times["default"])
    return {
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "candidates": {
            label: {
                **specs[label],
                "parameters": params[label],
                "median_s_per_step": statistics.median(t),
                "ratio_vs_default": statistics.median(t) / base,
            }
            for label, t in times.items()
        },
    }


# --------------------------------------------------------------------------------------------------
# ema: the schedule
# --------------------------------------------------------------------------------------------------


def ema_profile(power: float, max_decay: float, inv_gamma: float = 1.0, steps: int = DEFAULT_STEPS) -> dict:
    """The EMA of skipdiff.training.ema at the end of ``steps`` updates: the final decay, which updates are
    capped, and the weight profile over training steps (its mean age and its std relative to the run's
    length, EDM2's sigma_rel measured on the actual profile, in units of the training length)."""
    weights = [0.0] * steps
    decays = []
    for t in range(steps):  # update t (0-based) contributes weight prod_{s>t} decay_s * (1 - decay_t)
        decay = 0.0 if t == 0 else min(max_decay, 1.0 - (1.0 + t / inv_gamma) ** -power)
        decays.append(decay)
    remaining = 1.0
    for t in range(steps - 1, -1, -1):
        weights[t] = remaining * (1.0 - decays[t])
        remaining *= decays[t]
    mean = sum((t + 1) * w for t, w in enumerate(weights))
    var = sum(((t + 1) - mean) ** 2 * w for t, w in enumerate(weights))
    capped = [t for t, d in enumerate(decays) if d >= max_decay]
    return {
        "power": power,
        "max_decay": max_decay,
        "inv_gamma": inv_gamma,
        "steps": steps,
        "final_decay": decays[-1],
        "first_capped_update": capped[0] if capped else None,
        "mean_age_steps": steps - mean,
        "std_steps": math.sqrt(var),
        "sigma_rel": math.sqrt(var) / steps,
        "weight_of_last_10pct": sum(weights[int(0.9 * steps) :]),
    }


# --------------------------------------------------------------------------------------------------
# recon: the VAE's own floor
# --------------------------------------------------------------------------------------------------


def recon_fid(vae_dir: str, num_samples: int, seeds: list[int]) -> dict:
    """FID of VAE reconstructions (posterior mean, decoded) of ``num_samples`` train images against the test
    split, next to the floor: the FID a perfect latent model (one that samples the train latents) would get."""
    import torch

    from skipdiff.data_options import DataOptions
    from skipdiff.encoders import load_encoder
    from skipdiff.eval.features import resolve_extractor
    from skipdiff.eval.fid import fid_with_floor, real_splits, reference_and_heldout

    options = {**vars(DataOptions())}
    real = real_splits(options)
    reference, heldout = reference_and_heldout(real, "test")  # as skipdiff.eval's auto (360 test < 1000)
    encoder = load_encoder(vae_dir, 1)
    pixels = heldout.images.float() / 127.5 - 1.0  # (N, 1, 16, 16) in [-1, 1]

    def sample_fn(count: int, seed: int) -> torch.Tensor:
        pick = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        with torch.no_grad():
            vae = encoder.vae
            latents = vae.encode(pixels[pick]).latent_dist.mean  # (n, 4, 8, 8)
            return vae.decode(latents).sample.clamp(-1, 1)  # (n, 1, 16, 16)

    spec = resolve_extractor("digits", resolution=16)
    report = fid_with_floor(sample_fn, reference, heldout, spec, num_samples=num_samples, seeds=seeds)
    print(report.format())
    return {
        "vae": vae_dir,
        "what": "reconstructions of the floor's own train images vs the test split",
        **report.to_dict(),
    }


# --------------------------------------------------------------------------------------------------
# denoise: the held-out denoising MSE in epsilon units, whatever the model predicts
# --------------------------------------------------------------------------------------------------


def epsilon_view(unet, scheduler):
    """``unet`` seen as an epsilon predictor: a v-prediction output becomes eps = sqrt(a) v + sqrt(1 - a) x_t
    (a = alpha_bar_t), so that models trained on different targets are compared on one loss."""
    from torch import nn

    class EpsilonView(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        @property
        def dtype(self):  # what the denoising loss casts its inputs to
            return self.unet.dtype

        @property
        def device(self):
            return self.unet.device

        def forward(self, noisy, timesteps, **kwargs):
            out = self.unet(noisy, timesteps, **kwargs).sample  # (B, C, H, W)
            kind = scheduler.config.prediction_type
            if kind == "epsilon":
                return type("Output", (), {"sample": out})
            alpha_bar = scheduler.alphas_cumprod.to(out.device)[timesteps].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            if kind != "v_prediction":
                raise ValueError(f"no epsilon view for prediction_type {kind!r}")
            eps = alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * noisy  # (B, C, H, W)
            return type("Output", (), {"sample": eps})

    return EpsilonView().eval().requires_grad_(False)


def denoise_epsilon(folder: Path) -> dict:
    """skipdiff.eval's held-out denoising loss (same images, timesteps and noise: seed 0, 10 buckets) of the
    run's EMA weights, measured as epsilon MSE for every prediction type."""
    from diffusers import DDPMScheduler

    from skipdiff.eval.denoise import denoising_loss_by_bucket
    from skipdiff.eval.run import held_out_batches, load_run

    pipeline, training, _ = load_run(str(folder))
    batches, _ = held_out_batches(training)
    scheduler = pipeline.scheduler
    epsilon_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="epsilon")
    result = denoising_loss_by_bucket(
        epsilon_view(pipeline.unet, scheduler), epsilon_scheduler, pipeline.encoder(), batches, 10, seed=0
    )
    result.pop("per_example")
    return result


# --------------------------------------------------------------------------------------------------
# collect: runs -> results.json, table.md, grids
# --------------------------------------------------------------------------------------------------


def _read_run(folder: Path) -> dict | None:
    cell_path, eval_path = folder / "cell.json", folder / "eval" / "eval.json"
    if not (cell_path.is_file() and eval_path.is_file()):
        return None
    cell, result = json.loads(cell_path.read_text()), json.loads(eval_path.read_text())
    if cell.get("status") != "done":
        return None
    axes = {a["axis"]: a["label"] for a in cell["axes"]}
    fid = result["fid"]["summary"]
    stats = [json.loads(line) for line in (folder / "stats.jsonl").read_text().splitlines() if line.strip()]
    seconds = [r["seconds_per_step"] for r in stats if "seconds_per_step" in r]
    run = {
        "cell": cell["name"],
        "recipe": axes.get("recipe"),
        "seed": cell["options"]["seed"],
        "overrides": {k: v for k, v in cell["overrides"].items() if k not in ("output_dir", "num_threads")},
        "steps": cell["train_metrics"].get("steps"),
        "final_train_loss": cell["train_metrics"].get("final_loss"),
        "fid": fid["fid"]["mean"],
        "fid_std_over_sampling_seeds": fid["fid"]["std"],
        "floor": fid["floor_fid"]["mean"],
        "floor_std": fid["floor_fid"]["std"],
        "fid_per_sampling_seed": [row["fid"] for row in result["fid"]["per_seed"]],
        "denoise_mse": result.get("denoise", {}).get("mean"),
        "denoise_target": cell["options"]["prediction_type"],
        "median_s_per_step_wall_shared_cpu": statistics.median(seconds) if seconds else None,
        "train_seconds_wall_shared_cpu": cell.get("train_seconds"),
        "eval_seconds": cell.get("eval_seconds"),
        "reference": result["fid"]["reference"],
        "heldout": result["fid"]["heldout"],
    }
    eps = folder / "eval" / "denoise_epsilon.json"
    if eps.is_file():
        run["denoise_mse_epsilon"] = json.loads(eps.read_text())["mean"]
    raw = folder / "eval_raw" / "eval.json"
    if raw.is_file():
        raw_fid = json.loads(raw.read_text())["fid"]["summary"]
        run["raw_weights_fid"] = raw_fid["fid"]["mean"]
    return run


def _grid(src: Path, dst: Path) -> None:
    from PIL import Image

    image = Image.open(src)
    image.resize((image.width // 2, image.height // 2), Image.NEAREST).save(dst, optimize=True)


def carried_runs(out: Path, present: set[str]) -> list[dict]:
    """The runs of the committed ``results.json`` whose cell has no finished folder in the sweep.

    Run folders are not committed, so a later session that adds seeds finds only its own cells; the
    committed records of the earlier cells are kept (marked ``carried``) instead of dropped or rerun.
    """
    committed = out / "results.json"
    if not committed.is_file():
        return []
    runs = json.loads(committed.read_text())["runs"]
    return [{**run, "carried": True} for run in runs if run["cell"] not in present]


def collect(sweep: Path, out: Path) -> dict:
    """Every finished cell -> ``results.json`` (each run, plus bench.json, ema.json, recon.json when written),
    ``table.md`` and the sample grids (``grids/<cell>.png``, half size). Cells already in the committed
    ``results.json`` whose folders are absent are carried over (:func:`carried_runs`)."""
    out.mkdir(parents=True, exist_ok=True)
    fresh = [r for folder in sorted(sweep.iterdir()) if folder.is_dir() and (r := _read_run(folder))]
    carried = carried_runs(out, {run["cell"] for run in fresh})
    runs = sorted(fresh + carried, key=lambda run: run["cell"])
    results = {
        "runs": runs,
        "confirmation": confirmation(runs),
        "confirmation_signflip": confirmation(runs, "sign-flip"),
    }
    results["bench"] = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("bench*.json"))}
    for name in ("ema", "recon", "notes"):
        if (out / f"{name}.json").is_file():
            results[name] = json.loads((out / f"{name}.json").read_text())
    (out / "grids").mkdir(exist_ok=True)
    for run in runs:
        src = sweep / run["cell"] / "eval" / "samples.png"
        if src.is_file():
            _grid(src, out / "grids" / f"{run['cell']}.png")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "table.md").write_text(table(results))
    return results


def confirmation(runs: list[dict], test: str = "t") -> dict | None:
    """FID of every recipe trained on several fresh seeds against the default job, paired by training seed and
    Holm-corrected (skipdiff.report.ranking.compare; ``test``: "t" or "sign-flip", which needs no normality but
    cannot reach p < 0.05 with fewer than 6 pairs); None until the default has two fresh seeds.

    The screen chose its winner on training seed ``SCREEN_SEED``, so that seed's runs are selection data and
    stay out of the confirmation.
    """
    fids: dict[str, dict[int, float]] = {}
    for run in runs:
        if run["seed"] != SCREEN_SEED:
            fids.setdefault(run["recipe"], {})[run["seed"]] = run["fid"]
    several = {recipe: by_seed for recipe, by_seed in fids.items() if len(by_seed) > 1}
    if len(several.get("default", {})) < 2 or len(several) < 2:
        return None
    return compare(several, "default", lower_is_better=True, test=test)


def _change(run: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(run["overrides"].items()) if k != "seed") or "(the default job)"


def _eps(run: dict) -> str:
    """The held-out denoising MSE in epsilon units (``denoise``), or skipdiff.eval's in the model's own target."""
    if "denoise_mse_epsilon" in run:
        return f"{run['denoise_mse_epsilon']:.4f}"
    return f"{run['denoise_mse']:.4f} ({run['denoise_target']} target)"


def _pm(values: list[float], digits: int = 3) -> str:
    """mean ± sample std (the value alone for one, '-' for none)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _cost(results: dict, run: dict) -> str:
    """Cost vs the default job: steps / 1200 x the s/step ratio measured for the run's model and batch size
    (mean over the bench*.json measurements that timed it); the other changes screened here leave a step's
    work unchanged (bench.json: snr5 and vpred within 0.02 of the default)."""
    model = run["overrides"].get("model", "digits")
    batch = run["overrides"].get("train_batch_size", 128)
    ratios = [
        v["ratio_vs_default"]
        for measured in results.get("bench", {}).values()
        for v in measured["candidates"].values()
        if v.get("batch", 128) == batch and v.get("model", "digits") == model
    ]
    return "not measured" if not ratios else f"{run['steps'] / DEFAULT_STEPS * statistics.fmean(ratios):.2f}"


def table(results: dict) -> str:
    """Markdown: the screen (seed 0, one row per recipe) and every recipe run with several seeds (paired)."""
    runs = results["runs"]
    by_recipe: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_recipe.setdefault(run["recipe"], {})[run["seed"]] = run
    lines = [
        "# Default-recipe ablations",
        "",
        "Every run is the default job (digits latents, 1200 UNet steps, batch 128) with the change shown; "
        "FID: digits extractor, 1000 samples x 3 sampling seeds, DDIM-50, reference = the test split (360 "
        "images), floor = 1000 train images vs the same reference. Generated by `python eval/default_recipe.py "
        "collect` from the runs of `eval/sweeps/default_recipe.yaml`.",
        "",
        "## Screen (training seed 0 only: a screen, not a result)",
        "",
        "| recipe | change | FID (± over sampling seeds) | floor | FID / floor | ΔFID vs its base | raw-weights FID | "
        "denoise MSE (ε units) | final train loss (own objective) | cost vs default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, seeds in sorted(by_recipe.items(), key=lambda kv: (kv[0] != "default", kv[0])):
        run = seeds.get(0)
        if run is None:
            continue
        # the base of "a+b" is "a" (a stacked change), of anything else the default job
        base = by_recipe.get(recipe.rsplit("+", 1)[0] if "+" in recipe else "default", {}).get(0)
        delta = f"{run['fid'] - base['fid']:+.3f} ({base['recipe']})" if base and base is not run else "-"
        raw = f"{run['raw_weights_fid']:.3f}" if "raw_weights_fid" in run else "-"
        lines.append(
            f"| {recipe} | {_change(run)} | {run['fid']:.3f} ± {run['fid_std_over_sampling_seeds']:.3f} | "
            f"{run['floor']:.3f} | {run['fid'] / run['floor']:.2f} | {delta} | {raw} | "
            f"{_eps(run)} | {run['final_train_loss']:.4f} | "
            f"{_cost(results, run)} |"
        )
    multi = {r: s for r, s in by_recipe.items() if len(s) > 1}
    if multi:
        lines += [
            "",
            "## Several training seeds (paired by seed)",
            "",
            "| recipe | "
            + " | ".join(f"FID seed {s}" for s in sorted({s for v in multi.values() for s in v}))
            + " | mean ± std (over training seeds) | floor | mean / floor | denoise MSE (ε units) |",
            "",
        ]
        all_seeds = sorted({s for v in multi.values() for s in v})
        lines[-1] = "|---|" + "---|" * len(all_seeds) + "---|---|---|---|"
        for recipe, seeds in sorted(multi.items(), key=lambda kv: (kv[0] != "default", kv[0])):
            fids = [seeds[s]["fid"] if s in seeds else None for s in all_seeds]
            present = [f for f in fids if f is not None]
            floor = statistics.fmean(r["floor"] for r in seeds.values())
            lines.append(
                f"| {recipe} | "
                + " | ".join("-" if f is None else f"{f:.3f}" for f in fids)
                + f" | {_pm(present)} | {floor:.3f} | {statistics.fmean(present) / floor:.2f} | "
                f"{_pm([r['denoise_mse_epsilon'] for r in seeds.values() if 'denoise_mse_epsilon' in r], 4)} |"
            )
    if results.get("confirmation"):
        heading = "## Against the default job (FID, fresh training seeds only, paired by seed, Holm-corrected)"
        lines += comparison_section(heading, results["confirmation"], "FID")
    if results.get("confirmation_signflip"):
        lines += comparison_section(SIGN_FLIP_HEADING, results["confirmation_signflip"], "FID")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="seconds per UNet step, interleaved with the default")
    b.add_argument("--labels", nargs="+", default=list(BENCH))
    b.add_argument("--model", nargs="*", default=[], help="label=config.json: a UNet candidate")
    b.add_argument("--repeats", type=int, default=15)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("ema", help="the EMA schedule of each candidate")
    e.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    r = sub.add_parser("recon", help="FID of the VAE's reconstructions")
    r.add_argument("--vae", required=True)
    r.add_argument("--num_samples", type=int, default=1000)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--threads", type=int, default=1)
    d = sub.add_parser("denoise", help="epsilon-unit denoising MSE of every finished run lacking it")
    d.add_argument("--sweep", default=str(SWEEP))
    d.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("collect", help="gather finished cells into eval/results/default_recipe")
    c.add_argument("--sweep", default=str(SWEEP))
    c.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.command == "bench":
        models = dict(item.split("=", 1) for item in args.model)
        print(json.dumps(bench(args.labels, args.repeats, args.warmup, args.threads, models), indent=2))
    elif args.command == "ema":
        rows = [
            ema_profile(p, d, steps=args.steps)
            for p, d in (
                (0.75, 0.999),
                (0.75, 0.9995),
                (0.75, 0.9999),
                (0.6667, 0.999),
                (0.85, 0.999),
                (1.0, 0.999),
                (1.0, 0.9995),
                (1.0, 0.9999),
            )
        ]
        print(json.dumps(rows, indent=2))
    elif args.command == "recon":
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(recon_fid(args.vae, args.num_samples, args.seeds), indent=2))
    elif args.command == "denoise":
        import torch

        torch.set_num_threads(args.threads)
        for folder in sorted(Path(args.sweep).iterdir()):
            target = folder / "eval" / "denoise_epsilon.json"
            if _read_run(folder) is not None and not target.is_file():
                target.write_text(json.dumps(denoise_epsilon(folder), indent=2) + "\n")
                print(folder.name, json.loads(target.read_text())["mean"])
    else:
        collect(Path(args.sweep), Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
