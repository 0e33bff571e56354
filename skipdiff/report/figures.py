"""The report's PNGs: training loss per configuration, gradient-norm heatmaps, Markov chains over training.

Written by Agg with fixed metadata (no matplotlib version in the file), so the same JSON gives the same
bytes.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..eval import plots  # noqa: E402
from ..runfolder import safe_name  # noqa: E402
from .read import Result, dedupe_steps  # noqa: E402

PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same bytes across versions where possible
REPORT_FILES = ("loss_", "grad_", "markov_")


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
        name = f"loss_{safe_name(dataset)}.png"
        if loss_curves(configurations, out / name, f"{dataset}: training loss"):
            shown.append(f"![training loss, {dataset}]({name})")
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
            shown.append(
                "Gradient norm per block over training (log10, lowest seed): " + " · ".join(heatmaps)
            )
        shown += chains
        lines[dataset] = shown
    return lines


