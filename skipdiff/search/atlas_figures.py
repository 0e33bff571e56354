"""The skip atlas's figures (:mod:`skipdiff.search.atlas` writes them next to ``atlas.md``).

* ``confirmation.png``, the headline: every field's confirmed configurations against its ``full``, Δ and
  95% CI by the held-out denoising MSE and by FID, coloured by the verdict, the equivalence margins shaded;
* ``importance.png``: parameter importance, field x parameter;
* ``front.png``: each field's quality-against-FLOPs front of search trials;
* ``transfer.png``: the field x configuration transfer matrix.

Each takes what ``atlas.json`` holds, so the figures can be redrawn from the committed JSON alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue", "undecided": "0.55"}
PRESET_WIDTHS = [32, 64, 64]  # the CPU preset's block widths (model "digits"), left out of short names
PRESET_LAYERS = 2


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    # matplotlib (~0.5 s) only when a figure is drawn: the tables and the command lines' --help need none
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (after use: the backend is chosen before pyplot starts)

    return plt


def short_name(params: dict) -> str:
    """A configuration's searched parameters in a few words: the skip family with its arguments, then the
    UNet where it is not the preset's (``learned · [32, 32, 64]``, ``linear outer 0.52 inner 0.00``)."""
    family = params.get("skips", "?")
    args = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{family}.")}
    words = [
        family,
        *(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sorted(args.items())
            if k not in ("warmup_steps", "min_count")
        ),
    ]
    if family == "per_skip":
        modes = [
            params[k]
            for k in sorted((k for k in params if k.startswith("skip.") and k[5:].isdigit()), key=lambda k: int(k[5:]))
        ]
        words = [f"per-skip {sum(m == 'zero' for m in modes)} of {len(modes)} zeroed"]
    widths = params.get("model.block_out_channels")
    widths = json.loads(widths) if isinstance(widths, str) else widths
    if widths is not None and list(widths) != PRESET_WIDTHS:
        words.append(f"· {widths}")
    if params.get("model.layers_per_block", PRESET_LAYERS) != PRESET_LAYERS:
        words.append(f"· {params['model.layers_per_block']} layer(s)/block")
    return " ".join(words)


def trial_of(record: dict, label: str) -> dict | None:
    """A field record's trial entry for a confirmed row's label (its trial folder's name), None if absent."""
    return next((t for t in record["trials"] if (t.get("folder") or "").endswith(label)), None)


def _verdict_colour(verdict: str | None) -> str:
    for key, colour in VERDICT_COLOURS.items():
        if verdict and verdict.startswith(key):
            return colour
    return VERDICT_COLOURS["undecided"]


def confirmation_rows(atlas: dict) -> list[dict]:
    """One entry per confirmed (non-reference) configuration of every field, in the atlas's order:
    ``{"field", "configuration", "name", "denoise": row | None, "fid": row | None}``."""
    entries = []
    for record in atlas["fields"]:
        confirmation = record.get("confirmation") or {}
        by_metric = {
            m: {r["configuration"]: r for r in confirmation.get(m, {}).get("rows", []) if not r["is_reference"]}
            for m in ("denoise", "fid")
        }
        for label in sorted(set(by_metric["denoise"]) | set(by_metric["fid"])):
            trial, _, variant = label.partition(" · ")
            entry = trial_of(record, trial)
            name = short_name(entry["params"]) if entry else trial
            entries.append(
                {
                    "field": record["field"],
                    "configuration": label,
                    "name": name + (f", {variant}" if variant else ""),
                    "denoise": by_metric["denoise"].get(label),
                    "fid": by_metric["fid"].get(label),
                }
            )
    return entries


