"""The degradation experiment (He et al. 2016, Fig. 1 and 4) on scikit-learn's digits, run to convergence.

Plain and skip SkipResNets at several depths, with and without BatchNorm, several seeds each, trained
in-process with :func:`skipdiff.training.classifier.train_classifier` under one protocol: AdamW with a
cosine schedule to zero over ``--epochs`` epochs (long enough that the train loss of every net that can
fit the data has flattened out), plus a learning-rate sweep at the deepest setting, so that a variant that
fails is not just a variant trained with the wrong step size. Every run reports train *and* test loss and
accuracy (train: eval mode over the whole train split), the first-to-last block gradient ratio at the
first and the last logged step, and how much the activations grow through the blocks (RMS of the last
block's output over the stem's, train mode, on 256 train images, at the start and at the end).

Writes to ``--out``: ``table.md``, ``results.json`` (every run, its per-epoch curves, and the summary) and
``degradation.png``. Runs finished so far are kept in ``runs.partial.jsonl`` there, so an interrupted
experiment continues where it stopped; the file is removed once the results are written.

    python eval/degradation.py --depths 1 4 8 --seeds 0 1 2 --epochs 40 --learning_rate 3e-3 \\
        --sweep_lrs 3e-4 1e-3 1e-2 --sweep_seeds 0 1 --budget_check --jobs 2 --num_threads 1

Library functions (``runs_to_summary``, ``summary_to_markdown``, ``summary_to_plot``) turn runs into
reports; the CLI at the bottom only wires them up.
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

VARIANTS = [(skip, bn) for skip in (True, False) for bn in (True, False)]  # (skip_connections, batch_norm)
KEY = ("depth", "skip_connections", "batch_norm", "learning_rate", "num_epochs")
DIGITS_TRAIN = 1437  # images in the digits train split (skipdiff.data: 1797, test fraction 0.2, split seed 0)


def variant_name(skip: bool, bn: bool) -> str:
    return f"{'skip' if skip else 'plain'} {'+BN' if bn else 'no BN'}"


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def grid_cells(
    depths: list[int], seeds: list[int], lr: float, sweep_lrs: list[float], sweep_seeds: list[int], epochs: int
) -> list[dict]:
    """Every (depth, skip, bn, lr, seed): the main grid at ``lr``, and ``sweep_lrs`` at the deepest depth."""
    cells = [
        dict(depth=d, skip_connections=s, batch_norm=b, learning_rate=lr, seed=seed, num_epochs=epochs)
        for d in depths
        for s, b in VARIANTS
        for seed in seeds
    ]
    cells += [
        dict(depth=max(depths), skip_connections=s, batch_norm=b, learning_rate=sweep_lr, seed=seed, num_epochs=epochs)
        for sweep_lr in sweep_lrs
        if sweep_lr != lr
        for s, b in VARIANTS
        for seed in sweep_seeds
    ]
    return cells


def budget_check_cells(summary: list[dict], depth: int, seed: int, epochs: int) -> list[dict]:
    """Each variant at ``depth`` with its best learning rate again, for ``epochs`` (twice the budget): does a
    longer run change the answer, i.e. had the first one converged?"""
    return [
        dict(
            depth=depth,
            skip_connections=r["skip_connections"],
            batch_norm=r["batch_norm"],
            learning_rate=r["learning_rate"],
            seed=seed,
            num_epochs=epochs,
        )
        for r in best_learning_rates(summary, depth)
    ]


def cell_id(cell: dict) -> str:
    return (
        f"d{cell['depth']}-{'skip' if cell['skip_connections'] else 'plain'}-{'bn' if cell['batch_norm'] else 'nobn'}"
        f"-lr{cell['learning_rate']:g}-e{cell['num_epochs']}-s{cell['seed']}"
    )


def stats_to_curves(records: list[dict]) -> dict:
    """Per-epoch curves from a run's stats.jsonl: the train loss of each logged window (train mode, running
    over the window), the test loss and accuracy at each epoch's end, and the activation RMS per block."""
    train = [
        {"step": r["step"], "loss": r["train"]["loss"], "accuracy": r["train"]["accuracy"]}
        for r in records
        if "train" in r
    ]
    test = [
        {"epoch": r["epoch"], "loss": r["test"]["loss"], "accuracy": r["test"]["accuracy"]}
        for r in records
        if "test" in r
    ]
    activations = next((r["activation_rms"] for r in records if "activation_rms" in r), None)
    return {"train": train, "test": test, "activation_rms": activations}


