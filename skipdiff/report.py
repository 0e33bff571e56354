"""``python -m skipdiff.report``: a sweep's comparison (Markdown + PNG), regenerated from its JSON alone.

    python -m skipdiff.report runs/sweeps/cpu_digits                  # -> eval/results/cpu_digits/
    python -m skipdiff.report runs/sweeps/cpu_digits --out /tmp/cpu_digits

Reads ``sweep.json`` and, for every cell, ``cell.json``, ``stats.jsonl`` and ``eval/eval.json``
(``variants/<label>/eval/eval.json`` for inference variants) or, for classifiers, ``metrics.json``.
Writes to ``--out``:

* ``report.md``: per dataset, one row per configuration (the grid labels without the seed and the
  dataset) with mean ± std over training seeds of FID (next to the real-vs-real floor), the held-out
  denoising loss, the final training loss, gradient stability (loss and gradient-norm spikes, the
  coefficient of variation of the gradient norm, the median first/last block gradient ratio),
  parameters and the median seconds per step; a ranking with a significance test; the Markov chain's
  learned probabilities; links to the figures. Classifier sweeps get test accuracy and loss instead.
* ``summary.json``: the same numbers, and ``loss_*.png``, ``grad_*.png``, ``markov_*.png``.

**Is a difference real?** Each configuration contributes one value per training seed (FID: the cell's
mean over sampling seeds; else the denoising loss; classifiers: test accuracy). The best configuration
is compared with every other by Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``); p <= 0.05
reads "beyond seed noise", anything else, or a single seed on either side, "not distinguishable from
seed noise". The tests are not corrected for multiple comparisons; the report says how many it ran.

**Deterministic:** rows, datasets and files are sorted or in the spec's order, floats have fixed
formats, no timestamps or absolute paths, and PNGs are written by Agg with fixed metadata, so running
the report twice on the same JSON gives the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .eval import plots  # noqa: E402
from .runfolder import read_stats  # noqa: E402

DATASET_KEYS = ("dataset", "dataset_name", "dataset_config_name", "train_data_dir")
ALPHA = 0.05
PNG_METADATA = {
    "Software": None
}  # no matplotlib version in the file: same bytes across versions where possible
REPORT_FILES = ("loss_", "grad_", "markov_")

# Columns of the tables: (key, header, format). Metrics the ranking can use: (key, name, lower is better).
DIFFUSION_COLUMNS = [("fid", "FID ↓", "pm"), ("fid_floor", "FID floor", "mean"), ("denoise", "denoise MSE ↓", "pm"),
                     ("final_loss", "final train loss", "pm"), ("loss_spikes", "loss spikes", "mean"),
                     ("grad_spikes", "grad spikes", "mean"), ("grad_cv", "grad-norm CV", "mean"),
                     ("first_last", "first/last grad", "mean"), ("closed", "skips closed", "mean"),
                     ("flops_saved", "FLOPs saved", "mean"), ("parameters", "parameters", "int"),
                     ("seconds_per_step", "s/step", "mean")]  # fmt: skip
CLASSIFIER_COLUMNS = [("test_accuracy", "test accuracy ↑", "pm"), ("test_loss", "test loss ↓", "pm"),
                      ("train_loss", "train loss", "pm"), ("grad_ratio_init", "first/last grad (init)", "mean"),
                      ("grad_ratio_final", "first/last grad (final)", "mean"), ("nonfinite", "non-finite steps", "mean"),
                      ("parameters", "parameters", "int"), ("seconds_per_step", "s/step", "mean")]  # fmt: skip
TABLE_NOTES = {
    "diffusion": "Mean ± sample std over training seeds (one value per seed; FID is each cell's mean over its "
    "sampling seeds, next to the real-vs-real floor at the same sample count). Stability: spikes by "
    "skipdiff.eval's median + k·MAD rule; CV = std/mean of the total gradient norm; first/last = "
    "median ratio of the first to the last block's gradient norm (< 1: vanishing toward the input). "
    "Rows marked (inference) are the trained model with other skips at inference only; a `map` row is a "
    "model with stochastic skips (markov, bernoulli) run on its most likely path, with the fraction of "
    "skips that path closes and the FLOPs of one UNet forward saved by removing them (skipdiff.eval.compute); "
    "the model's own row samples with every stochastic gate at its expected value.",
    "classifier": "Mean ± sample std over training seeds. Test accuracy and loss on the held-out split after "
    "the last epoch; train loss in eval mode over the whole train split; first/last grad = the first "
    "residual block's gradient norm over the last one's, at step 1 (init) and at the last logged step "
    "(final) (< 1: vanishing toward the input).",
}
RANKING_METRICS = {"diffusion": [("fid", "FID", True), ("denoise", "denoising MSE", True)],
                   "classifier": [("test_accuracy", "test accuracy", False)]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Reading a sweep
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One evaluated model: a trained cell, or an inference variant of one."""

    cell: str  # the cell's folder name
    configuration: str
    dataset: str
    seed: int
    metrics: dict  # column key -> value (None when absent)
    records: list[dict]  # the cell's stats.jsonl (empty for variants)
    variant: str | None = None
    chain: dict | None = None  # the Markov chain's final state (see :func:`final_chain`)


