"""Evaluation results on disk: ``eval.json`` and ``eval.md``, and several results side by side.

``eval.json`` holds every number, the settings that produced it, what was loaded (``target``) and which
weights were scored (``weights``: a digest of the weight files per component, or the Hub commit). A
second evaluation into the same folder adds its sections to ``eval.json`` when the settings both depend on
agree, and is refused otherwise (``--overwrite`` replaces the file; :func:`check_can_write`). A
result is *current* while the folder's weights still have that digest (:func:`result_is_current`);
:func:`compare` refuses results whose weights changed since they were computed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..runfolder import read_json, write_json_atomic, write_text_atomic

RESULTS_FILE = "eval.json"
SUMMARY_FILE = "eval.md"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Several evaluations into one folder: sections merge, differing settings are refused
# --------------------------------------------------------------------------------------------------

# The measured sections of eval.json, and the settings (EvalOptions fields) each one's numbers depend on.
_SAMPLING = ("num_samples", "seeds", "sampler", "steps", "guidance_scale", "negative_prompt", "prompts")
_DENOISING = ("buckets", "denoise_images")
SECTION_SETTINGS = {
    "fid": (*_SAMPLING, "feature_extractor", "inception_weights", "reference"),
    "clip_score": (*_SAMPLING, "clip_model"),
    "safety_checker_flagged": _SAMPLING,
    "grid": (*_SAMPLING, "grid_size", "grid_variants"),
    "denoise": _DENOISING,
    "skip_importance": (*_DENOISING, "importance_factors"),
    "grad_stability": ("spike_window", "spike_k"),
    "map": (*_SAMPLING, "feature_extractor", "inception_weights", "reference", *_DENOISING),
    "cache": (),
}
# Settings that change no number (speed, where to write, what to run): never a conflict. The checkpoint's
# path is not compared either: the weights' digest says whether two results scored the same model (a
# moved or copied run folder is the same model).
NEUTRAL_SETTINGS = frozenset(
    {
        "checkpoint",
        "num_threads",
        "out",
        "compare",
        "sample_batch_size",
        "denoise_batch_size",
        "cache_dir",
        "overwrite",
        "fid",
        "kid",
        "prc",
        "clip_score",
        "grid",
        "denoise_loss",
        "skip_importance",
        "grad_stability",
        "map",
    }
)
_SECTION_KEYS = frozenset(k for keys in SECTION_SETTINGS.values() for k in keys)


def _plain(value):
    return json.loads(json.dumps(value, default=str))  # tuples and lists compare equal, as saved


def _common_settings(settings: dict) -> set[str]:
    """The settings every section depends on: what was loaded (checkpoint, dtype, EMA), the skips, the cache
    and the data; every setting that is neither a section's own nor neutral."""
    return set(settings) - NEUTRAL_SETTINGS - _SECTION_KEYS


def result_conflicts(existing: dict, new: dict) -> list[str]:
    """Why ``new`` (a result about to be written) cannot join ``existing`` (the folder's eval.json, of the
    same weights): a setting every section depends on, or a setting of a section both hold, that differs,
    each as ``name: existing X vs now Y``. Empty: they merge."""
    before, now = _plain(existing.get("settings")), _plain(new.get("settings", {}))
    if not isinstance(before, dict):
        return ["settings: the existing eval.json records none"]
    conflicts = []
    keys = _common_settings(now) | _common_settings(before)
    for section in SECTION_SETTINGS:
        if section in existing and section in new:
            keys |= set(SECTION_SETTINGS[section])
    for key in sorted(keys):
        if before.get(key) != now.get(key):
            conflicts.append(f"{key}: existing {before.get(key)!r} vs now {now.get(key)!r}")
    return conflicts


def merge_results(existing: dict, new: dict) -> dict:
    """``new``'s sections over ``existing``'s: a section both hold is ``new``'s (same settings: the same
    numbers again), the others are kept; ``settings`` keeps each kept section's own settings and the flags
    of both evaluations."""
    merged = {**existing, **new}
    settings = dict(existing["settings"])
    computed = [section for section in SECTION_SETTINGS if section in new]
    for key, value in new["settings"].items():
        if key in _common_settings(new["settings"]) or any(key in SECTION_SETTINGS[s] for s in computed):
            settings[key] = value
        elif key in NEUTRAL_SETTINGS and isinstance(value, bool):
            settings[key] = bool(settings.get(key)) or value  # what was measured, by either evaluation
        elif key not in settings:
            settings[key] = value
    merged["settings"] = settings
    merged["timings"] = {**existing.get("timings", {}), **new.get("timings", {})}
    return merged