def run_cell(cell: dict, base: dict) -> dict:
    """Train one cell in a scratch folder; its options, metrics and curves (runs in a worker process)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from skipdiff.runfolder import read_stats
    from skipdiff.training.classifier import ClassifierOptions, train_classifier

    with tempfile.TemporaryDirectory(prefix="degradation-") as scratch:
        options = ClassifierOptions(**{**base, **cell, "output_dir": f"{scratch}/run"})
        start = time.process_time()
        metrics = train_classifier(options)
        cpu_seconds = time.process_time() - start
        curves = stats_to_curves(read_stats(Path(scratch) / "run" / "stats.jsonl"))
    return {**cell, **metrics, "cpu_seconds": cpu_seconds, "curves": curves}


def run_grid(cells: list[dict], base: dict, partial: Path, jobs: int, log=print) -> list[dict]:
    """Train every cell not yet in ``partial`` (a JSONL of finished runs), ``jobs`` at a time."""
    done = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    finished = {cell_id(r) for r in done}
    # the longest runs first, so that two workers finish together
    todo = sorted((c for c in cells if cell_id(c) not in finished), key=lambda c: -c["depth"] * c["num_epochs"])
    log(f"{len(finished & {cell_id(c) for c in cells})} of these runs already done, {len(todo)} to go")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_cell, cell, base) for cell in todo]
        for future in as_completed(futures):
            run = future.result()
            done.append(run)
            with partial.open("a") as handle:
                handle.write(json.dumps(run) + "\n")
            log(
                f"[{len(done)}] {cell_id(run)}: train loss {run['train_loss']:.4g}, train acc "
                f"{run['train_accuracy']:.4f}, test acc {run['test_accuracy']:.4f}, {run['cpu_seconds']:.0f} s CPU"
            )
    wanted = {cell_id(c) for c in cells}
    return [r for r in done if cell_id(r) in wanted]


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def geometric_mean(values: list[float]) -> float:
    """Geometric mean of non-negative ratios (0 if any is 0; None and NaN values are left out)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan")
    if min(values) <= 0:
        return 0.0
    return math.exp(statistics.fmean(math.log(v) for v in values))


def runs_to_summary(runs: list[dict]) -> list[dict]:
    """One row per (depth, skip, bn, lr): mean/std over seeds; ratios as geometric mean and [min, max]."""
    rows = []
    keys = sorted({tuple(r[k] for k in KEY) for r in runs}, key=lambda k: (k[0], not k[1], not k[2], k[3]))
    for key in keys:
        group = [r for r in runs if tuple(r[k] for k in KEY) == key]
        row = {
            **dict(zip(KEY, key, strict=True)),
            "num_blocks": group[0]["num_blocks"],
            "seeds": len(group),
            "variant": variant_name(key[1], key[2]),
            "num_parameters": group[0]["num_parameters"],
            "epochs": group[0]["epochs"],
            "cpu_seconds_mean": statistics.fmean(r["cpu_seconds"] for r in group),
        }
        for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([r[name] for r in group])
        row["gap_mean"], row["gap_std"] = mean_std([r["train_accuracy"] - r["test_accuracy"] for r in group])
        for name in ("grad_ratio_init", "grad_ratio_final", "activation_growth_start", "activation_growth_end"):
            values = [r[name] for r in group]
            row[f"{name}_geomean"] = geometric_mean(values)
            row[f"{name}_min"], row[f"{name}_max"] = min(values), max(values)
        rows.append(row)
    return rows


def best_learning_rates(summary: list[dict], depth: int) -> list[dict]:
    """Per variant at ``depth``: the row of the learning rate with the lowest mean train loss."""
    best = []
    for skip, bn in VARIANTS:
        rows = [r for r in summary if (r["depth"], r["skip_connections"], r["batch_norm"]) == (depth, skip, bn)]
        if rows:
            best.append(min(rows, key=lambda r: r["train_loss_mean"]))
    return best


def _ratio(row: dict, name: str) -> str:
    return f"{row[f'{name}_geomean']:.3g} [{row[f'{name}_min']:.2g}, {row[f'{name}_max']:.2g}]"


def _table_row(r: dict) -> str:
    return (
        f"| {r['num_blocks']} | {r['variant']} | {r['learning_rate']:g} | {r['seeds']} "
        f"| {r['train_loss_mean']:.2e} ± {r['train_loss_std']:.1e} "
        f"| {r['train_accuracy_mean']:.4f} ± {r['train_accuracy_std']:.4f} "
        f"| {r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f} | {r['gap_mean']:+.4f} "
        f"| {_ratio(r, 'grad_ratio_init')} | {_ratio(r, 'grad_ratio_final')} "
        f"| {_ratio(r, 'activation_growth_start')} | {_ratio(r, 'activation_growth_end')} "
        f"| {r['cpu_seconds_mean']:.0f} |"
    )


