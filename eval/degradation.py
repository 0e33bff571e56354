"""The degradation experiment (He et al. 2016, Fig. 1 and 4) on scikit-learn's digits, on a CPU in minutes.

Plain and skip SkipResNets at several depths, with and without BatchNorm, several seeds each, trained
in-process with :func:`skipdiff.training.classifier.train_classifier` under one protocol. Writes to
``--out``: ``table.md`` (mean ± std over seeds of the final training loss and test accuracy, the
first-to-last block gradient ratio, parameters), ``results.json`` (every run and the summary) and
``degradation.png`` (loss, accuracy and gradient ratio against depth).

    python eval/degradation.py --depths 1 4 8 --seeds 0 1 2 --epochs 6 --num_threads 1

Library functions (``runs_to_summary``, ``summary_to_markdown``, ``summary_to_plot``) turn runs
into reports; the CLI at the bottom only wires them up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = [(skip, bn) for skip in (True, False) for bn in (True, False)]  # (skip_connections, batch_norm)


def variant_name(skip: bool, bn: bool) -> str:
    return f"{'skip' if skip else 'plain'} {'+BN' if bn else 'no BN'}"


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def run_grid(depths: list[int], seeds: list[int], base: dict, log=print) -> list[dict]:
    """Train every (depth, skip, bn, seed) in-process; one record of options and metrics per run."""
    from skipdiff.training.classifier import ClassifierOptions, train_classifier

    runs = []
    total = len(depths) * len(VARIANTS) * len(seeds)
    with tempfile.TemporaryDirectory(prefix="degradation-") as scratch:
        for depth in depths:
            for skip, bn in VARIANTS:
                for seed in seeds:
                    options = ClassifierOptions(**{**base, "depth": depth, "skip_connections": skip, "batch_norm": bn,
                                                   "seed": seed, "output_dir": f"{scratch}/run"})  # fmt: skip
                    metrics = train_classifier(options)
                    runs.append(
                        {"depth": depth, "skip_connections": skip, "batch_norm": bn, "seed": seed, **metrics}
                    )
                    log(f"[{len(runs)}/{total}] depth {depth} {variant_name(skip, bn)} seed {seed}: "
                        f"train loss {metrics['train_loss']:.4f}, test acc {metrics['test_accuracy']:.4f}, "
                        f"grad ratio init {metrics['grad_ratio_init']:.3g}, {metrics['train_seconds']:.1f}s")  # fmt: skip
    return runs


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def geometric_mean(values: list[float]) -> float:
    """Geometric mean of non-negative ratios (0 if any is 0; NaN values are left out)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan")
    if min(values) <= 0:
        return 0.0
    return math.exp(statistics.fmean(math.log(v) for v in values))


def runs_to_summary(runs: list[dict]) -> list[dict]:
    """One row per (depth, skip, bn): mean/std over seeds, ratio as geometric mean and [min, max]."""
    rows = []
    keys = sorted({(r["depth"], r["skip_connections"], r["batch_norm"]) for r in runs},
                  key=lambda k: (k[0], not k[1], not k[2]))  # fmt: skip
    for depth, skip, bn in keys:
        group = [r for r in runs if (r["depth"], r["skip_connections"], r["batch_norm"]) == (depth, skip, bn)]
        row = {"depth": depth, "num_blocks": group[0]["num_blocks"], "skip_connections": skip, "batch_norm": bn,
               "variant": variant_name(skip, bn), "seeds": len(group), "num_parameters": group[0]["num_parameters"],
               "seconds_mean": statistics.fmean(r["train_seconds"] for r in group)}  # fmt: skip
        for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([r[name] for r in group])
        for name in ("grad_ratio_init", "grad_ratio_final"):
            values = [r[name] for r in group]
            row[f"{name}_geomean"] = geometric_mean(values)
            row[f"{name}_min"], row[f"{name}_max"] = min(values), max(values)
        rows.append(row)
    return rows


def _ratio(row: dict, name: str) -> str:
    return f"{row[f'{name}_geomean']:.3g} [{row[f'{name}_min']:.2g}, {row[f'{name}_max']:.2g}]"