def confirmation_figure(atlas: dict, path: Path) -> None:
    """The atlas's headline: Δ against each field's full with 95% CIs (unadjusted; the colour is the verdict
    after Holm over the atlas), MSE left, FID right, the declared equivalence margins shaded."""
    plt = pyplot()

    entries = confirmation_rows(atlas)
    if not entries:
        return
    metrics = [("denoise", "Δ held-out denoising MSE vs full"), ("fid", "Δ FID vs full (same N, same floor)")]
    fig, axes = plt.subplots(
        1, 2, figsize=(11.0, max(3.6, 1.6 + 0.34 * len(entries))), sharey=True, layout="constrained"
    )
    positions = list(range(len(entries)))[::-1]  # the first field on top
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        margin = atlas["margins"].get(metric)
        if margin:
            ax.axvspan(-margin, margin, color="tab:blue", alpha=0.1, lw=0)
        ax.axvline(0, color="0.3", lw=0.8)
        for y, entry in zip(positions, entries, strict=True):
            row = entry[metric]
            if row is None or row.get("ci") is None:
                continue
            low, high = row["ci"]
            ax.plot([low, high], [y, y], color=_verdict_colour(row["verdict"]), lw=2)
            ax.plot(row["delta"], y, "o", color=_verdict_colour(row["verdict"]), ms=5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"difference (shaded: ±{margin}, the declared margin)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [f"{e['field']}: {e['name']}" for e in entries], fontsize=8)
    axes[0].set_ylabel("field: confirmed configuration")
    for y, (above, below) in zip(positions[1:], zip(entries, entries[1:], strict=False), strict=True):
        if above["field"] != below["field"]:  # a rule between fields
            for ax in axes:
                ax.axhline(y + 0.5, color="0.8", lw=0.8)
    legend = [plt.Line2D([], [], color=c, marker="o", lw=2, label=v) for v, c in VERDICT_COLOURS.items()]
    fig.legend(
        handles=legend,
        loc="outside lower center",
        ncol=4,
        fontsize=8,
        title="verdict (Holm over the atlas; equivalence by TOST within the margin); bars: 95% CI",
        title_fontsize=8,
    )
    fig.suptitle(
        "the skip atlas: each field's searched best, retrained on fresh seeds against keeping every skip", fontsize=11
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transfer_figure(rankings: dict[str, dict], path: Path) -> None:
    plt = pyplot()

    columns = sorted({r["configuration"] for t in rankings.values() for r in t["rows"] if not r["is_reference"]})
    targets = list(rankings)
    grid = np.full((len(targets), len(columns)), np.nan)
    for i, field in enumerate(targets):
        reference = next(r for r in rankings[field]["rows"] if r["is_reference"])["mean"]
        for row in rankings[field]["rows"]:
            if not row["is_reference"]:
                grid[i, columns.index(row["configuration"])] = 100 * row["delta"] / reference
    bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(3.0 + 1.1 * len(columns), 2.4 + 0.5 * len(targets)), layout="constrained")
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(targets)), targets)
    ax.set_xlabel("configuration (found on the field it names)")
    ax.set_ylabel("target field")
    ax.set_title("transfer: Δ held-out MSE vs the target's full")
    fig.colorbar(image, ax=ax, label="Δ MSE, % of full (blue: better)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importance_figure(fields: list[dict], path: Path) -> None:
    plt = pyplot()

    names = sorted({p for f in fields for p in f["importance"]})
    if not names:
        return
    grid = np.array([[f["importance"].get(p, np.nan) for p in names] for f in fields])
    fig, ax = plt.subplots(
        figsize=(max(6.0, 1.5 + 0.45 * len(names)), max(4.2, 2.4 + 0.4 * len(fields))), layout="constrained"
    )
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(fields)), [f["field"] for f in fields])
    ax.set_xlabel("searched parameter (blank: not sampled on that field)")
    ax.set_ylabel("field")
    ax.set_title("parameter importance for the held-out denoising MSE", fontsize=10)
    fig.colorbar(image, ax=ax, label="importance (fraction, per field)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def front_figure(fields: list[dict], path: Path) -> None:
    plt = pyplot()

    drawn = [f for f in fields if f["front"]]
    if not drawn:
        return
    fig, axes = plt.subplots(
        1, len(drawn), figsize=(3.0 * len(drawn), 3.2), layout="constrained", squeeze=False, sharex=True
    )  # one panel per field: the fields' MSEs are on different scales
    for ax, record in zip(axes[0], drawn, strict=True):
        front = record["front"]
        ax.plot([p["flops"] / 1e6 for p in front], [p["value"] for p in front], marker="o")
        for point in front:
            ax.annotate(
                str(point["trial"]),
                (point["flops"] / 1e6, point["value"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        ax.set_title(record["field"])
        ax.set_xlabel("UNet forward (MFLOPs/sample)")
    axes[0][0].set_ylabel("held-out denoising MSE")
    fig.suptitle("quality against compute: each field's front of search trials (labels: trial numbers)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
