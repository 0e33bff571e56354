"""What do skips do to cacheability? Feature change across sampling steps, and the FID cost of caching.

Skip-branch caching (skipdiff.skips.caching) reuses the deep decoder features from the last refresh step. It is
cheap in quality where those features change slowly from one sampling step to the next. For trained
models with different skips (full, ScaleLong-scaled, learned; several training seeds each, from a sweep
such as eval/sweeps/cacheability.yaml), this script measures:

* for each decoder level (the output of ``up_blocks[i]``), the relative change of its features between
  adjacent DDIM steps, ``|h_t - h_{t-1}| / |h_t|``, mean over the steps and images of a fixed-noise batch;
* FID uncached and cached at one setting (default: branch 8, interval 3), same noise, same extractor, and
  the difference: the FID cost of caching.

Results per cell, and mean ± std over training seeds per configuration, go to ``results.json`` and
``table.md``.

    python -m skipdiff.sweep eval/sweeps/cacheability.yaml --num_threads 1    # scalelong-0.7, learned x 3 seeds
    python -m skipdiff.sweep eval/sweeps/markov_matched.yaml --num_threads 1  # full x 3 seeds, same base options
    python eval/cacheability.py runs/sweeps/cacheability runs/sweeps/markov_matched \
        --configurations skips=full skips=scalelong-0.7 skips=learned --out eval/results/cacheability
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from skipdiff.report.markdown import comparison_section
from skipdiff.report.ranking import compare
from skipdiff.runfolder import read_json, write_json_atomic


@torch.no_grad()
def feature_change(target, images: int = 64, steps: int = 50, seed: int = 0) -> list[float]:
    """Mean relative change of each up block's output between adjacent sampling steps (decoder order)."""
    from skipdiff.sampling import denoise_latents, image_generators, initial_noise, sampling_scheduler

    unet = target.unet.eval()
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(unet.up_blocks))}
    handles = [
        block.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out.detach().float()))
        for i, block in enumerate(unet.up_blocks)
    ]
    try:
        generators = image_generators(seed, list(range(images)))
        noise = initial_noise(target.latent_shape(), generators)
        denoise_latents(unet, sampling_scheduler(target.scheduler, "ddim"), noise, steps, generators)
    finally:
        for handle in handles:
            handle.remove()
    changes = []
    for i in range(len(unet.up_blocks)):
        series = outputs[i]  # one (B, C, H, W) per step
        relative = [
            ((b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()
            for a, b in zip(series[:-1], series[1:], strict=True)
        ]
        changes.append(float(torch.stack(relative).mean()))
    return changes


def cached_fid(run: Path, cache: dict, samples: int, seeds: list[int]) -> float:
    """Mean FID over ``seeds`` of the run sampled with the ``cache`` options (None: uncached)."""
    from skipdiff.eval import EvalOptions, evaluate

    out = run / "cacheability" / ("uncached" if not cache else "cached")
    options = EvalOptions(
        checkpoint=str(run), fid=True, num_samples=samples, seeds=seeds, out=str(out), **(cache or {})
    )
    result = evaluate(options)
    return result["fid"]["summary"]["fid"]["mean"]


def measure_cell(run: Path, cache: dict, samples: int, seeds: list[int]) -> dict:
    from skipdiff.targets import load_target

    change = feature_change(load_target(str(run)))
    uncached, cached = cached_fid(run, None, samples, seeds), cached_fid(run, cache, samples, seeds)
    return {
        "feature_change_by_up_block": change,
        "fid_uncached": uncached,
        "fid_cached": cached,
        "fid_cost": cached - uncached,
    }


def summarise(cells: list[dict]) -> dict:
    """Per configuration: mean ± std over training seeds of every figure."""
    out: dict = {}
    for cell in cells:
        out.setdefault(cell["configuration"], []).append(cell)
    summary = {}
    for name, rows in out.items():

        def ms(values):
            return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}

        levels = len(rows[0]["feature_change_by_up_block"])
        summary[name] = {
            "seeds": [r["seed"] for r in rows],
            "feature_change_by_up_block": [
                ms([r["feature_change_by_up_block"][i] for r in rows]) for i in range(levels)
            ],
            **{key: ms([r[key] for r in rows]) for key in ("fid_uncached", "fid_cached", "fid_cost")},
        }
    return summary


def paired_against(cells: list[dict], reference: str = "skips=full") -> dict | None:
    """Each figure of every configuration against ``reference``, paired by training seed and Holm-corrected
    over the configurations (skipdiff.report.ranking.compare); None without the reference."""
    if not any(cell["configuration"] == reference for cell in cells):
        return None
    levels = len(cells[0]["feature_change_by_up_block"])
    figures = {key: (lambda cell, key=key: cell[key]) for key in ("fid_cost", "fid_uncached")}
    figures.update(
        {f"change up_blocks.{i}": (lambda cell, i=i: cell["feature_change_by_up_block"][i]) for i in range(levels)}
    )
    result = {}
    for figure, read in figures.items():
        values: dict[str, dict[int, float]] = {}
        for cell in cells:
            values.setdefault(cell["configuration"], {})[cell["seed"]] = read(cell)
        result[figure] = compare(values, reference, lower_is_better=True)
    return result


def comparison_table(comparisons: dict) -> str:
    """Markdown: per figure, every configuration against the reference (skipdiff.report's ranking table)."""
    lines = ["", "Against the reference, paired by training seed, Holm over the configurations of each figure."]
    for figure, result in comparisons.items():
        lines += comparison_section(f"### {figure}", result, figure)
    return "\n".join(lines) + "\n"


def table(summary: dict) -> str:
    def pm(entry):
        return f"{entry['mean']:.3g}" + ("" if entry["std"] is None else f" ± {entry['std']:.2g}")

    levels = len(next(iter(summary.values()))["feature_change_by_up_block"])
    lines = [
        "| configuration | seeds | "
        + " | ".join(f"change up_blocks.{i}" for i in range(levels))
        + " | FID uncached | FID cached | FID cost |",
        "|---|---|" + "---|" * (levels + 3),
    ]
    for name, row in summary.items():
        changes = " | ".join(pm(c) for c in row["feature_change_by_up_block"])
        lines.append(
            f"| {name} | {len(row['seeds'])} | {changes} | {pm(row['fid_uncached'])} | {pm(row['fid_cached'])} | "
            f"{pm(row['fid_cost'])} |"
        )
    return "\n".join(lines) + "\n"


# Options that may differ between the cells compared: what the comparison is about, and bookkeeping.
VARYING = {"skips", "markov", "seed", "output_dir", "resume_from_checkpoint", "logging_dir", "tracker_project_name"}


def find_cells(sweeps: list[str], configurations: list[str] | None) -> list[tuple[Path, dict, str]]:
    """The finished cells of ``sweeps`` (several sweeps may contribute cells trained with the same base options),
    keeping ``configurations`` when given; refuses cells whose training differs in anything but the skips."""
    from skipdiff.sweep.spec import results_options

    found = []
    for sweep in sweeps:
        for record_path in sorted(Path(sweep).glob("*/cell.json")):
            record = json.loads(record_path.read_text())
            if record.get("status") != "done":
                continue
            configuration = ", ".join(f"{a['axis']}={a['label']}" for a in record["axes"] if a["axis"] != "seed")
            if configurations is None or configuration in configurations:
                found.append((record_path.parent, record, configuration))
    if not found:
        raise SystemExit(f"error: no finished cell in {sweeps} matches {configurations}")
    first_folder, first, _ = found[0]
    reference = {k: v for k, v in results_options(first["options"]).items() if k not in VARYING}
    for folder, record, _ in found[1:]:
        options = {k: v for k, v in results_options(record["options"]).items() if k not in VARYING}
        differing = sorted(k for k in set(reference) | set(options) if reference.get(k) != options.get(k))
        if differing:
            raise SystemExit(f"error: {folder} was trained with other options than {first_folder}: {differing}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", help="sweep folders of trained, evaluated diffusion cells")
    parser.add_argument(
        "--configurations",
        nargs="+",
        default=None,
        help="only these configurations (as the report names them, e.g. skips=full); default: all",
    )
    parser.add_argument("--cache_branch", type=int, default=8)
    parser.add_argument("--cache_interval", type=int, default=3)
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--resummarise",
        action="store_true",
        help="redo the summary and comparisons from --out/results.json without measuring again",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = {"cache": "skip_branch", "cache_branch": args.cache_branch, "cache_interval": args.cache_interval}
    out = Path(args.out)
    command = (
        "python eval/cacheability.py "
        + " ".join(args.sweeps)
        + (" --configurations " + " ".join(args.configurations) if args.configurations else "")
        + f" --out {args.out}"
    )
    if args.resummarise:  # the measured cells as they are; only the summary and the comparisons are redone
        cells = read_json(out / "results.json", "cacheability results")["cells"]
    else:
        cells = []
        for folder, record, configuration in find_cells(args.sweeps, args.configurations):
            result = measure_cell(folder, cache, args.num_samples, args.seeds)
            cells.append(
                {"cell": str(folder), "configuration": configuration, "seed": record["options"]["seed"], **result}
            )
            print(cells[-1], flush=True)
    summary, comparisons = summarise(cells), paired_against(cells)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "results.json",
        {
            "cache": cache,
            "num_samples": args.num_samples,
            "sampling_seeds": args.seeds,
            "cells": cells,
            "summary": summary,
            "paired_against_full": comparisons,
            "command": command,
        },
    )
    text = table(summary) + (comparison_table(comparisons) if comparisons else "")
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