def summary_to_markdown(summary: list[dict], command: str, protocol: str, wall_seconds: float) -> str:
    """The Markdown table, with the command that produced it in the header."""
    lines = [
        "# Degradation on digits: plain vs skip SkipResNets, with and without BatchNorm",
        "",
        f"Command: `{command}`",
        "",
        f"Protocol: {protocol}. Wall time of the whole grid: {wall_seconds / 60:.1f} min.",
        "",
        "Train loss / accuracy: eval mode over the whole train split after the last epoch. "
        "Mean ± sample std over seeds. Gradient ratio: norm of the first residual block's gradient over "
        "the last block's, at step 1 (init) and at the last logged step (end); geometric mean over seeds "
        "[min, max]; < 1 means the gradient shrinks on its way to the input, 0 that it vanished "
        "(underflow), > 1 that it grows.",
        "",
        "| blocks/stage | blocks | variant | params | train loss | train acc | test acc | grad ratio init | grad ratio end | s/run |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['depth']} | {r['num_blocks']} | {r['variant']} | {r['num_parameters']:,} "
            f"| {r['train_loss_mean']:.4f} ± {r['train_loss_std']:.4f} "
            f"| {r['train_accuracy_mean']:.4f} ± {r['train_accuracy_std']:.4f} "
            f"| {r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f} "
            f"| {_ratio(r, 'grad_ratio_init')} | {_ratio(r, 'grad_ratio_final')} | {r['seconds_mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def summary_to_plot(summary: list[dict], path: str | os.PathLike) -> None:
    """Train loss, test accuracy and initial gradient ratio against depth; one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_loss", "final train loss", "log"), ("test_accuracy", "test accuracy", "linear"),
              ("grad_ratio_init", "grad ratio first/last block at init", "log")]  # fmt: skip
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = {
        (True, True): ("C0", "-"),
        (True, False): ("C0", "--"),
        (False, True): ("C3", "-"),
        (False, False): ("C3", "--"),
    }
    for axis, (name, title, scale) in zip(axes, panels, strict=True):
        for skip, bn in VARIANTS:
            rows = [r for r in summary if (r["skip_connections"], r["batch_norm"]) == (skip, bn)]
            depths = [r["depth"] for r in rows]
            color, line = styles[(skip, bn)]
            if name == "grad_ratio_init":
                values = [
                    max(r["grad_ratio_init_geomean"], 1e-12) for r in rows
                ]  # 0 (vanished) drawn at 1e-12
                axis.plot(
                    depths, values, color=color, linestyle=line, marker="o", label=variant_name(skip, bn)
                )
            else:
                axis.errorbar(depths, [r[f"{name}_mean"] for r in rows], yerr=[r[f"{name}_std"] for r in rows],
                              color=color, linestyle=line, marker="o", capsize=3, label=variant_name(skip, bn))  # fmt: skip
        axis.set_yscale(scale)
        axis.set_xlabel("residual blocks per stage (3 stages)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8], help="residual blocks per stage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per configuration")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per run")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32], help="channels of the 3 stages")
    parser.add_argument("--resolution", type=int, default=8, help="image size (digits are 8x8)")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="AdamW peak learning rate (cosine)")
    parser.add_argument("--batch_size", type=int, default=64, help="train batch size")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="eval/results/degradation", help="output folder")
    args = parser.parse_args(argv)
    for name in ("epochs", "resolution", "batch_size", "num_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.depths) < 1:
        raise ValueError(f"--depths must all be >= 1, got {args.depths}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # one line per run instead of 36 progress bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    command = "python eval/degradation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    base = dict(dataset="digits", model="skipresnet", widths=args.widths, resolution=args.resolution,
                num_epochs=args.epochs, learning_rate=args.learning_rate, train_batch_size=args.batch_size,
                num_threads=args.num_threads, report_to="none", log_every=10)  # fmt: skip
    start = time.perf_counter()
    runs = run_grid(args.depths, args.seeds, base)
    wall = time.perf_counter() - start
    summary = runs_to_summary(runs)
    protocol = (f"digits {args.resolution}x{args.resolution} (1437 train / 360 test), SkipResNet widths {args.widths}, "
                f"AdamW lr {args.learning_rate} cosine, weight decay 1e-4, batch {args.batch_size}, {args.epochs} epochs, "
                f"no gradient clipping, {len(args.seeds)} seeds, {args.num_threads} CPU thread(s)")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(summary_to_markdown(summary, command, protocol, wall))
    results = {"command": command, "protocol": protocol, "base_options": base, "wall_seconds": wall,
               "summary": summary, "runs": runs}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    summary_to_plot(summary, out / "degradation.png")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
