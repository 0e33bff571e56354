"""PNG plots of evaluation results (matplotlib, Agg backend), and the layout every skipdiff figure shares.

Every figure skipdiff writes is made by :func:`new_figure` (matplotlib's constrained layout, so titles,
tick labels, axis labels, legends and colour bars are fitted inside the canvas) and written by
:func:`save_figure` (fixed PNG metadata: the same data gives the same bytes). Axes name their units.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..runfolder import atomic_path  # noqa: E402
from .stability import ordered_blocks  # noqa: E402

PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same bytes across versions where possible


def new_figure(width: float, height: float, **subplots):
    """``(figure, axes)`` of ``width`` x ``height`` inches with constrained layout (nothing is clipped)."""
    return plt.subplots(figsize=(width, height), layout="constrained", **subplots)


def save_figure(fig, path, dpi: int = 120) -> None:
    """Write ``fig`` as PNG at ``dpi`` with fixed metadata (atomically: a full disk leaves the old file), and
    close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, metadata=PNG_METADATA)
    finally:
        plt.close(fig)


def loss_by_timestep(results: dict[str, dict], path) -> None:
    """Held-out denoising loss per timestep bucket, one line per run."""
    fig, ax = new_figure(6, 3.5)
    for name, result in results.items():
        centres = [(b["t_min"] + b["t_max"]) / 2 for b in result["buckets"]]
        ax.plot(centres, [b["loss"] for b in result["buckets"]], marker="o", label=name)
    ax.set_xlabel("timestep t (centre of each bucket)")
    ax.set_ylabel("denoising MSE, test split (log)")
    ax.set_yscale("log")
    ax.set_title("held-out denoising loss by timestep")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def grad_norms_over_training(records: list[dict], path, title: str = "") -> None:
    """Gradient norm of each block over training (log scale), blocks from input to output."""
    rows = [r for r in records if r.get("grad_norm_by_block")]
    blocks = ordered_blocks({b for r in rows for b in r["grad_norm_by_block"]})
    steps = [r["step"] for r in rows]
    fig, ax = new_figure(8, 4)
    colours = plt.cm.viridis(np.linspace(0, 1, max(len(blocks), 2)))
    for colour, block in zip(colours, blocks, strict=False):
        ax.plot(steps, [r["grad_norm_by_block"].get(block, np.nan) for r in rows], color=colour, label=block, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient L2 norm per block (log)")
    ax.set_title(title)
    fig.legend(fontsize=6, ncol=1 + len(blocks) // 16, loc="outside right upper")
    save_figure(fig, path)


def grad_norm_heatmap(records: list[dict], path, title: str = "") -> bool:
    """Blocks x training steps heatmap of log10 gradient norms; False (nothing written) when the records
    hold no UNet block's norm (a gate-only run logs its gates' norm alone)."""
    rows = [r for r in records if r.get("grad_norm_by_block")]
    blocks = ordered_blocks({b for r in rows for b in r["grad_norm_by_block"]})
    if not blocks:
        return False
    save_figure(heatmap_figure(rows, "grad_norm_by_block", blocks, title), path)
    return True


def heatmap_figure(rows: list[dict], key: str, units: list[str], title: str):
    """A units x steps heatmap of log10 of ``row[key][unit]`` (gradient norms); the caller saves it."""
    matrix = np.array([[r[key].get(u, np.nan) for r in rows] for u in units])
    fig, ax = new_figure(7, 0.3 * len(units) + 1.5)
    image = ax.imshow(
        np.log10(np.maximum(matrix, 1e-12)),
        aspect="auto",
        cmap="magma",
        extent=(rows[0]["step"], rows[-1]["step"], len(units) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ax.set_xlabel("training step")
    ax.set_ylabel("block (input at the top)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 gradient L2 norm")
    return fig