def load_sweep(folder: str | Path) -> tuple[dict, list[dict]]:
    """``(sweep.json, [cell.json records with "folder"])`` in the spec's cell order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"sweep folder {str(folder)!r} does not exist")
    sweep_path = folder / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else {}
    names = sweep.get("cells") or sorted(p.parent.name for p in folder.glob("*/cell.json"))
    cells = []
    for name in names:
        path = folder / name / "cell.json"
        record = json.loads(path.read_text()) if path.is_file() else {"name": name, "status": "missing"}
        cells.append({**record, "folder": folder / name})
    if not cells:
        raise ValueError(f"{folder} holds no sweep cells (no sweep.json, no */cell.json)")
    kinds = {c["kind"] for c in cells if "kind" in c}
    sweep.setdefault("kind", kinds.pop() if len(kinds) == 1 else "diffusion")
    sweep.setdefault("name", folder.name)
    return sweep, cells


def configuration_of(cell: dict) -> str:
    """The grid labels that make a configuration: every axis but seeds and datasets (``base`` if none)."""
    parts = [f"{entry['axis']}={entry['label']}" for entry in cell.get("axes", [])
             if not set(entry["options"]) <= {"seed"} and not set(entry["options"]) & set(DATASET_KEYS)]  # fmt: skip
    return ", ".join(parts) or "base"


def dataset_of(cell: dict, kind: str) -> str:
    options = cell["options"]
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


def diffusion_metrics(evaluation: dict, records: list[dict], variant: bool = False) -> dict:
    """Table values of one diffusion model from its eval.json (and its training records)."""
    fid = evaluation.get("fid", {}).get("summary", {})
    stability = {} if variant else evaluation.get("grad_stability", {})
    losses = [r["loss"] for r in dedupe_steps([r for r in records if "loss" in r])]
    return {
        "fid": fid.get("fid", {}).get("mean"),
        "fid_floor": fid.get("floor_fid", {}).get("mean"),
        "denoise": evaluation.get("denoise", {}).get("mean"),
        "final_loss": None if variant or not losses else losses[-1],
        "loss_spikes": stability.get("loss_spikes"),
        "grad_spikes": stability.get("grad_spikes"),
        "grad_cv": stability.get("grad_norm_cv"),
        "first_last": stability.get("first_to_last_ratio_median"),
        "closed": evaluation.get("fraction_closed"),  # only in eval.json's "map" block
        "flops_saved": evaluation.get("flops_saved_fraction"),
        "parameters": evaluation.get("parameters"),
        "seconds_per_step": None if variant else seconds_per_step(records),
    }


def classifier_metrics(metrics: dict, records: list[dict]) -> dict:
    return {
        "test_accuracy": metrics.get("test_accuracy"), "test_loss": metrics.get("test_loss"),
        "train_loss": metrics.get("train_loss"), "grad_ratio_init": metrics.get("grad_ratio_init"),
        "grad_ratio_final": metrics.get("grad_ratio_final"), "nonfinite": metrics.get("num_nonfinite_steps"),
        "parameters": metrics.get("num_parameters"), "seconds_per_step": seconds_per_step(records),
    }  # fmt: skip


def cells_to_results(cells: list[dict], kind: str) -> list[Result]:
    """Every finished cell (and each of its inference variants) as a :class:`Result`."""
    results = []
    for cell in cells:
        if cell.get("status") != "done":
            continue
        folder = cell["folder"]
        stats_path = folder / "stats.jsonl"
        records = read_stats(stats_path) if stats_path.is_file() else []
        common = dict(
            cell=cell["name"], dataset=dataset_of(cell, kind), seed=int(cell["options"].get("seed", 0))
        )
        configuration = configuration_of(cell)
        if kind == "classifier":
            metrics = json.loads((folder / "metrics.json").read_text())
            results.append(Result(configuration=configuration, metrics=classifier_metrics(metrics, records),
                                  records=records, chain=final_chain(metrics.get("markov"), "block"), **common))  # fmt: skip
            continue
        evaluation = json.loads((folder / "eval" / "eval.json").read_text())
        chains = [r["markov"] for r in dedupe_steps([r for r in records if r.get("markov")])]
        results.append(Result(configuration=configuration, metrics=diffusion_metrics(evaluation, records),
                              records=records, chain=final_chain(chains[-1] if chains else None, "skip"), **common))  # fmt: skip
        if "map" in evaluation:  # stochastic skips, scored on their MAP path too
            results.append(Result(configuration=f"{configuration} · map (inference)", variant="map", records=[],
                                  metrics=diffusion_metrics(evaluation["map"], [], variant=True), **common))  # fmt: skip
        for label in cell.get("variants", {}):
            variant_eval = json.loads((folder / "variants" / label / "eval" / "eval.json").read_text())
            results.append(Result(configuration=f"{configuration} · {label} (inference)", variant=label, records=[],
                                  metrics=diffusion_metrics(variant_eval, [], variant=True), **common))  # fmt: skip
    return results


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for a single value) of the non-None values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value; None when either side has fewer than two values or it is undefined."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero variance on both sides: nan, read as "no evidence"
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def pooled_seed_variance(values: dict[str, list[float]]) -> tuple[float, int]:
    """Seed-to-seed variance pooled over the configurations with at least two values, and its degrees
    of freedom (sum of n_i - 1); (0.0, 0) when no configuration has two."""
    squares, df = 0.0, 0
    for raw in values.values():
        mine = [v for v in raw if v is not None and math.isfinite(v)]
        if len(mine) >= 2:
            squares += statistics.variance(mine) * (len(mine) - 1)
            df += len(mine) - 1
    return (squares / df, df) if df else (0.0, 0)


def pooled_p(a: list[float], b: list[float], variance: float, df: int) -> float | None:
    """Two-sided t-test of mean(a) = mean(b) with a known pooled seed variance (``df`` degrees of freedom).

    For a side with a single seed, where Welch's test is undefined; it assumes every configuration has
    the same seed-to-seed variance. None without a pooled estimate.
    """
    if df < 1 or variance <= 0 or not a or not b:
        return None
    from scipy.stats import t

    statistic = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(variance * (1 / len(a) + 1 / len(b)))
    return float(2 * t.sf(abs(statistic), df))


def rank(values: dict[str, list[float]], lower_is_better: bool) -> list[dict]:
    """Configurations sorted best first, each compared with the best.

    ``values``: configuration -> one value per training seed. The test is Welch's (:func:`welch_p`) when
    both sides have two or more seeds, else :func:`pooled_p` with the seed variance pooled over all
    configurations (:func:`pooled_seed_variance`). Returns dicts with ``configuration``, ``mean``,
    ``std``, ``seeds``, ``delta`` (vs the best), ``p``, ``test`` (welch, pooled or None) and ``verdict``.
    """
    stats = {name: mean_std(v) for name, v in values.items() if mean_std(v)[0] is not None}
    sign = 1.0 if lower_is_better else -1.0
    order = sorted(stats, key=lambda name: (sign * stats[name][0], name))
    if not order:
        return []
    best = order[0]
    best_values = [v for v in values[best] if v is not None]
    variance, df = pooled_seed_variance(values)
    rows = []
    for name in order:
        mine = [v for v in values[name] if v is not None]
        row = {"configuration": name, "mean": stats[name][0], "std": stats[name][1], "seeds": len(mine),
               "delta": stats[name][0] - stats[best][0], "p": None, "test": None}  # fmt: skip
        if name == best:
            row["verdict"] = "best"
            rows.append(row)
            continue
        row["p"], row["test"] = welch_p(mine, best_values), "welch"
        if row["p"] is None:
            row["p"], row["test"] = pooled_p(mine, best_values, variance, df), "pooled"
        if row["p"] is None:
            row["test"] = None
            row["verdict"] = "not distinguishable from seed noise (one seed: no test)"
        elif row["p"] <= ALPHA:
            row["verdict"] = "worse beyond seed noise"
        else:
            row["verdict"] = "not distinguishable from seed noise"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _num(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4g}"


def _pm(mean, std) -> str:
    if mean is None:
        return "–"
    return _num(mean) + ("" if std is None else f" ± {std:.2g}")


def _cell_text(values: list, style: str) -> str:
    mean, std = mean_std([float(v) for v in values if v is not None])
    if style == "int":
        return "–" if mean is None else f"{round(mean):,}"
    return _pm(mean, std) if style == "pm" else _num(mean)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def group(results: list[Result]) -> dict[str, dict[str, list[Result]]]:
    """dataset -> configuration -> results sorted by seed (datasets sorted, configurations in spec order)."""
    grouped: dict[str, dict[str, list[Result]]] = {}
    for result in results:
        grouped.setdefault(result.dataset, {}).setdefault(result.configuration, []).append(result)
    return {
        dataset: {
            name: sorted(rows, key=lambda r: (r.seed, r.cell)) for name, rows in grouped[dataset].items()
        }
        for dataset in sorted(grouped)
    }


def ranking_metric(kind: str, configurations: dict[str, list[Result]]) -> tuple[str, str, bool] | None:
    """The first metric every configuration of the dataset has (FID, else denoising loss)."""
    for key, name, lower in RANKING_METRICS[kind]:
        if all(any(r.metrics.get(key) is not None for r in rows) for rows in configurations.values()):
            return key, name, lower
    return None


def ranking_markdown(dataset: str, ranking: list[dict], metric: str, lower: bool) -> list[str]:
    lines = [f"### Ranking by {metric} ({'lower' if lower else 'higher'} is better)", "",
             "| rank | configuration | seeds | " + metric + " | Δ vs best | p | test | verdict |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, row in enumerate(ranking, 1):
        delta = "–" if row["verdict"] == "best" else f"{row['delta']:+.4g}"
        p = "–" if row["p"] is None else f"{row['p']:.2g}"
        lines.append(f"| {i} | {row['configuration']} | {row['seeds']} | {_pm(row['mean'], row['std'])} | {delta} | "
                     f"{p} | {row.get('test') or '–'} | {row['verdict']} |")  # fmt: skip
    best = ranking[0]
    tests = [r for r in ranking[1:] if r["p"] is not None]
    worse = [r["configuration"] for r in ranking[1:] if r["verdict"] == "worse beyond seed noise"]
    tied = [r["configuration"] for r in ranking[1:] if r["verdict"] != "worse beyond seed noise"]
    lines += ["", f"**Recommendation ({dataset}):** "]
    if len(ranking) == 1:
        lines[-1] += f"only one configuration, {best['configuration']}; nothing to compare."
    elif not tests:
        lines[-1] += (f"{best['configuration']} has the best {metric}, but no configuration is distinguishable "
                      "from seed noise (a single training seed on one side): run more seeds before choosing.")  # fmt: skip
    else:
        text = f"**{best['configuration']}** has the best {metric}. "
        if worse:
            text += f"{len(worse)} of the {len(ranking) - 1} others are worse beyond seed noise (p ≤ {ALPHA}). "
        if tied:
            text += ("Not distinguishable from it: " + "; ".join(tied)
                     + ("; the data do not single out one configuration. " if not worse else "; these remain candidates. "))  # fmt: skip
        lines[-1] += text + f"{len(tests)} test(s), not corrected for multiple comparisons."
    if any(r["test"] == "pooled" for r in ranking):
        lines += ["", "Tests: `welch` = Welch's t-test on the per-seed values; `pooled` = a t-test for a side with "
                  "one seed, using the seed-to-seed variance pooled over the configurations with two or more "
                  "seeds (it assumes every configuration has the same seed noise)."]  # fmt: skip
    return lines


def final_chain(state: dict | None, unit: str) -> dict | None:
    """A chain's ``state_summary`` (UNet: with ``skips``) -> links, P(open) and P(open | previous state)."""
    if not state:
        return None
    indices = state.get("skips", range(len(state["marginals"])))
    return {"links": [f"{unit} {j}" for j in indices], "p_open": state["marginals"],
            "p_closed": [p[0] for p in state["open_prob"]], "p_prev_open": [p[1] for p in state["open_prob"]]}  # fmt: skip


