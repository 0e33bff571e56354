"""``python -m skipdiff.eval``: score a training run (a run folder or a Hub id).

    python -m skipdiff.eval --checkpoint runs/digits-latent --fid --denoise_loss
    python -m skipdiff.eval --checkpoint runs/digits-latent --fid --kid --prc --num_samples 1000 --seeds 0 1 2
    python -m skipdiff.eval --checkpoint runs/a --grad_stability --skip_importance --importance_factors 0 0.5
    python -m skipdiff.eval --compare runs/a runs/b --out runs/compare      # side by side (each run evaluated first)

A model with stochastic skips (``markov``, ``bernoulli``) is scored as it samples by default (each gate
at its expected value); ``--map`` (on by default) adds its MAP configuration: which skips it closes,
the FLOPs that removing them saves (:mod:`.compute`), and the denoising loss and FID under ``map``.

Writes ``eval.json`` (every number and the settings that produced it), ``eval.md`` and PNG plots to
``--out`` (default ``<checkpoint>/eval``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ..config import option, parse_args, subset
from ..data_options import DataOptions
from ..runfolder import read_stats
from . import plots
from .compute import map_compute
from .denoise import denoising_loss_by_bucket
from .extractor_choice import EXTRACTOR_CHOICES, resolve_extractor
from .fid import fid_with_floor, real_splits, reference_and_heldout
from .importance import importance_heatmap, skip_importance
from .run import check_data_matches, held_out_batches, load_run, make_sampler
from .stability import shattering_probe, stability_from_stats


@dataclasses.dataclass
class EvalOptions:
    checkpoint: str | None = option(None, "a run folder of train_unet.py or a Hub model id")
    fid: bool = option(False, "FID against the real data, with the real-vs-real floor")
    kid: bool = option(False, "add KID (with --fid)")
    prc: bool = option(False, "add precision/recall (with --fid)")
    num_samples: int = option(1000, "generated images per seed")
    seeds: list[int] = option([0, 1, 2], "sampling seeds (mean ± std over them)")
    sampler: str = option("ddim", "ddpm or ddim", choices=("ddpm", "ddim"))
    steps: int = option(50, "sampling steps")
    sample_batch_size: int = option(500, "images per sampling batch")
    feature_extractor: str = option(
        "auto",
        f"{', '.join(EXTRACTOR_CHOICES)} or a classifier folder; auto: a built-in image set's own extractor "
        "(trained on the run's train split), else Inception",
    )
    inception_weights: str | None = option(None, "a local Inception-v3 weights file (offline use)")
    reference: str = option(
        "auto",
        "real split the samples are compared with: train, test, or auto (the larger one that leaves a floor)",
    )
    denoise_loss: bool = option(False, "held-out denoising MSE per timestep bucket (deterministic)")
    buckets: int = option(10, "timestep buckets for the denoising loss and skip importance")
    grad_stability: bool = option(False, "gradient stability from stats.jsonl, plus a shattering probe")
    spike_window: int = option(50, "window of the median + k*MAD spike rule")
    spike_k: float = option(6.0, "k of the spike rule")
    skip_importance: bool = option(False, "delta denoising loss when each skip alone is zeroed/scaled")
    importance_factors: list[float] = option([0.0], "factors each skip is scaled by (0 = zeroed)")
    no_ema: bool = option(False, "score the raw weights (unet_raw/) instead of the EMA weights (unet/)")
    map: bool = option(
        True,
        "with stochastic skips: also score the MAP configuration (closed skips, FLOPs saved, "
        "denoising loss and FID under map inference)",
    )
    compare: list[str] = option([], "run folders to put side by side (reads each <run>/eval/eval.json)")
    out: str | None = option(None, "output folder (default <checkpoint>/eval)")
    num_threads: int | None = option(None, "torch CPU threads")

    def validate(self) -> None:
        if not self.compare and not self.checkpoint:
            raise ValueError("give --checkpoint RUN (or --compare RUN_A RUN_B ...)")
        if self.checkpoint and not (
            self.fid or self.denoise_loss or self.grad_stability or self.skip_importance
        ):
            raise ValueError(
                "nothing to do: add --fid, --denoise_loss, --grad_stability and/or --skip_importance"
            )
        for name in ("num_samples", "steps", "sample_batch_size", "buckets", "spike_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.fid and self.num_samples < 2:
            raise ValueError(f"--num_samples must be >= 2 for FID, got {self.num_samples}")
        if (self.kid or self.prc) and not self.fid:
            raise ValueError("--kid and --prc need --fid")
        if self.reference not in ("auto", "train", "test"):
            raise ValueError(f"--reference must be auto, train or test, got {self.reference!r}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if any(f < 0 for f in self.importance_factors):
            raise ValueError(f"--importance_factors must be >= 0, got {self.importance_factors}")


def evaluate(options: EvalOptions) -> dict:
    """Run the requested evaluations on one checkpoint; write eval.json, eval.md and plots."""
    pipeline, training, used_ema = load_run(options.checkpoint, use_ema=not options.no_ema)
    out = Path(options.out or Path(options.checkpoint) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    batches, channels = held_out_batches(training)
    check_data_matches(pipeline, training, channels)
    conditional = pipeline.unet.config.num_class_embeds is not None
    result: dict = {"checkpoint": options.checkpoint, "ema": used_ema, "settings": dataclasses.asdict(options),
                    "parameters": sum(p.numel() for p in pipeline.unet.parameters()),
                    "skips": pipeline.unet.describe_skips()}  # fmt: skip
    timings = {}
    if options.fid:
        start = time.perf_counter()
        result["fid"] = _fid(options, pipeline, training, channels)
        timings["fid_seconds"] = time.perf_counter() - start
        grid = make_sampler(
            pipeline, options.sampler, options.steps, 64, pipeline.unet.config.num_class_embeds
        )(64, 0)
        _save_grid(grid, out / "samples.png")
    if options.denoise_loss or options.skip_importance:
        start = time.perf_counter()
        denoise = denoising_loss_by_bucket(pipeline.unet, pipeline.scheduler, pipeline.encoder(), batches,
                                           options.buckets, seed=0, conditional=conditional)  # fmt: skip
        denoise.pop("per_example")
        result["denoise"] = denoise
        timings["denoise_seconds"] = time.perf_counter() - start
        plots.loss_by_timestep({Path(options.checkpoint).name: denoise}, out / "loss_by_timestep.png")
    if options.grad_stability:
        stats_path = Path(options.checkpoint) / "stats.jsonl"
        if not stats_path.is_file():
            raise ValueError(f"--grad_stability needs {stats_path} (a local run folder)")
        records = read_stats(stats_path)
        stability = stability_from_stats(records, options.spike_window, options.spike_k)
        stability["shattering"] = shattering_probe(
            pipeline.unet, _latent_shape(pipeline), class_label=0 if conditional else None
        )
        result["grad_stability"] = stability
        plots.grad_norms_over_training(records, out / "grad_norms.png", Path(options.checkpoint).name)
        plots.grad_norm_heatmap(records, out / "grad_norm_heatmap.png", Path(options.checkpoint).name)
    if options.skip_importance:
        start = time.perf_counter()
        importance = skip_importance(pipeline.unet, pipeline.scheduler, pipeline.encoder(), batches,
                                     options.importance_factors, options.buckets, seed=0,
                                     conditional=conditional)  # fmt: skip
        result["skip_importance"] = importance
        timings["importance_seconds"] = time.perf_counter() - start
        for factor in importance["factors"]:
            importance_heatmap(importance, factor, out / f"skip_importance_{factor}.png")
    if options.map and _has_stochastic_skips(pipeline.unet):
        start = time.perf_counter()
        result["map"] = _score_map(options, pipeline, training, channels, batches, conditional)
        timings["map_seconds"] = time.perf_counter() - start
    result["timings"] = timings
    (out / "eval.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "eval.md").write_text(summary_markdown({Path(options.checkpoint).name: result}))
    return result


def _has_stochastic_skips(unet) -> bool:
    router = getattr(unet, "skip_router", None)
    return router is not None and any(gate.stochastic for gate in router.gates)


def _score_map(options: EvalOptions, pipeline, training: dict, channels: int, batches, conditional: bool) -> dict:
    """The MAP configuration's closed skips and FLOPs saved, and its denoising loss / FID (as requested)."""
    router = pipeline.unet.skip_router
    result = map_compute(pipeline.unet, _latent_shape(pipeline), class_label=0 if conditional else None)
    previous = router.inference
    router.set_inference("map")
    try:
        if options.denoise_loss:
            denoise = denoising_loss_by_bucket(pipeline.unet, pipeline.scheduler, pipeline.encoder(), batches,
                                               options.buckets, seed=0, conditional=conditional)  # fmt: skip
            denoise.pop("per_example")
            result["denoise"] = denoise
        if options.fid:
            result["fid"] = _fid(options, pipeline, training, channels)
    finally:
        router.set_inference(previous)
    return result


