"""The report's PNGs: training loss per configuration, gradient-norm heatmaps, Markov chains over training,
and a sample sheet per dataset (each configuration's own samples, cut from its evaluation grid); for
inference sweeps, the ranking metric of every configuration by sampling seed and, with a skip cache, the
metric against the measured speed-up and its FLOP bound.

Made and written by :mod:`skipdiff.eval.plots` (constrained layout, so nothing is clipped; Agg with fixed
metadata, no matplotlib version in the file), so the same JSON gives the same bytes.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..eval import plots  # noqa: E402
from ..grids import cut_cells, image_grid  # noqa: E402
from ..runfolder import atomic_path, safe_name  # noqa: E402
from .read import Result, dedupe_steps, paired_speedups  # noqa: E402

REPORT_FILES = ("loss_", "grad_", "markov_", "samples_", "metric_", "speed_")
SHEET_IMAGES = 8  # samples per configuration in a sample sheet


def _save(fig, path: Path) -> None:
    plots.save_figure(fig, path, dpi=100)


def _loss_series(records: list[dict]) -> dict[int, float]:
    rows = dedupe_steps([r for r in records if "loss" in r or "train" in r])
    return {r["step"]: r["loss"] if "loss" in r else r["train"]["loss"] for r in rows}


def loss_curves(configurations: dict[str, list[Result]], path: Path, title: str) -> bool:
    """Training loss per configuration (mean over seeds at the steps all seeds logged), log scale."""
    fig, ax = plots.new_figure(8, 4)
    colours = [plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]  # distinct hues first
    drawn = 0
    for name, rows in configurations.items():
        series = [_loss_series(r.records) for r in rows if r.variant is None]
        series = [s for s in series if s]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        ax.plot(
            steps,
            [statistics.fmean(s[t] for s in series) for t in steps],
            lw=1,
            color=colours[drawn % 20],
            label=f"{name} ({len(series)})",
        )
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss, mean over seeds (log)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(
        fontsize=6, ncol=1 + drawn // 20, loc="outside right upper", title="configuration (seeds)", title_fontsize=6
    )
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
    fig, ax = plots.new_figure(8, 3.5)
    colours = plt.cm.viridis(np.linspace(0, 1, max(len(units), 2)))
    steps = [r["step"] for r in rows]
    for colour, unit, values in zip(colours, units, series, strict=False):
        ax.plot(steps, values, color=colour, lw=1, label=unit)
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("P(open), per example")
    ax.set_title(title)
    fig.legend(fontsize=6, ncol=1 + len(units) // 16, loc="outside right upper")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def sample_sheet(configurations: dict[str, list[Result]], path: Path, title: str) -> bool:
    """One row per configuration (its lowest seed's model), the first samples of its evaluation grid, image
    *i* of every row from the same noise (``skipdiff.seeding.derived_seed``); False when no configuration's
    grid recorded where its cells are."""
    rows, labels, seeds = [], [], set()
    for name, results in configurations.items():
        drawn = sorted((r for r in results if r.samples is not None), key=lambda r: r.seed)
        if not drawn:
            continue
        own = drawn[0].samples
        with Image.open(own["path"]) as grid:
            cells = cut_cells(grid, own["layout"], own["column"], SHEET_IMAGES)
        rows.append(cells)
        labels.append(name)
        seeds.add(own["seed"])
    count = min((len(cells) for cells in rows), default=0)
    sizes = {cells[0].size for cells in rows}
    if not count or len(sizes) != 1:
        return False
    images = [cell for cells in rows for cell in cells[:count]]
    legend = (
        f"{title}: each configuration's own samples (lowest training seed), sampling seed "
        f"{', '.join(str(s) for s in sorted(seeds, key=str))}; column i starts from the same noise in every row"
    )
    with atomic_path(path) as tmp:
        image_grid(
            images, columns=count, row_labels=labels, column_labels=[f"image {i}" for i in range(count)], legend=legend
        ).save(tmp, format="PNG")
    return True


# --------------------------------------------------------------------------------------------------
# Inference sweeps: one model, a setting per row, values per sampling seed
# --------------------------------------------------------------------------------------------------

# The metric an inference figure shows (the first every row has): key, axis label, lower is better.
INFERENCE_METRICS = (("fid", "FID", True), ("clip_score", "CLIP score", False), ("denoise", "denoising MSE", True))


def _values(rows: list[Result], key: str) -> list[float]:
    return [r.metrics[key] for r in rows if r.metrics.get(key) is not None]


def inference_metric(configurations: dict[str, list[Result]]) -> tuple[str, str, bool] | None:
    """The first of :data:`INFERENCE_METRICS` that every configuration has a value of."""
    for key, label, lower in INFERENCE_METRICS:
        if all(_values(rows, key) for rows in configurations.values()):
            return key, label, lower
    return None


def metric_plot(
    configurations: dict[str, list[Result]],
    metric: tuple[str, str, bool],
    reference: str | None,
    path: Path,
    title: str,
) -> bool:
    """One row per configuration (spec order, top down): its value at each sampling seed (dots) and their
    mean ± sample std (bar), the reference in colour, FID's real-vs-real floor as a dashed line."""
    key, label, lower = metric
    names = [name for name, rows in configurations.items() if _values(rows, key)]
    if not names:
        return False
    fig, ax = plots.new_figure(7, 1.2 + 0.3 * len(names))
    for y, name in enumerate(names):
        values = _values(configurations[name], key)
        colour = "tab:orange" if name == reference else "black"
        ax.scatter(values, [y] * len(values), s=14, color="tab:blue", alpha=0.6, zorder=3)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.errorbar(statistics.fmean(values), y, xerr=spread, fmt="o", ms=4, color=colour, capsize=3, zorder=4)
    floors = [v for name in names for r in configurations[name] for v in r.floors.values()]
    if key == "fid" and floors:
        ax.axvline(statistics.fmean(floors), color="grey", ls="--", lw=1, label="real-vs-real floor (mean)")
        ax.legend(fontsize=7, loc="best")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} ({'lower' if lower else 'higher'} is better): per sampling seed (dots), mean ± std (bar)")
    ax.set_ylabel("configuration")
    ax.set_title(title + (f" (reference {reference} in orange)" if reference in names else ""))
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return True