def check_can_write(folder: Path, new_settings: dict, weights, sections: list[str], overwrite: bool) -> None:
    """Before any work: refuse (``ValueError``) an evaluation whose settings differ from those of the
    folder's eval.json, naming the folder and the differing settings, unless ``overwrite``. ``sections``:
    the sections the new evaluation will compute."""
    path = Path(folder) / RESULTS_FILE
    if overwrite or not path.is_file():
        return
    existing = read_json(path, "evaluation result")
    if _stale(existing, weights):
        return
    conflicts = result_conflicts(existing, {"settings": new_settings, "weights": weights, **dict.fromkeys(sections)})
    if conflicts:
        raise ValueError(
            f"{str(path)!r} holds results of an evaluation with other settings ({'; '.join(conflicts)}): "
            "choose another --out to keep both, or replace it with --overwrite"
        )


def _stale(existing: dict, weights) -> bool:
    """Whether ``existing`` scored other weights than ``weights`` (the folder's now): its numbers describe
    weights that are gone, so a new evaluation replaces it whole instead of merging with it."""
    return existing.get("weights") is not None and existing.get("weights") != _plain(weights)


def write_results(folder: Path, result: dict, label: str, overwrite: bool = False) -> dict:
    """``eval.json`` (atomically) and ``eval.md`` in ``folder``: merged with the eval.json there when its
    settings agree (:func:`merge_results`), replaced with ``overwrite`` or when it scored other weights
    (stale), else refused (:func:`check_can_write`, which the evaluation calls before any work). Returns
    what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULTS_FILE
    existing = read_json(path, "evaluation result") if path.is_file() and not overwrite else None
    if existing is not None and _stale(existing, result.get("weights")):
        logger.warning("%r scored other weights than these (retrained since?): replaced", str(path))
        existing = None
    if existing is not None:
        conflicts = result_conflicts(existing, result)
        if conflicts:
            raise ValueError(
                f"{str(path)!r} holds results of an evaluation with other settings "
                f"({'; '.join(conflicts)}): replace it with --overwrite"
            )
        result = merge_results(existing, result)
    write_json_atomic(path, result, default=float, sort_keys=False)
    write_text_atomic(folder / SUMMARY_FILE, summary_markdown([(label, result)]))
    return result


def result_is_current(result: dict, folder: str | os.PathLike | None = None) -> str | None:
    """None when the weights a result scored are still those of its local source (``folder``, default the
    folder recorded in the result); else why not."""
    # heavy: torch and diffusers (targets) only to check a result's weights (eval's CLI imports this before torch)
    from ..targets import weights_changed

    weights = result.get("weights")
    folder = folder or (result.get("target") or {}).get("folder")
    if not weights or not folder:
        return None  # a Hub snapshot (pinned by its commit) or a result written before weights were recorded
    return weights_changed(folder, weights)


def read_results(folder: str | os.PathLike, check_weights: bool = True) -> dict:
    """``<folder>/eval.json`` (``folder`` is an evaluated run or an eval folder); ``ValueError`` when it is
    missing, or (``check_weights``) when the weights it scored have changed since."""
    folder = Path(folder)
    path = folder / RESULTS_FILE if (folder / RESULTS_FILE).is_file() else folder / "eval" / RESULTS_FILE
    if not path.is_file():
        raise ValueError(
            f"{str(folder / 'eval' / RESULTS_FILE)!r} does not exist: evaluate {str(folder)!r} first "
            f"(python -m skipdiff.eval --checkpoint {folder} ...)"
        )
    result = read_json(path, "evaluation result")
    source = folder if path.parent.parent == folder else None  # <run>/eval/eval.json: the run is here, even if moved
    stale = result_is_current(result, source) if check_weights else None
    if stale:
        raise ValueError(f"{str(path)!r} scored other weights than the folder holds now ({stale}): evaluate it again")
    return result


def labels_for(paths: list[str]) -> list[str]:
    """Row labels for results at ``paths``: the folder name when it is unique among distinct folders, else the
    shortest trailing part of the path that tells them apart (``a/run`` and ``b/run``)."""
    resolved = [Path(p).resolve() for p in paths]
    labels = []
    for path in resolved:
        others = {r for r in resolved if r != path}
        depth = 1
        while depth < len(path.parts) and any(r.parts[-depth:] == path.parts[-depth:] for r in others):
            depth += 1
        labels.append("/".join(path.parts[-depth:]))
    return labels


def compare(runs: list[str], out: str | None) -> str:
    """Side-by-side table and loss-by-timestep plot of results computed already: one row per folder (keyed by
    its full path: ``a/run`` and ``b/run`` are two rows, a folder given twice is one), each checked against
    the folder's current weights."""
    # heavy: matplotlib and torch (plots) only to compare runs (eval's CLI imports this before torch)
    from . import plots

    unique: dict[str, str] = {}  # keyed by full path
    for run in runs:
        unique.setdefault(str(Path(run).resolve()), run)
    runs = list(unique.values())
    results = [read_results(run) for run in runs]
    rows = list(zip(labels_for(runs), results, strict=True))
    folder = Path(out or "runs/compare")
    folder.mkdir(parents=True, exist_ok=True)
    table = summary_markdown(rows)
    write_text_atomic(folder / "compare.md", table)
    denoised = {label: result["denoise"] for label, result in rows if "denoise" in result}
    if denoised:
        plots.loss_by_timestep(denoised, folder / "loss_by_timestep.png")
    return table


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def summary_markdown(results) -> str:
    """One table, one row per result: FID (± std, floor), CLIP score, denoising loss, stability, parameters
    (and the skip cache with its FLOP bound, when any result sampled with one); then what each result
    computed and with which settings (once when every result says the same, else one line per result).
    ``results``: ``[(label, result)]`` or a dict label -> result."""
    rows = list(results.items()) if isinstance(results, dict) else list(results)
    cached = any("cache" in result for _, result in rows)
    header = [
        "run",
        "FID (mean ± std)",
        "floor",
        "CLIP score",
        "denoise MSE",
        "first/last grad",
        "grad CV",
        "loss spikes",
        "shattering lag-1",
        "parameters",
    ] + (["skip cache (FLOP bound)"] if cached else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in rows:
        fid = result.get("fid", {}).get("summary", {})
        clip = result.get("clip_score", {}).get("summary", {})
        stability = result.get("grad_stability", {})
        cells = [
            label,
            _pm(fid.get("fid")),
            _pm(fid.get("floor_fid")),
            _pm(clip.get("clip_score")),
            _num(result.get("denoise", {}).get("mean")),
            _num(stability.get("first_to_last_ratio_median")),
            _num(stability.get("grad_norm_cv")),
            str(stability.get("loss_spikes", "")),
            _num(stability.get("shattering", {}).get("lag1_autocorrelation")),
            f"{result.get('parameters', 0):,}",
        ]
        if cached:
            cells.append(cache_label(result.get("cache")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + settings_lines(rows)) + "\n"


def settings_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """What each result computed and with which settings: one line when every result says the same, else one
    per result (:func:`computed_text`)."""
    texts = [computed_text(result) for _, result in rows]
    if all(text == texts[0] for text in texts):
        return [texts[0]]
    return ["Settings differ between these results:", ""] + [
        f"- {label}: {text}" for (label, _), text in zip(rows, texts, strict=True)
    ]


# The eval.json sections that sample images (with the sampler, steps, guidance and skip cache).
SAMPLED_SECTIONS = ("fid", "clip_score", "grid")


def computed_text(result: dict) -> str:
    """One sentence per measurement ``result`` holds, with the settings it was computed with; nothing about
    measurements it does not hold. Sample counts come from the sections themselves (what was used), not
    from the options (what was asked for)."""
    s = result.get("settings", {})
    parts = [f"skips {s['skips']}"] if s.get("skips") else []
    sampled = [name for name in SAMPLED_SECTIONS if name in result]
    cache = result.get("cache")
    if sampled:
        guidance = "" if s.get("guidance_scale") is None else f", guidance {s['guidance_scale']}"
        negative = "" if s.get("negative_prompt") is None else f", negative prompt {s['negative_prompt']!r}"
        parts.append(
            f"sampling ({', '.join(sampled)}): {s.get('sampler')}-{s.get('steps')}{guidance}{negative}, "
            + (cache_text(cache) if cache else "no skip cache")
        )
    elif cache:
        parts.append(cache_text(cache) + " (its FLOP bound only: nothing was sampled)")
    if "fid" in result:
        parts.append(_fid_text(result["fid"], s))
    if "clip_score" in result:
        clip = result["clip_score"]
        counts = sorted({row.get("num_images") for row in clip.get("per_seed", [])} - {None})
        seeds = [row["seed"] for row in clip.get("per_seed", [])]
        parts.append(f"CLIP score: {clip.get('model')}, {'/'.join(map(str, counts))} images per seed, seeds {seeds}")
    if "grid" in result:
        parts.append(_grid_text(result["grid"], s))
    if "denoise" in result:
        settings = result["denoise"].get("settings", {})
        images = settings.get("num_images")
        parts.append(
            f"denoising loss: {settings.get('buckets', s.get('buckets'))} timestep buckets, "
            f"{'' if images is None else f'{images} '}held-out (test split) images, fixed noise per image "
            f"(seed {settings.get('seed', 0)})"
        )
    if "skip_importance" in result:
        factors = list(result["skip_importance"].get("factors", {})) or s.get("importance_factors")
        parts.append(
            f"skip importance: each skip alone scaled by {', '.join(map(str, factors))}, on the denoising "
            "loss's images and noise"
        )
    if "grad_stability" in result:
        parts.append(
            f"gradient stability: stats.jsonl, spike rule median + {s.get('spike_k')}·MAD over "
            f"{s.get('spike_window')} records"
        )
    if "map" in result:
        scored = [name for name in ("denoise", "fid") if name in result["map"]]
        parts.append("MAP path of the stochastic skips: FLOPs" + "".join(f", {name}" for name in scored))
    parts.append(f"dtype {s.get('torch_dtype') or 'float32'}" + ("; raw weights" if s.get("no_ema") else ""))
    return "; ".join(parts) + "."


def _fid_text(fid: dict, settings: dict) -> str:
    """The FID's sample count, seeds, extractor, reference and floor split, as computed (the report's own)."""
    seeds = fid.get("seeds", settings.get("seeds"))
    text = f"FID: {fid.get('num_samples', settings.get('num_samples'))} samples per seed, seeds {seeds}"
    if "extractor" in fid:
        text += f", extractor {fid['extractor']}"
    if "reference" in fid:
        text += (
            f", against {fid['reference']} ({fid.get('reference_size')} images), floor from "
            f"{fid.get('heldout')} ({fid.get('heldout_size')} images)"
        )
    extras = [
        name for name, key in (("KID", "kid_mean"), ("precision/recall", "precision")) if key in fid.get("summary", {})
    ]
    return text + (f", with {' and '.join(extras)}" if extras else "")


def _grid_text(grid: dict, settings: dict) -> str:
    """The sample grid's layout: rows x columns (a column per skip variant, or ``grid_size`` of one variant)."""
    variants = grid.get("variants", [None])
    size = settings.get("grid_size")
    names = ", ".join("original" if v is None else str(v) for v in variants)
    if len(variants) > 1:
        return f"sample grid ({grid.get('file', 'samples.png')}): {size} rows x {len(variants)} columns ({names}), seed {grid.get('seed')}"
    per_row = "prompt" if grid.get("rows") else "noise"
    return (
        f"sample grid ({grid.get('file', 'samples.png')}): {size} rows (a {per_row} each) x {size} images "
        f"({names}), seed {grid.get('seed')}"
    )


def _cache_words(cache: dict) -> tuple[str, str]:
    """``(settings, bound)`` of an eval.json ``cache`` section in words."""
    options, compute = cache.get("options", {}), cache.get("compute") or {}
    mode = options.get("cache")
    if options.get("cache_key_steps") is not None:
        when = f"refreshes at steps {list(options['cache_key_steps'])}"
    elif options.get("cache_schedule") == "non_uniform" and options.get("cache_interval", 1) > 1:
        when = (
            f"1 refresh per {options['cache_interval']} steps, crowded at {options.get('cache_center')} of the "
            f"run (power {options.get('cache_power')})"
        )
    else:
        when = f"a refresh every {options.get('cache_interval')} steps"
    branch = compute.get("branch", options.get("cache_branch"))
    where = "" if mode != "skip_branch" else (" at branch K-1" if branch is None else f" at branch {branch}")
    if not compute:
        bound = "FLOP bound not recorded"
    else:
        bound = (
            f"FLOP bound {compute['bound_run']:.3g}x (full forwards at {compute['refresh_steps']} of "
            f"{compute['num_steps']} steps; a cached step computes {compute['cached_fraction']:.0%} of one)"
        )
    return f"skip cache {mode}{where}, {when}", bound


def cache_text(cache: dict) -> str:
    """An eval.json ``cache`` section as one phrase: mode, branch, refresh schedule and FLOP bound."""
    settings, bound = _cache_words(cache)
    return f"{settings}, {bound}"


def cache_label(cache: dict | None) -> str:
    """A table cell for an eval.json ``cache`` section: ``skip_branch b8 N3 (≤ 2.1x)``, ``none`` without one."""
    if not cache:
        return "none"
    options, compute = cache.get("options", {}), cache.get("compute") or {}
    branch = compute.get("branch", options.get("cache_branch"))
    mode = options.get("cache")
    label = mode + (f" b{branch}" if mode == "skip_branch" and branch is not None else "")
    label += " key steps" if options.get("cache_key_steps") is not None else f" N{options.get('cache_interval')}"
    label += "" if options.get("cache_schedule") != "non_uniform" else " non-uniform"
    return label + (f" (≤ {compute['bound_run']:.3g}x)" if compute else "")


def _pm(entry) -> str:
    if not entry:
        return ""
    return f"{entry['mean']:.3g}" + ("" if entry.get("std") is None else f" ± {entry['std']:.2g}")


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"
