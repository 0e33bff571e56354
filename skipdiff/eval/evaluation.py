"""Evaluate one study target: the measurements :class:`~.options.EvalOptions` asks for, into ``eval.json``.

    target = load_target("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype="float16")
    evaluate_target(target, EvalOptions(checkpoint=..., skip_importance=True, ...), out="runs/sd15/eval")

:func:`evaluate` loads the target named by ``options.checkpoint`` and calls :func:`evaluate_target`,
which an inference sweep calls directly with a target it loaded once and one skip specification per
cell (``options.skips``): the specification is applied for the evaluation only (weights untouched,
detached afterwards).

Order of work: every check that can fail (options against the target, data and its resolution and
channels, prompts, skip specs, the FID feature extractor, the CLIP model) runs before any sampling; then
the sample grid (one column per skip variant, all on the same noise), FID and CLIP score (the same
samples), the denoising loss and the skip importance (one noised batch per bucket, every ablation on
it), training stability and the MAP configuration of
stochastic skips (skipdiff runs). Results are written atomically with what was loaded and which weights
(:mod:`.results`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path

import torch
from diffusers.utils import numpy_to_pil

from ..grids import grid_layout, image_grid
from ..runfolder import EVAL_LOCK_FILE, RunLock, atomic_path, read_stats
from ..sampling import Samples, sample_images
from ..skips.unet import SkipUNet2DModel
from ..targets import StudyTarget, load_target
from . import plots
from .clip import clip_score_summary, load_clip
from .compute import cache_compute, map_compute
from .denoise import denoising_loss_by_bucket
from .extractor_choice import resolve_extractor
from .fid import fid_with_floor, images_to_uint8, real_splits, reference_and_heldout
from .importance import importance_heatmap, replay_flops, skip_importance
from .options import EvalOptions, resolve_reference
from .results import check_can_write, write_results
from .run import check_data_matches, data_dict, held_out_batches, sampling_prompts
from .stability import shattering_probe, stability_from_stats


def evaluate(options: EvalOptions) -> dict:
    """Load ``options.checkpoint`` (run folder, pipeline folder or Hub id) and evaluate it."""
    options.check_sources()
    target = load_target(
        options.checkpoint,
        subfolder=options.subfolder,
        revision=options.revision,
        variant=options.variant,
        torch_dtype=options.torch_dtype,
        use_ema=not options.no_ema,
        cache_dir=options.cache_dir,
    )
    return evaluate_target(target, options)


def default_out(options: EvalOptions, source: str | None = None) -> Path:
    """``<checkpoint>/eval`` (``eval-<skips>`` with --skips); Hub ids under ``runs/eval/<owner>--<name>``."""
    source = source or options.checkpoint
    local = Path(source)
    base = local if local.exists() else Path("runs/eval") / source.replace("/", "--")
    return base / ("eval" if options.skips is None else f"eval-{spec_slug(options.skips)}")


def spec_slug(spec: str) -> str:
    """A folder-name-safe form of a skip specification (hashed when long)."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec).strip("_")
    return slug if len(slug) <= 48 else f"{slug[:36]}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


@dataclasses.dataclass
class _Evaluation:
    """What one evaluation shares between its sections."""

    target: StudyTarget
    options: EvalOptions
    out: Path
    data: object = None  # DataOptions of the reference images, when any section needs them
    prompts: list[str] | None = None
    batches: list | None = None  # held-out batches (denoising loss, importance)
    extractor: object = None  # the FID feature extractor (ExtractorSpec), resolved before sampling
    clip: tuple | None = None  # (CLIPModel, CLIPProcessor), loaded before sampling
    samples: dict = dataclasses.field(default_factory=dict)  # seed -> Samples (uint8 images)
    timings: dict = dataclasses.field(default_factory=dict)

    def out_dir(self, name: str) -> Path:
        """``out/name``, creating ``out``."""
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / name