TABLE_HEADER = [
    "| blocks | variant | lr | seeds | train loss | train acc | test acc | train−test acc | grad ratio start "
    "| grad ratio end | act. growth start | act. growth end | CPU s/run |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def summary_to_markdown(
    summary: list[dict], command: str, protocol: str, cpu_seconds: float, lr: float, epochs: int
) -> str:
    """The Markdown report: the main grid, the learning-rate sweep at the deepest depth, the best rates, and
    the budget check (the best rates for twice the epochs), if it was run."""
    longer = [r for r in summary if r["num_epochs"] != epochs]
    summary = [r for r in summary if r["num_epochs"] == epochs]
    deepest = max(r["depth"] for r in summary)
    main = [r for r in summary if r["learning_rate"] == lr]
    sweep = [r for r in summary if r["depth"] == deepest]
    lines = [
        "# Degradation on digits: plain vs skip SkipResNets, with and without BatchNorm, to convergence",
        "",
        f"Command: `{command}`",
        "",
        f"Protocol: {protocol}. CPU time of all runs: {cpu_seconds / 60:.1f} min.",
        "",
        "Train loss / accuracy: eval mode over the whole train split after the last epoch; test: the held-out "
        "split. Mean ± sample std over seeds. Gradient ratio: norm of the first residual block's gradient over "
        "the last block's at the first (start) and last (end) logged step, geometric mean over seeds [min, max]; "
        "< 1: the gradient shrinks on its way to the input. Activation growth: RMS of the last block's output "
        "over the stem's output, train mode, 256 train images, before training (start) and after (end).",
        "",
        f"## Depth at learning rate {lr:g}",
        "",
        *TABLE_HEADER,
        *map(_table_row, main),
        "",
        f"## Learning-rate sweep at {sweep[0]['num_blocks']} blocks",
        "",
        *TABLE_HEADER,
        *map(_table_row, sweep),
        "",
        f"## Best learning rate per variant at {sweep[0]['num_blocks']} blocks (lowest train loss)",
        "",
        *TABLE_HEADER,
        *map(_table_row, best_learning_rates(summary, deepest)),
    ]
    if longer:
        lines += [
            "",
            f"## Budget check: the best rates again for {longer[0]['num_epochs']} epochs (one seed)",
            "",
            *TABLE_HEADER,
            *map(_table_row, longer),
        ]
    return "\n".join(lines) + "\n"