def markov_markdown(configuration: str, rows: list[Result]) -> list[str]:
    """The chain's learned probabilities at the end of training, mean over seeds."""
    finals = [r.chain for r in rows if r.chain and r.variant is None]
    if not finals:
        return []
    lines = [f"Markov chain of **{configuration}** at the end of training (mean over {len(finals)} seed(s)):", "",
             "| link | gates | P(open) | P(open \\| previous closed) | P(open \\| previous open) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k, unit in enumerate(finals[0]["links"]):
        cols = [statistics.fmean(f[key][k] for f in finals) for key in ("p_open", "p_closed", "p_prev_open")]
        lines.append(f"| {k} | {unit} | " + " | ".join(f"{c:.3f}" for c in cols) + " |")
    return lines + [""]


def results_to_markdown(
    sweep: dict, cells: list[dict], grouped: dict, figures: dict[str, list[str]]
) -> tuple[str, dict]:
    """The report's Markdown and the summary dict behind it."""
    kind = sweep["kind"]
    columns = DIFFUSION_COLUMNS if kind == "diffusion" else CLASSIFIER_COLUMNS
    counts = {}
    for cell in cells:
        counts[cell.get("status", "missing")] = counts.get(cell.get("status", "missing"), 0) + 1
    lines = [f"# Sweep `{sweep['name']}`", ""]
    if sweep.get("description"):
        lines += [sweep["description"].strip(), ""]
    lines += [f"Kind: {kind}; {len(cells)} cells (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ").",
              f"Regenerate with `python -m skipdiff.report runs/sweeps/{sweep['name']}`; relaunching "
              f"`python -m skipdiff.sweep eval/sweeps/{sweep['name']}.yaml` finishes missing cells.", ""]  # fmt: skip
    if sweep.get("eval"):
        lines += ["Evaluation (`python -m skipdiff.eval`): " + ", ".join(f"{k}={v}" for k, v in sorted(sweep["eval"].items())) + ".", ""]  # fmt: skip
    unfinished = [f"`{c['name']}` ({c.get('status', 'missing')})" for c in cells if c.get("status") != "done"]
    if unfinished:
        lines += ["Not in the tables (not done): " + ", ".join(unfinished) + ".", ""]
    summary: dict = {"name": sweep["name"], "kind": kind, "datasets": {}}
    for dataset, configurations in grouped.items():
        lines += [f"## {dataset}", "", "| configuration | seeds | " + " | ".join(h for _, h, _ in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]  # fmt: skip
        table = {}
        for name, rows in configurations.items():
            values = {key: [r.metrics.get(key) for r in rows] for key, _, _ in columns}
            table[name] = {"seeds": [r.seed for r in rows], "cells": [r.cell for r in rows], "values": values}
            lines.append(
                f"| {name} | {len(rows)} | "
                + " | ".join(_cell_text(values[k], s) for k, _, s in columns)
                + " |"
            )
        lines += ["", TABLE_NOTES[kind], ""]
        entry = {"configurations": table}
        metric = ranking_metric(kind, configurations)
        if metric:
            key, name, lower = metric
            ranking = rank(
                {c: [r.metrics.get(key) for r in rows] for c, rows in configurations.items()}, lower
            )
            entry["ranking"] = {"metric": key, "lower_is_better": lower, "rows": ranking}
            lines += ranking_markdown(dataset, ranking, name, lower) + [""]
        for name, rows in configurations.items():
            lines += markov_markdown(name, rows)
        if figures.get(dataset):
            lines += ["### Figures", ""] + [line for figure in figures[dataset] for line in (figure, "")]
        summary["datasets"][dataset] = entry
    return "\n".join(lines).rstrip("\n") + "\n", summary


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PNG_METADATA)
    plt.close(fig)