def evaluate_target(target: StudyTarget, options: EvalOptions, out: str | Path | None = None) -> dict:
    """Run the requested evaluations on ``target`` with ``options.skips`` applied; write ``eval.json``,
    ``eval.md`` and plots to ``out`` (default ``options.out``, else :func:`default_out`). Returns the result."""
    run = _Evaluation(target, options, Path(out or options.out or default_out(options, target.source)))
    _check(run)
    run.out.mkdir(parents=True, exist_ok=True)
    with RunLock(run.out, EVAL_LOCK_FILE, "evaluation", "wait for it to finish or choose another --out"):
        # Before any work: a result with other settings in the folder is never silently replaced.
        check_can_write(run.out, dataclasses.asdict(options), target.weights, _sections(options), options.overwrite)
        return _evaluate(run)


def _sections(options: EvalOptions) -> list[str]:
    """The ``eval.json`` sections these options compute (``map`` is added later, for stochastic skips)."""
    wanted = {
        "grid": options.wants_samples,
        "fid": options.fid,
        "clip_score": options.clip_score,
        "denoise": options.denoise_loss or options.skip_importance,
        "skip_importance": options.skip_importance,
        "grad_stability": options.grad_stability,
        "cache": _cache(options) is not None,
    }
    return [section for section, yes in wanted.items() if yes]


def _evaluate(run: _Evaluation) -> dict:
    """Every requested measurement, then ``eval.json`` (merged with the folder's, as checked)."""
    target, options = run.target, run.options
    result = {
        "checkpoint": options.checkpoint or target.source,
        "ema": target.identity.get("ema"),
        "target": {**target.describe(), "folder": None if target.folder is None else str(target.folder.resolve())},
        "weights": target.weights,
        "settings": dataclasses.asdict(options),
        "parameters": sum(p.numel() for p in target.unet.parameters()),
    }
    if _cache(options) is not None:
        result["cache"] = _cache_summary(run)
    if options.wants_samples:
        result["grid"] = _timed(run, "grid_seconds", _grid, run)
    spec = options.skips if options.skips is not None or hasattr(target.unet, "skip_router") else "full"
    with target.skips_applied(spec) as router:
        result["skips"] = router.describe()
        result["skip_spec"] = options.skips
        if options.fid:
            result["fid"] = _timed(run, "fid_seconds", _fid, run)
        if options.clip_score:
            result["clip_score"] = _timed(run, "clip_seconds", _clip, run)
        flagged = [s.flagged for s in run.samples.values() if s.flagged is not None]
        if flagged:
            result["safety_checker_flagged"] = sum(flagged)
        if options.denoise_loss or options.skip_importance:
            result.update(_timed(run, "denoise_seconds", _denoise_and_importance, run, router))
        if options.grad_stability:
            result["grad_stability"] = _stability(run)
        if options.map and _has_stochastic_skips(target.unet, router):
            result["map"] = _timed(run, "map_seconds", _score_map, run, router)
    result["timings"] = run.timings
    return write_results(run.out, result, Path(target.source).name, overwrite=options.overwrite)


def _timed(run: _Evaluation, key: str, function, *args):
    start = time.perf_counter()
    value = function(*args)
    run.timings[key] = time.perf_counter() - start
    return value


# --------------------------------------------------------------------------------------------------
# Checks, before any long work
# --------------------------------------------------------------------------------------------------


def _check(run: _Evaluation) -> None:
    """Options against the target, data, prompts and skip specs: every ``ValueError`` before any sampling."""
    target, options = run.target, run.options
    if options.clip_score and not target.text_conditioned:
        raise ValueError(
            f"--clip_score needs a text-conditioned pipeline; {target.source!r} is a "
            f"{target.identity['pipeline_class']}"
        )
    if options.grad_stability and (target.folder is None or not (target.folder / "stats.jsonl").is_file()):
        raise ValueError(f"--grad_stability needs {target.source}/stats.jsonl (a local skipdiff run folder)")
    for spec in [options.skips, *options.grid_variants]:
        if spec is not None:
            with target.skips_applied(spec):  # builds (and so checks) the spec, then restores the model
                pass
    needs_data = options.fid or options.denoise_loss or options.skip_importance
    captions = target.text_conditioned and options.wants_samples and not options.prompts
    if captions and options.caption_column is None:
        sampling_prompts(target, None, None)  # raises: text-conditioned, and neither prompts nor captions given
    if needs_data or captions:
        run.data = target.data_options(options.data_overrides())
    if needs_data:
        denoising = options.denoise_loss or options.skip_importance
        batches, channels = held_out_batches(
            run.data, options.denoise_batch_size, options.denoise_images if denoising else 1
        )
        check_data_matches(target, run.data, channels)
        run.batches = batches if denoising else None
    if options.wants_samples:
        run.prompts = sampling_prompts(target, options.prompts, run.data)
    elif options.prompts:
        sampling_prompts(target, options.prompts, None)  # a prompt file for a model that takes none is an error
    if options.fid:
        run.extractor = _extractor(options, run.data)  # a missing Inception download fails here
    if options.clip_score:
        run.clip = load_clip(options.clip_model, target.device, options.cache_dir)


