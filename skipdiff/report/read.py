"""Reading a sweep folder: ``sweep.json``, every cell's ``cell.json``, ``stats.jsonl`` and evaluation
results, as one :class:`Result` per evaluated model, grouped by dataset and configuration.

Only run-folder files are read (no training or sweep code is imported).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from ..config import MARKOV_P_MAX, MARKOV_P_MIN
from ..runfolder import read_json, read_stats

DATASET_KEYS = ("dataset", "dataset_name", "dataset_config_name", "train_data_dir")
INFERENCE = " (inference)"  # the suffix of a row scored another way: a MAP path or an inference variant


@dataclasses.dataclass
class Result:
    """One evaluated model: a trained cell, or an inference variant (or MAP path) of one."""

    cell: str  # the cell's folder name
    configuration: str
    dataset: str
    seed: int  # the training seed
    metrics: dict  # column key -> value (None when absent)
    records: list[dict]  # the cell's stats.jsonl (empty for variants)
    variant: str | None = None  # None: the trained model as it samples; "map" or a variant label otherwise
    chain: dict | None = None  # the Markov chain's final state (see :func:`final_chain`)
    floors: dict[int, float] = dataclasses.field(default_factory=dict)  # sampling seed -> real-vs-real FID
    samples: dict | None = None  # the model's own column of its eval grid (:func:`grid_samples`), if drawn


def load_sweep(folder: str | Path) -> tuple[dict, list[dict]]:
    """``(sweep.json, [cell.json records with "folder"])`` in the spec's cell order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"sweep folder {str(folder)!r} does not exist")
    sweep_path = folder / "sweep.json"
    sweep = read_json(sweep_path, "sweep record") if sweep_path.is_file() else {}
    names = sweep.get("cells") or sorted(p.parent.name for p in folder.glob("*/cell.json"))
    cells = []
    for name in names:
        path = folder / name / "cell.json"
        record = read_json(path, "cell record") if path.is_file() else {"name": name, "status": "missing"}
        cells.append({**record, "folder": folder / name})
    if not cells:
        raise ValueError(f"{folder} holds no sweep cells (no sweep.json, no */cell.json)")
    kinds = {c["kind"] for c in cells if "kind" in c}
    sweep.setdefault("kind", kinds.pop() if len(kinds) == 1 else "diffusion")
    sweep.setdefault("name", folder.name)
    return sweep, cells


def configuration_of(cell: dict) -> str:
    """The grid labels that make a configuration: every axis but seeds and datasets (``base`` if none)."""
    parts = [
        f"{entry['axis']}={entry['label']}"
        for entry in cell.get("axes", [])
        if not set(entry["options"]) <= {"seed"} and not set(entry["options"]) & set(DATASET_KEYS)
    ]
    return ", ".join(parts) or "base"


def dataset_of(cell: dict, kind: str) -> str:
    options = cell["options"]
    if kind == "inference":  # the pipeline studied (and the reference data, when any)
        data = options.get("dataset_name") or options.get("train_data_dir") or options.get("dataset")
        name = str(options["checkpoint"]).rstrip("/").split("/")[-1]
        return f"{name}, {str(data).rstrip('/').split('/')[-1]}" if data else name
    source = options.get("dataset_name") or options.get("train_data_dir") or options.get("dataset")
    source = str(source).rstrip("/").split("/")[-1]
    return f"{source}, {options['resolution']}px" if kind == "diffusion" else source


def dedupe_steps(rows: list[dict]) -> list[dict]:
    """Records sorted by step, the last one kept where a step appears twice (a resumed run)."""
    by_step = {}
    for row in rows:
        by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def seconds_per_step(records: list[dict]) -> float | None:
    values = [r["seconds_per_step"] for r in dedupe_steps([r for r in records if "seconds_per_step" in r])]
    return float(statistics.median(values)) if values else None


def fid_floors(evaluation: dict) -> dict[int, float]:
    """Sampling seed -> the real-vs-real FID floor at that seed (from ``eval.json``'s ``fid.per_seed``)."""
    rows = evaluation.get("fid", {}).get("per_seed", [])
    return {int(row["seed"]): row["floor_fid"] for row in rows if row.get("floor_fid") is not None}


def seconds_per_image(evaluation: dict) -> dict[int, float]:
    """Sampling seed -> seconds per generated image of the FID / CLIP score samples (eval.json's
    ``timings.sampling``; a result written before it: the FID's per-seed ``sample_seconds``)."""
    per_seed = ((evaluation.get("timings") or {}).get("sampling") or {}).get("per_seed")
    if per_seed:
        return {int(seed): row["seconds"] / row["images"] for seed, row in per_seed.items() if row.get("images")}
    fid = evaluation.get("fid") or {}
    count = fid.get("num_samples")
    return {
        int(row["seed"]): row["sample_seconds"] / count
        for row in fid.get("per_seed", [])
        if count and row.get("sample_seconds") is not None
    }