def _loss_series(records: list[dict]) -> dict[int, float]:
    rows = dedupe_steps([r for r in records if "loss" in r or "train" in r])
    return {r["step"]: r["loss"] if "loss" in r else r["train"]["loss"] for r in rows}


def loss_curves(configurations: dict[str, list[Result]], path: Path, title: str) -> bool:
    """Training loss per configuration (mean over seeds at the steps all seeds logged), log scale."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = [plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]  # distinct hues first
    drawn = 0
    for name, rows in configurations.items():
        series = [_loss_series(r.records) for r in rows if r.variant is None]
        series = [s for s in series if s]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        ax.plot(steps, [statistics.fmean(s[t] for s in series) for t in steps], lw=1,
                color=colours[drawn % 20], label=f"{name} ({len(series)})")  # fmt: skip
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)
    return True


def classifier_heatmap(records: list[dict], path: Path, title: str) -> bool:
    """Units (stem, blocks, head) x steps heatmap of log10 gradient norms of a classifier run."""
    rows = dedupe_steps([r for r in records if isinstance(r.get("grad_norm"), dict)])
    if not rows:
        return False
    _save(plots.heatmap_figure(rows, "grad_norm", list(rows[0]["grad_norm"]), title), path)
    return True


def markov_plot(records: list[dict], path: Path, title: str) -> bool:
    """P(open) of every Markov-gated skip (classifier: block) over training."""
    rows = dedupe_steps([r for r in records if r.get("markov")])
    if rows:
        units = [f"skip {j}" for j in rows[0]["markov"]["skips"]]
        series = np.array([r["markov"]["marginals"] for r in rows]).T  # (links, steps)
    else:
        rows = dedupe_steps(
            [r for r in records if isinstance(r.get("gates"), dict) and "markov_num_updates" in r["gates"]]
        )
        if not rows:
            return False
        units = list(rows[0]["gates"]["keep_prob"])
        series = np.array([[r["gates"]["keep_prob"][u] for u in units] for r in rows]).T
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colours = plt.cm.viridis(np.linspace(0, 1, max(len(units), 2)))
    steps = [r["step"] for r in rows]
    for colour, unit, values in zip(colours, units, series, strict=False):
        ax.plot(steps, values, color=colour, lw=1, label=unit)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("P(open)")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=3)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def write_figures(kind: str, grouped: dict, out: Path) -> dict[str, list[str]]:
    """Every PNG of the report; returns the Markdown lines that show them, per dataset."""
    for old in sorted(out.glob("*.png")):
        if old.name.startswith(REPORT_FILES):
            old.unlink()  # a regenerated report holds exactly its own figures
    lines: dict[str, list[str]] = {}
    for dataset, configurations in grouped.items():
        shown = []
        name = f"loss_{_safe(dataset)}.png"
        if loss_curves(configurations, out / name, f"{dataset}: training loss"):
            shown.append(f"![training loss, {dataset}]({name})")
        heatmaps, chains = [], []
        for configuration, rows in configurations.items():
            trained = [r for r in rows if r.variant is None]
            if not trained:
                continue
            first = trained[0]  # lowest seed
            name = f"grad_{_safe(first.cell)}.png"
            title = f"{configuration} (seed {first.seed})"
            if kind == "diffusion" and any(r.get("grad_norm_by_block") for r in first.records):
                plots.grad_norm_heatmap(dedupe_steps([r for r in first.records if r.get("grad_norm_by_block")]),
                                        out / name, title)  # fmt: skip
                heatmaps.append(f"[{configuration}]({name})")
            elif kind == "classifier" and classifier_heatmap(first.records, out / name, title):
                heatmaps.append(f"[{configuration}]({name})")
            name = f"markov_{_safe(first.cell)}.png"
            if markov_plot(first.records, out / name, f"{configuration} (seed {first.seed}): P(open)"):
                chains.append(f"![Markov chain, {configuration}]({name})")
        if heatmaps:
            shown.append(
                "Gradient norm per block over training (log10, lowest seed): " + " · ".join(heatmaps)
            )
        shown += chains
        lines[dataset] = shown
    return lines


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def write_report(sweep_folder: str | Path, out: str | Path | None = None) -> Path:
    """Read a sweep folder, write ``report.md``, ``summary.json`` and the PNGs; returns ``report.md``."""
    sweep, cells = load_sweep(sweep_folder)
    out = Path(out or Path("eval") / "results" / sweep["name"])
    out.mkdir(parents=True, exist_ok=True)
    grouped = group(cells_to_results(cells, sweep["kind"]))
    figures = write_figures(sweep["kind"], grouped, out)
    markdown, summary = results_to_markdown(sweep, cells, grouped, figures)
    (out / "report.md").write_text(markdown)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep folder written by python -m skipdiff.sweep")
    parser.add_argument("--out", help="output folder (default eval/results/<sweep name>)")
    args = parser.parse_args(argv)
    path = write_report(args.sweep, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