def summary_to_plot(summary: list[dict], runs: list[dict], lr: float, path: str | os.PathLike) -> None:
    """Six panels: train and test accuracy, gradient ratio and activation growth against depth at ``lr``;
    train and test accuracy against the learning rate at the deepest depth; the deepest nets' loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5), layout="constrained")
    styles = {
        (True, True): ("C0", "-"),
        (True, False): ("C0", "--"),
        (False, True): ("C3", "-"),
        (False, False): ("C3", "--"),
    }
    main = [r for r in summary if r["learning_rate"] == lr]
    deepest = max(r["depth"] for r in summary)
    panels = [
        ("train_accuracy", "train accuracy (eval mode)", "linear"),
        ("test_accuracy", "test accuracy", "linear"),
        ("grad_ratio_init", "grad ratio first/last block, step 1", "log"),
        ("activation_growth_start", "activation RMS last block / stem, init", "log"),
    ]
    for axis, (name, title, scale) in zip(axes.flat[:4], panels, strict=True):
        for (skip, bn), (color, line) in styles.items():
            rows = [r for r in main if (r["skip_connections"], r["batch_norm"]) == (skip, bn)]
            x = [r["num_blocks"] for r in rows]
            if name.endswith("accuracy"):
                axis.errorbar(
                    x,
                    [r[f"{name}_mean"] for r in rows],
                    yerr=[r[f"{name}_std"] for r in rows],
                    color=color,
                    linestyle=line,
                    marker="o",
                    capsize=3,
                    label=variant_name(skip, bn),
                )
            else:
                values = [max(r[f"{name}_geomean"], 1e-12) for r in rows]  # 0 (vanished) drawn at 1e-12
                axis.plot(x, values, color=color, linestyle=line, marker="o", label=variant_name(skip, bn))
        axis.set(yscale=scale, xlabel="residual blocks (3 stages)", ylabel=title, title=f"{title}, lr {lr:g}")
    _plot_sweep(axes.flat[4], summary, deepest, styles)
    _plot_curves(axes.flat[5], runs, deepest, lr, styles)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _plot_sweep(axis, summary: list[dict], depth: int, styles: dict) -> None:
    for (skip, bn), (color, _) in styles.items():
        rows = sorted(
            (r for r in summary if (r["depth"], r["skip_connections"], r["batch_norm"]) == (depth, skip, bn)),
            key=lambda r: r["learning_rate"],
        )
        lrs = [r["learning_rate"] for r in rows]
        axis.plot(
            lrs,
            [r["train_accuracy_mean"] for r in rows],
            color=color,
            marker="o",
            linestyle="-" if bn else "--",
            label=f"{variant_name(skip, bn)} train",
        )
        axis.plot(lrs, [r["test_accuracy_mean"] for r in rows], color=color, marker="x", linestyle=":", alpha=0.7)
    blocks = next(r["num_blocks"] for r in summary if r["depth"] == depth)
    axis.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="accuracy",
        title=f"{blocks} blocks: train (o) and test (x, dotted) accuracy",
    )


def _plot_curves(axis, runs: list[dict], depth: int, lr: float, styles: dict) -> None:
    for (skip, bn), (color, line) in styles.items():
        run = next(
            (
                r
                for r in runs
                if (r["depth"], r["skip_connections"], r["batch_norm"], r["learning_rate"]) == (depth, skip, bn, lr)
            ),
            None,
        )
        if run is not None:
            train = run["curves"]["train"]
            axis.plot([t["step"] for t in train], [max(t["loss"], 1e-6) for t in train], color=color, linestyle=line)
    axis.set(
        yscale="log", xlabel="step", ylabel="train loss (log)", title=f"deepest nets, lr {lr:g}: train loss per epoch"
    )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8], help="residual blocks per stage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per configuration")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs per run (cosine schedule to 0)")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="AdamW peak learning rate of the main grid")
    parser.add_argument(
        "--sweep_lrs",
        type=float,
        nargs="*",
        default=[3e-4, 1e-3, 1e-2],
        help="more peak learning rates, at the deepest depth only",
    )
    parser.add_argument("--sweep_seeds", type=int, nargs="+", default=[0, 1], help="seeds of the sweep's extra rates")
    parser.add_argument(
        "--budget_check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rerun each variant at the deepest depth with its best rate for twice the epochs",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32], help="channels of the 3 stages")
    parser.add_argument("--resolution", type=int, default=8, help="image size (digits are 8x8)")
    parser.add_argument("--batch_size", type=int, default=64, help="train batch size")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (processes)")
    parser.add_argument("--out", default="eval/results/degradation", help="output folder")
    args = parser.parse_args(argv)
    for name in ("epochs", "resolution", "batch_size", "num_threads", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.depths) < 1:
        raise ValueError(f"--depths must all be >= 1, got {args.depths}")
    if not all(lr > 0 and math.isfinite(lr) for lr in [args.learning_rate, *args.sweep_lrs]):
        raise ValueError(f"learning rates must be positive, got {[args.learning_rate, *args.sweep_lrs]}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python eval/degradation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    steps_per_epoch = DIGITS_TRAIN // args.batch_size  # incomplete batches are dropped
    # One train record per epoch (the first after step 1): the curves are per-epoch train losses.
    base = dict(
        dataset="digits",
        model="skipresnet",
        widths=args.widths,
        resolution=args.resolution,
        train_batch_size=args.batch_size,
        num_threads=args.num_threads,
        report_to="none",
        log_every=steps_per_epoch,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "runs.partial.jsonl"
    cells = grid_cells(args.depths, args.seeds, args.learning_rate, args.sweep_lrs, args.sweep_seeds, args.epochs)
    runs = run_grid(cells, base, partial, args.jobs)
    if args.budget_check:
        check = budget_check_cells(runs_to_summary(runs), max(args.depths), args.sweep_seeds[0], 2 * args.epochs)
        runs += run_grid(check, base, partial, args.jobs)
    summary = runs_to_summary(runs)
    cpu = sum(r["cpu_seconds"] for r in runs)
    protocol = (
        f"digits {args.resolution}x{args.resolution} ({DIGITS_TRAIN} train / 360 test), SkipResNet widths {args.widths}, "
        f"AdamW, cosine schedule to 0, weight decay 1e-4, batch {args.batch_size}, {args.epochs} epochs "
        f"({args.epochs * steps_per_epoch} steps), no gradient clipping, seeds {args.seeds} (sweep: {args.sweep_seeds}), "
        f"{args.num_threads} CPU thread(s) per run"
    )
    (out / "table.md").write_text(summary_to_markdown(summary, command, protocol, cpu, args.learning_rate, args.epochs))
    results = {
        "command": command,
        "protocol": protocol,
        "base_options": base,
        "cpu_seconds": cpu,
        "summary": summary,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    same_budget = [r for r in runs if r["num_epochs"] == args.epochs]  # the budget check is in the table only
    summary_to_plot(runs_to_summary(same_budget), same_budget, args.learning_rate, out / "degradation.png")
    partial.unlink()
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
