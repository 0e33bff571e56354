"""Evaluation results on disk: ``eval.json`` and ``eval.md``, and several results side by side.

``eval.json`` holds every number, the settings that produced it, what was loaded (``target``) and which
weights were scored (``weights``: a digest of the weight files per component, or the Hub commit). A
result is *current* while the folder's weights still have that digest (:func:`result_is_current`);
:func:`compare` refuses results whose weights changed since they were computed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..runfolder import read_json, write_json_atomic

RESULTS_FILE = "eval.json"
SUMMARY_FILE = "eval.md"
# Settings that change the numbers; shown once when every compared result shares them, else per result.
SHOWN_SETTINGS = ("skips", "num_samples", "seeds", "sampler", "steps", "guidance_scale", "negative_prompt",
                  "feature_extractor", "reference", "buckets", "denoise_images", "torch_dtype", "no_ema")  # fmt: skip


def write_results(folder: Path, result: dict, label: str) -> None:
    """``eval.json`` (atomically) and ``eval.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RESULTS_FILE, result, default=float, sort_keys=False)
    (folder / SUMMARY_FILE).write_text(summary_markdown([(label, result)]))


def result_is_current(result: dict, folder: str | os.PathLike | None = None) -> str | None:
    """None when the weights a result scored are still those of its local source (``folder``, default the
    folder recorded in the result); else why not."""
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
    (folder / "compare.md").write_text(table)
    denoised = {label: result["denoise"] for label, result in rows if "denoise" in result}
    if denoised:
        plots.loss_by_timestep(denoised, folder / "loss_by_timestep.png")
    return table


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def summary_markdown(results) -> str:
    """One table, one row per result: FID (± std, floor), CLIP score, denoising loss, stability, parameters;
    then the settings (once when shared, else one line per result). ``results``: ``[(label, result)]`` or a
    dict label -> result."""
    rows = list(results.items()) if isinstance(results, dict) else list(results)
    lines = ["| run | FID (mean ± std) | floor | CLIP score | denoise MSE | first/last grad | grad CV | loss spikes | "
             "shattering lag-1 | parameters |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, result in rows:
        fid = result.get("fid", {}).get("summary", {})
        clip = result.get("clip_score", {}).get("summary", {})
        stability = result.get("grad_stability", {})
        lines.append("| " + " | ".join([
            label,
            _pm(fid.get("fid")), _pm(fid.get("floor_fid")), _pm(clip.get("clip_score")),
            _num(result.get("denoise", {}).get("mean")),
            _num(stability.get("first_to_last_ratio_median")), _num(stability.get("grad_norm_cv")),
            str(stability.get("loss_spikes", "")), _num(stability.get("shattering", {}).get("lag1_autocorrelation")),
            f"{result.get('parameters', 0):,}",
        ]) + " |")  # fmt: skip
    return "\n".join(lines + [""] + settings_lines(rows)) + "\n"


def settings_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """The settings behind the numbers: one line when every result shares them, else one per result."""
    shown = [{key: result.get("settings", {}).get(key) for key in SHOWN_SETTINGS} for _, result in rows]
    if all(s == shown[0] for s in shown):
        return [_settings_text(shown[0])]
    return ["Settings differ between these results:", ""] + [
        f"- {label}: {_settings_text(settings)}" for (label, _), settings in zip(rows, shown, strict=True)
    ]


def _settings_text(s: dict) -> str:
    parts = [f"skips {s['skips']}"] if s.get("skips") else []
    guidance = "" if s.get("guidance_scale") is None else f", guidance {s['guidance_scale']}"
    parts.append(f"samples per seed: {s.get('num_samples')}, seeds {s.get('seeds')}, {s.get('sampler')}-{s.get('steps')}"
                 f"{guidance}")  # fmt: skip
    images = "" if s.get("denoise_images") is None else f" (first {s['denoise_images']} images)"
    parts.append(f"denoising loss: {s.get('buckets')} timestep buckets, fixed noise per image (seed 0), test split{images}")
    parts.append(f"dtype {s.get('torch_dtype') or 'float32'}" + ("; raw weights" if s.get("no_ema") else ""))
    return "; ".join(parts) + "."


def _pm(entry) -> str:
    if not entry:
        return ""
    return f"{entry['mean']:.3g}" + ("" if entry.get("std") is None else f" ± {entry['std']:.2g}")


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"