def _latent_shape(pipeline) -> tuple[int, int, int]:
    """(C, H, W) of one sample the UNet denoises."""
    return (pipeline.unet.config.in_channels, *(_sample_size(pipeline),) * 2)


def _sample_size(pipeline) -> int:
    size = pipeline.unet.config.sample_size
    return size[0] if isinstance(size, list | tuple) else size


def _fid(options: EvalOptions, pipeline, training: dict, channels: int) -> dict:
    spec = resolve_extractor(options.feature_extractor, data=subset(DataOptions, training),
                             inception_weights=options.inception_weights)  # fmt: skip
    real = real_splits(training)
    reference = options.reference
    if reference == "auto":  # compare with the larger split when the smaller one can still give the floor
        reference = "train" if len(real["test"]) >= options.num_samples else "test"
    reference_images, heldout = reference_and_heldout(real, reference)
    sample_fn = make_sampler(pipeline, options.sampler, options.steps, options.sample_batch_size,
                             pipeline.unet.config.num_class_embeds)  # fmt: skip
    report = fid_with_floor(sample_fn, reference_images, heldout, spec, num_samples=options.num_samples,
                            seeds=options.seeds, kid=options.kid, prc=options.prc)  # fmt: skip
    print(report.format())
    return report.to_dict()


def _save_grid(images: torch.Tensor, path: Path) -> None:
    from ..pipeline import image_grid, numpy_to_pil

    pil = numpy_to_pil(((images + 1) / 2).permute(0, 2, 3, 1).numpy())
    image_grid(pil, columns=8, scale=max(1, 64 // pil[0].width)).save(path)


def summary_markdown(results: dict[str, dict]) -> str:
    """One table, one row per run: FID (± std, floor), denoising loss, stability, parameters."""
    lines = ["| run | FID (mean ± std) | floor | denoise MSE | first/last grad | grad CV | loss spikes | "
             "shattering lag-1 | parameters |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, result in results.items():
        fid = result.get("fid", {}).get("summary", {})
        stability = result.get("grad_stability", {})
        lines.append("| " + " | ".join([
            name,
            _pm(fid.get("fid")), _pm(fid.get("floor_fid")),
            _num(result.get("denoise", {}).get("mean")),
            _num(stability.get("first_to_last_ratio_median")), _num(stability.get("grad_norm_cv")),
            str(stability.get("loss_spikes", "")), _num(stability.get("shattering", {}).get("lag1_autocorrelation")),
            f"{result.get('parameters', 0):,}",
        ]) + " |")  # fmt: skip
    settings = next(iter(results.values())).get("settings", {})
    lines += ["", f"Samples per seed: {settings.get('num_samples')}, seeds {settings.get('seeds')}, "
              f"{settings.get('sampler')}-{settings.get('steps')}; denoising loss: {settings.get('buckets')} timestep "
              "buckets, fixed noise (seed 0), test split."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _pm(entry) -> str:
    if not entry:
        return ""
    return f"{entry['mean']:.3g}" + ("" if entry.get("std") is None else f" ± {entry['std']:.2g}")


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"


def compare(runs: list[str], out: str | None) -> str:
    """Side-by-side table and loss-by-timestep plot of runs that were evaluated already."""
    results = {}
    for run in runs:
        path = Path(run) / "eval" / "eval.json"
        if not path.is_file():
            raise ValueError(
                f"{path} does not exist: evaluate {run!r} first (python -m skipdiff.eval --checkpoint {run} ...)"
            )
        results[Path(run).name] = json.loads(path.read_text())
    folder = Path(out or "runs/compare")
    folder.mkdir(parents=True, exist_ok=True)
    table = summary_markdown(results)
    (folder / "compare.md").write_text(table)
    denoised = {name: r["denoise"] for name, r in results.items() if "denoise" in r}
    if denoised:
        plots.loss_by_timestep(denoised, folder / "loss_by_timestep.png")
    return table


def main(argv: list[str] | None = None) -> None:
    options = parse_args(EvalOptions, argv, description=__doc__)
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    if options.compare:
        print(compare(options.compare, options.out))
        return
    result = evaluate(options)
    print(summary_markdown({Path(options.checkpoint).name: result}))
    print(f"wrote {Path(options.out or Path(options.checkpoint) / 'eval')}/eval.json")


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