def speed_plot(
    configurations: dict[str, list[Result]], metric: tuple[str, str, bool], reference: str, path: Path, title: str
) -> bool:
    """The metric (mean ± std over sampling seeds) against the measured sampling speed-up over ``reference``
    (mean over the seeds both were timed at; filled) and against each skip cache's FLOP bound (hollow, joined
    to its measured point): the quality a setting pays for its speed. False without a timed cached row."""
    key, label, lower = metric
    speedups = paired_speedups(configurations, reference)
    points = []
    for name, rows in configurations.items():
        values = _values(rows, key)
        measured = 1.0 if name == reference else (statistics.fmean(speedups[name]) if speedups.get(name) else None)
        bound = next((r.metrics["cache_bound"] for r in rows if r.metrics.get("cache_bound")), None)
        if values and measured is not None:
            points.append(
                (name, measured, bound, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            )
    if not any(bound for _, _, bound, _, _ in points):
        return False
    fig, ax = plots.new_figure(7, 4.5)
    for name, measured, bound, mean, spread in points:
        colour = "tab:orange" if name == reference else "tab:blue"
        ax.errorbar(measured, mean, yerr=spread, fmt="o", ms=5, color=colour, capsize=3, zorder=3)
        ax.annotate(name, (measured, mean), xytext=(4, 4), textcoords="offset points", fontsize=6)
        if bound:
            ax.plot([measured, bound], [mean, mean], color="grey", lw=0.8, ls=":", zorder=2)
            ax.scatter([bound], [mean], s=28, facecolors="none", edgecolors="grey", zorder=3)
    ax.scatter([], [], s=28, color="tab:blue", label="measured speed-up (mean over sampling seeds)")
    ax.scatter([], [], s=28, facecolors="none", edgecolors="grey", label="FLOP bound of the skip cache")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(f"sampling speed-up over {reference} (x)")
    ax.set_ylabel(f"{label}, mean ± std over sampling seeds ({'lower' if lower else 'higher'} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def inference_figures(
    dataset: str, configurations: dict[str, list[Result]], reference: str | None, out: Path
) -> list[str]:
    """The inference figures of one dataset (:func:`metric_plot`, :func:`speed_plot`) and their Markdown."""
    metric = inference_metric(configurations)
    if metric is None:
        return []
    shown = []
    name = f"metric_{safe_name(dataset)}.png"
    if metric_plot(configurations, metric, reference, out / name, f"{dataset}: {metric[1]} by configuration"):
        shown.append(f"![{metric[1]} by configuration, {dataset}]({name})")
    name = f"speed_{safe_name(dataset)}.png"
    if reference and speed_plot(configurations, metric, reference, out / name, f"{dataset}: {metric[1]} against speed"):
        shown.append(f"![{metric[1]} against the measured speed-up, {dataset}]({name})")
    return shown


def write_figures(
    kind: str, grouped: dict, out: Path, references: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """Every PNG of the report; returns the Markdown lines that show them, per dataset (``references``:
    dataset -> the reference configuration, for the inference figures)."""
    for old in sorted(out.glob("*.png")):
        if old.name.startswith(REPORT_FILES):
            old.unlink()  # a regenerated report holds exactly its own figures
    lines: dict[str, list[str]] = {}
    for dataset, configurations in grouped.items():
        shown = []
        name = f"loss_{safe_name(dataset)}.png"
        if loss_curves(configurations, out / name, f"{dataset}: training loss"):
            shown.append(f"![training loss, {dataset}]({name})")
        name = f"samples_{safe_name(dataset)}.png"
        if kind != "classifier" and sample_sheet(configurations, out / name, dataset):
            shown.append(f"![samples, {dataset}]({name})")
        if kind == "inference":
            shown += inference_figures(dataset, configurations, (references or {}).get(dataset), out)
        heatmaps, chains = [], []
        for configuration, rows in configurations.items():
            trained = [r for r in rows if r.variant is None]
            if not trained:
                continue
            first = trained[0]  # lowest seed
            name = f"grad_{safe_name(first.cell)}.png"
            title = f"{configuration} (seed {first.seed})"
            if kind == "diffusion" and plots.grad_norm_heatmap(
                dedupe_steps([r for r in first.records if r.get("grad_norm_by_block")]), out / name, title
            ):
                heatmaps.append(f"[{configuration}]({name})")
            elif kind == "classifier" and classifier_heatmap(first.records, out / name, title):
                heatmaps.append(f"[{configuration}]({name})")
            name = f"markov_{safe_name(first.cell)}.png"
            if markov_plot(first.records, out / name, f"{configuration} (seed {first.seed}): P(open)"):
                chains.append(f"![Markov chain, {configuration}]({name})")
        if heatmaps:
            shown.append("Gradient norm per block over training (log10, lowest seed): " + " · ".join(heatmaps))
        shown += chains
        lines[dataset] = shown
    return lines