def diffusion_metrics(evaluation: dict, records: list[dict], variant: bool = False) -> dict:
    """Table values of one diffusion model from its eval.json (and its training records)."""
    fid = evaluation.get("fid", {}).get("summary", {})
    stability = {} if variant else evaluation.get("grad_stability", {})
    losses = [r["loss"] for r in dedupe_steps([r for r in records if "loss" in r])]
    return {
        "fid": fid.get("fid", {}).get("mean"),  # mean over sampling seeds
        "fid_floor": fid.get("floor_fid", {}).get("mean"),
        "kid": fid.get("kid_mean", {}).get("mean"),  # with --kid: mean over sampling seeds
        "kid_subset_std": fid.get("kid_std", {}).get("mean"),  # torch-fidelity's std over subsets
        "denoise": evaluation.get("denoise", {}).get("mean"),
        "final_loss": None if variant or not losses else losses[-1],
        "loss_spikes": stability.get("loss_spikes"),
        "grad_spikes": stability.get("grad_spikes"),
        "grad_cv": stability.get("grad_norm_cv"),
        "first_last": stability.get("first_to_last_ratio_median"),
        "closed": evaluation.get("fraction_closed"),  # only in eval.json's "map" block
        "flops_saved": evaluation.get("flops_saved_fraction"),
        "cache_bound": ((evaluation.get("cache") or {}).get("compute") or {}).get("bound_run"),  # with --cache
        "parameters": evaluation.get("parameters"),
        "seconds_per_step": None if variant else seconds_per_step(records),
    }


def classifier_metrics(metrics: dict, records: list[dict]) -> dict:
    return {
        "test_accuracy": metrics.get("test_accuracy"),
        "test_loss": metrics.get("test_loss"),
        "train_loss": metrics.get("train_loss"),
        "grad_ratio_init": metrics.get("grad_ratio_init"),
        "grad_ratio_final": metrics.get("grad_ratio_final"),
        "nonfinite": metrics.get("num_nonfinite_steps"),
        "parameters": metrics.get("num_parameters"),
        "seconds_per_step": seconds_per_step(records),
    }


def final_chain(state: dict | None, unit: str, options: dict | None = None) -> dict | None:
    """A chain's ``state_summary`` (UNet: with ``skips``) -> links, P(open) and P(open | previous state), and the
    bounds every open probability is clipped to (the state's; for a state logged before it held them, the
    chain's ``options`` as the model config stores them, else the defaults)."""
    if not state:
        return None
    options = options or {}
    indices = state.get("skips", range(len(state["marginals"])))
    return {
        "links": [f"{unit} {j}" for j in indices],
        "p_open": state["marginals"],
        "p_closed": [p[0] for p in state["open_prob"]],
        "p_prev_open": [p[1] for p in state["open_prob"]],
        "p_min": state.get("p_min", options.get("p_min", MARKOV_P_MIN)),
        "p_max": state.get("p_max", options.get("p_max", MARKOV_P_MAX)),
    }


def grid_samples(folder: Path, evaluation: dict) -> dict | None:
    """Where the evaluated model's own samples are in its ``samples.png``: ``{"path", "layout", "column",
    "seed"}`` (the column of ``--skips`` when it was given, else the original's), or None for a grid drawn
    before grids recorded their layout, or none at all."""
    grid = evaluation.get("grid")
    if not grid or "layout" not in grid or not (folder / grid["file"]).is_file():
        return None
    variants = grid.get("variants") or [None]
    column = 1 if evaluation.get("skip_spec") and len(variants) > 1 else 0  # one variant: every cell is its own
    return {"path": str(folder / grid["file"]), "layout": grid["layout"], "column": column, "seed": grid.get("seed")}


def _chain_options(folder: Path) -> dict:
    """The Markov chain options a run's model config stores (``unet/config.json`` ``markov``), or {}."""
    config = folder / "unet" / "config.json"
    return (json.loads(config.read_text()).get("markov") or {}) if config.is_file() else {}