def _has_stochastic_skips(unet, router) -> bool:
    return isinstance(unet, SkipUNet2DModel) and router is not None and any(g.stochastic for g in router.gates)


# --------------------------------------------------------------------------------------------------
# Samples: grid, FID, CLIP score
# --------------------------------------------------------------------------------------------------


def _sample(run: _Evaluation, count: int, seed: int, prompts: list[str] | None = None, start: int = 0) -> Samples:
    options = run.options
    resolution = run.data.resolution if run.data is not None and run.target.text_conditioned else None
    return sample_images(
        run.target,
        count,
        seed,
        steps=options.steps,
        sampler=options.sampler,
        batch_size=options.sample_batch_size,
        prompts=prompts or run.prompts,
        guidance_scale=options.guidance_scale,
        negative_prompt=options.negative_prompt,
        resolution=resolution,
        start=start,
        cache=_cache(options),
    )


def _cache_summary(run: _Evaluation) -> dict:
    """The cache settings, what a cached step still computes and the speed-up bound that allows
    (:func:`skipdiff.eval.compute.cache_compute`), for every kind of target: one image at the size it is
    sampled at, the run's step count; class labels or, for a text-conditioned UNet, one empty prompt through
    the pipeline's own text encoder(s) (the fraction is per image, so guidance's doubled batch leaves it as
    it is)."""
    target, cache = run.target, _cache(run.options)
    side = run.data.resolution if target.text_conditioned and run.data is not None else target.resolution
    shape = target.latent_shape(side)
    sample = torch.zeros(1, *shape, device=target.device, dtype=target.unet.dtype)  # (1, C, h, w)
    kwargs = {}
    if target.conditioning.kind == "class":
        kwargs = {"class_labels": torch.zeros(1, dtype=torch.long, device=target.device)}
    elif target.text_conditioned:
        pixels = torch.zeros(1, target.image_channels, side, side)  # only its size is read (SDXL's time ids)
        kwargs = target.conditioning.unet_kwargs({"captions": [""], "pixel_values": pixels})
    timestep = torch.tensor([500], device=target.device)
    compute = cache_compute(target.unet, cache, (sample, timestep), kwargs, num_steps=run.options.steps)
    compute["probe"] = {"batch": 1, "shape": list(shape), "conditioning": target.conditioning.kind}
    return {"options": dataclasses.asdict(cache), "compute": compute}


def _cache(options: EvalOptions):
    """The skip cache asked for (``--cache``), or None."""
    cache = options.caching
    return cache if cache.cache else None