def _diffusion_results(cell: dict, common: dict, records: list[dict]) -> list[Result]:
    """The trained model, its MAP path (stochastic skips) and its inference variants."""
    folder, configuration = cell["folder"], configuration_of(cell)
    evaluation = read_json(folder / "eval" / "eval.json", "evaluation")
    chains = [r["markov"] for r in dedupe_steps([r for r in records if r.get("markov")])]
    results = [
        Result(
            configuration=configuration,
            metrics=diffusion_metrics(evaluation, records),
            records=records,
            chain=final_chain(chains[-1] if chains else None, "skip", _chain_options(folder)),
            floors=fid_floors(evaluation),
            samples=grid_samples(folder / "eval", evaluation),
            **common,
        )
    ]
    scored = [("map", evaluation["map"])] if "map" in evaluation else []
    for label in cell.get("variants", {}):
        scored.append((label, read_json(folder / "variants" / label / "eval" / "eval.json", "evaluation")))
    for label, variant_eval in scored:
        results.append(
            Result(
                configuration=f"{configuration} · {label}{INFERENCE}",
                variant=label,
                records=[],
                metrics=diffusion_metrics(variant_eval, [], variant=True),
                floors=fid_floors(variant_eval),
                **common,
            )
        )
    return results


def _inference_results(cell: dict, common: dict) -> list[Result]:
    """One result per sampling seed of an inference cell (the seeds every row shares, so the ranking pairs
    rows by the noise they were sampled from); seed-free figures (denoising loss, FLOPs) on the first."""
    evaluation = read_json(cell["folder"] / "eval" / "eval.json", "evaluation")
    summary = diffusion_metrics(evaluation, [], variant=True)
    fid_rows = {int(r["seed"]): r for r in evaluation.get("fid", {}).get("per_seed", [])}
    clip_rows = {int(r["seed"]): r for r in evaluation.get("clip_score", {}).get("per_seed", [])}
    seconds = seconds_per_image(evaluation)
    seeds = sorted(set(fid_rows) | set(clip_rows)) or [0]
    results = []
    for i, seed in enumerate(seeds):
        fid, clip = fid_rows.get(seed, {}), clip_rows.get(seed, {})
        metrics = {
            **{k: (v if i == 0 else None) for k, v in summary.items()},
            "fid": fid.get("fid"),
            "fid_floor": fid.get("floor_fid"),
            "kid": fid.get("kid_mean"),
            "clip_score": clip.get("clip_score"),
            "seconds_per_image": seconds.get(seed),
        }
        results.append(
            Result(
                configuration=configuration_of(cell),
                metrics=metrics,
                records=[],
                floors={seed: fid["floor_fid"]} if fid.get("floor_fid") is not None else {},
                samples=grid_samples(cell["folder"] / "eval", evaluation) if i == 0 else None,
                **{**common, "seed": seed},
            )
        )
    return results


def cells_to_results(cells: list[dict], kind: str) -> list[Result]:
    """Every finished cell (and each of its inference variants) as a :class:`Result`."""
    results = []
    for cell in cells:
        if cell.get("status") != "done":
            continue
        folder = cell["folder"]
        stats_path = folder / "stats.jsonl"
        records = read_stats(stats_path) if stats_path.is_file() else []
        common = dict(cell=cell["name"], dataset=dataset_of(cell, kind), seed=int(cell["options"].get("seed", 0)))
        if kind == "inference":
            results += _inference_results(cell, common)
        elif kind == "classifier":
            metrics = json.loads((folder / "metrics.json").read_text())
            results.append(
                Result(
                    configuration=configuration_of(cell),
                    metrics=classifier_metrics(metrics, records),
                    records=records,
                    chain=final_chain(metrics.get("markov"), "block"),
                    **common,
                )
            )
        else:
            results += _diffusion_results(cell, common, records)
    return results


def group(results: list[Result]) -> dict[str, dict[str, list[Result]]]:
    """dataset -> configuration -> results sorted by seed (datasets sorted, configurations in spec order)."""
    grouped: dict[str, dict[str, list[Result]]] = {}
    for result in results:
        grouped.setdefault(result.dataset, {}).setdefault(result.configuration, []).append(result)
    return {
        dataset: {name: sorted(rows, key=lambda r: (r.seed, r.cell)) for name, rows in grouped[dataset].items()}
        for dataset in sorted(grouped)
    }


def seconds_by_seed(rows: list[Result]) -> dict[int, float]:
    """Sampling seed -> seconds per image of a configuration's rows (inference sweeps: :func:`seconds_per_image`)."""
    return {r.seed: r.metrics["seconds_per_image"] for r in rows if r.metrics.get("seconds_per_image")}


def paired_speedups(configurations: dict[str, list[Result]], reference: str) -> dict[str, list[float]]:
    """Configuration -> the ``reference`` row's seconds per image over its own, at each sampling seed both
    were timed at (:func:`seconds_by_seed`); the reference itself is left out."""
    base = seconds_by_seed(configurations.get(reference, []))
    out = {}
    for name, rows in configurations.items():
        own = seconds_by_seed(rows)
        if name != reference:
            out[name] = [base[seed] / own[seed] for seed in sorted(set(own) & set(base))]
    return out