def _grid(run: _Evaluation) -> dict:
    """``samples.png``: one prompt (or seed) per row, one skip variant per column, every column on the same
    noise; with a single variant, each row holds ``grid_size`` images of its prompt. Columns are labelled by
    variant, rows by prompt (or image index), the settings in the legend (:func:`skipdiff.grids.image_grid`)."""
    options, size, seed = run.options, run.options.grid_size, run.options.seeds[0]
    variants = [("original", None)] + ([("skips", options.skips)] if options.skips else [])
    variants += [(spec, spec) for spec in options.grid_variants]
    rows = [run.prompts[i % len(run.prompts)] for i in range(size)] if run.prompts else None
    if len(variants) == 1:  # rows of `size` images of one prompt each
        prompts = [rows[i // size] for i in range(size * size)] if rows else None
        images, columns, column_labels = _sample(run, size * size, seed, prompts).images, size, None
    else:
        columns_images = []
        for _, spec in variants:
            with run.target.skips_applied(spec):
                columns_images.append(_sample(run, size, seed, rows).images)  # (size, C, H, W)
        images = torch.stack(columns_images, dim=1).flatten(0, 1)  # row-major: row i, variant j
        columns, column_labels = len(variants), [_variant_label(spec) for _, spec in variants]
    row_labels = rows if rows else ([f"image {i}" for i in range(size)] if len(variants) > 1 else None)
    pil = numpy_to_pil(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
    style = dict(
        columns=columns,
        column_labels=column_labels,
        row_labels=row_labels,
        legend=_grid_legend(run, seed, len(variants) > 1),
    )
    with atomic_path(run.out_dir("samples.png")) as tmp:
        image_grid(pil, **style).save(tmp, format="PNG")
    layout, _ = grid_layout(len(pil), image_size=pil[0].size, **style)  # where each cell is (report sample sheets)
    return {
        "file": "samples.png",
        "variants": [spec for _, spec in variants],
        "rows": rows,
        "seed": seed,
        "layout": dataclasses.asdict(layout),
    }


def _variant_label(spec: str | None) -> str:
    """A grid column's label for a skip spec: ``original`` for None; a per-skip list that changes few skips
    names them (``skip 11: zero``) instead of listing every ``keep``."""
    if spec is None:
        return "original"
    entries = [e.strip() for e in spec.split(",")] if "," in spec else [spec]
    changed = [(k, e) for k, e in enumerate(entries) if e != "keep"]
    if len(entries) > 1 and 0 < len(changed) <= 2:
        return "; ".join(f"skip {k}: {e}" for k, e in changed)
    return spec


def _grid_legend(run: _Evaluation, seed: int, variants: bool) -> str:
    """The settings of ``samples.png``, written under it."""
    options, target = run.options, run.target
    parts = [str(target.source), f"{options.sampler}, {options.steps} steps", f"sampling seed {seed}"]
    if options.guidance_scale is not None:
        parts.append(f"guidance {options.guidance_scale:g}")
    if variants:
        parts.append("each row one noise, the same in every column")
    return " · ".join(parts)


def _fid(run: _Evaluation) -> dict:
    options, data = run.options, run.data
    real = real_splits(data_dict(data))
    reference = resolve_reference(options.reference, len(real["test"]), options.num_samples)
    reference_images, heldout = reference_and_heldout(real, reference)

    def sample_fn(count: int, seed: int) -> torch.Tensor:
        return _scored_samples(run, count, seed).images

    report = fid_with_floor(
        sample_fn,
        reference_images,
        heldout,
        run.extractor,
        num_samples=options.num_samples,
        seeds=options.seeds,
        kid=options.kid,
        prc=options.prc,
    )
    print(report.format())
    return report.to_dict()


def _extractor(options: EvalOptions, data):
    """The FID feature extractor: ``--feature_extractor``; ``auto`` is a built-in image set's own classifier
    (trained on the data's own train split), else Inception (:func:`.extractor_choice.resolve_extractor`)."""
    return resolve_extractor(options.feature_extractor, data=data, inception_weights=options.inception_weights)


def _scored_samples(run: _Evaluation, count: int, seed: int) -> Samples:
    """``count`` images of sampling seed ``seed`` for FID and CLIP score, kept (uint8) in ``run.samples`` and
    timed: eval.json's ``timings.sampling`` holds images and seconds per seed (the images are on the host
    when sampling returns, so the time is the whole sampling), what a report's measured speed-up reads."""
    start = time.perf_counter()
    samples = _sample(run, count, seed)
    seconds = time.perf_counter() - start
    run.samples[seed] = Samples(images_to_uint8(samples.images), samples.prompts, samples.flagged)
    sampling = run.timings.setdefault("sampling", {"per_seed": {}})
    sampling["per_seed"][str(seed)] = {"images": count, "seconds": seconds}
    sampling["images"] = sum(row["images"] for row in sampling["per_seed"].values())
    sampling["seconds"] = sum(row["seconds"] for row in sampling["per_seed"].values())
    return samples


def _clip(run: _Evaluation) -> dict:
    options = run.options
    model, processor = run.clip
    for seed in options.seeds:
        if seed not in run.samples:
            _scored_samples(run, options.num_samples, seed)
    per_seed = {seed: (s.images, s.prompts) for seed, s in run.samples.items() if seed in options.seeds}
    return clip_score_summary(per_seed, options.clip_model, model, processor)


# --------------------------------------------------------------------------------------------------
# Denoising loss and skip importance
# --------------------------------------------------------------------------------------------------


def _denoise_and_importance(run: _Evaluation, router) -> dict:
    """``denoise`` (and ``skip_importance``): the importance's baseline is the denoising loss itself."""
    target, options, batches = run.target, run.options, run.batches
    conditioning = None if target.conditioning.kind == "none" else target.conditioning.unet_kwargs
    out = {}
    if options.skip_importance:
        importance = skip_importance(
            target.unet,
            target.noise_scheduler,
            target.encoder,
            batches,
            options.importance_factors,
            options.buckets,
            seed=0,
            unet_kwargs=conditioning,
            router=router,
        )
        denoise = importance.pop("denoise")
        sample, timesteps, kwargs = _one_example(target, batches[0], conditioning)
        importance["flops"] = replay_flops(target.unet, router, sample, timesteps, kwargs)
        out["skip_importance"] = importance
        for factor in importance["factors"]:
            importance_heatmap(importance, factor, run.out_dir(f"skip_importance_{factor}.png"))
    else:
        denoise = denoising_loss_by_bucket(
            target.unet,
            target.noise_scheduler,
            target.encoder,
            batches,
            options.buckets,
            seed=0,
            unet_kwargs=conditioning,
        )
    denoise.pop("per_example")
    out["denoise"] = denoise
    plots.loss_by_timestep({Path(target.source).name: denoise}, run.out_dir("loss_by_timestep.png"))
    return out


def _one_example(target: StudyTarget, batch: dict, conditioning) -> tuple:
    """A noised latent (1, C, h, w), its timestep and UNet kwargs from a data batch (for FLOP counts)."""
    first = {k: v[:1] for k, v in batch.items()}
    first = {k: v.to(target.device) if isinstance(v, torch.Tensor) else v for k, v in first.items()}
    latents = target.encoder.latent_params(first["pixel_values"])[0]
    kwargs = conditioning(first) if conditioning else {}
    timesteps = torch.full((1,), target.noise_scheduler.config.num_train_timesteps // 2, device=target.device)
    return latents.to(target.unet.dtype), timesteps, kwargs


# --------------------------------------------------------------------------------------------------
# Training stability and stochastic skips (skipdiff runs)
# --------------------------------------------------------------------------------------------------


def _stability(run: _Evaluation) -> dict:
    target, options = run.target, run.options
    records = read_stats(target.folder / "stats.jsonl")
    stability = stability_from_stats(records, options.spike_window, options.spike_k)
    conditional = target.conditioning.kind == "class"
    stability["shattering"] = shattering_probe(
        target.unet, target.latent_shape(), class_label=0 if conditional else None
    )
    name = Path(target.source).name
    plots.grad_norms_over_training(records, run.out_dir("grad_norms.png"), name)
    plots.grad_norm_heatmap(records, run.out_dir("grad_norm_heatmap.png"), name)
    return stability


def _score_map(run: _Evaluation, router) -> dict:
    """The MAP configuration's closed skips and FLOPs saved, and its denoising loss / FID (as requested)."""
    target, options = run.target, run.options
    conditional = target.conditioning.kind == "class"
    result = map_compute(target.unet, target.latent_shape(), class_label=0 if conditional else None)
    previous = router.inference
    router.set_inference("map")
    try:
        if options.denoise_loss:
            kwargs = None if target.conditioning.kind == "none" else target.conditioning.unet_kwargs
            denoise = denoising_loss_by_bucket(
                target.unet,
                target.noise_scheduler,
                target.encoder,
                run.batches,
                options.buckets,
                seed=0,
                unet_kwargs=kwargs,
            )
            denoise.pop("per_example")
            result["denoise"] = denoise
        if options.fid:
            samples, run.samples = run.samples, {}
            sampling = run.timings.pop("sampling", None)  # the timings are of the model as it samples
            result["fid"] = _fid(run)
            run.samples = samples
            run.timings.pop("sampling", None)
            if sampling is not None:
                run.timings["sampling"] = sampling
    finally:
        router.set_inference(previous)
    return result
