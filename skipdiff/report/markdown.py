"""The report's Markdown (and the summary dict behind it): per dataset a table of configurations, the
FID floor by sampling seed, a ranking against the reference with its tests, the Markov chains, figures.

Deterministic: fixed float formats, rows in the spec's order (rankings by their difference from the
reference), no timestamps or absolute paths.
"""

from __future__ import annotations

import math
import shlex
import statistics
from pathlib import Path

from . import ranking as ranking_module
from . import stats
from .read import INFERENCE, Result, paired_speedups, seconds_by_seed

# Columns of the tables: (key, header, format). Metrics the ranking can use: (key, name, lower is better).
DIFFUSION_COLUMNS = [
    ("fid", "FID ↓", "pm"),
    ("fid_floor", "FID floor", "floor"),
    ("kid", "KID ↓", "kid"),
    ("denoise", "denoise MSE ↓", "pm"),
    ("final_loss", "final train loss", "pm"),
    ("loss_spikes", "loss spikes", "mean"),
    ("grad_spikes", "grad spikes", "mean"),
    ("grad_cv", "grad-norm CV", "mean"),
    ("first_last", "first/last grad", "mean"),
    ("closed", "skips closed", "mean"),
    ("flops_saved", "FLOPs saved", "mean"),
    ("parameters", "parameters", "int"),
    ("seconds_per_step", "s/step", "mean"),
]
CLASSIFIER_COLUMNS = [
    ("test_accuracy", "test accuracy ↑", "pm"),
    ("test_loss", "test loss ↓", "pm"),
    ("train_loss", "train loss", "pm"),
    ("grad_ratio_init", "first/last grad (init)", "mean"),
    ("grad_ratio_final", "first/last grad (final)", "mean"),
    ("nonfinite", "non-finite steps", "mean"),
    ("parameters", "parameters", "int"),
    ("seconds_per_step", "s/step", "mean"),
]
INFERENCE_COLUMNS = [
    ("fid", "FID ↓", "pm"),
    ("fid_floor", "FID floor", "floor"),
    ("kid", "KID ↓", "kid"),
    ("clip_score", "CLIP score ↑", "pm"),
    ("denoise", "denoise MSE ↓", "mean"),
    ("parameters", "parameters", "int"),
]
COLUMNS = {"diffusion": DIFFUSION_COLUMNS, "classifier": CLASSIFIER_COLUMNS, "inference": INFERENCE_COLUMNS}
OPTIONAL_COLUMNS = ("kid", "clip_score")  # shown only when some row has a value
TABLE_NOTES = {
    "diffusion": "Mean ± sample std over training seeds (one value per seed; FID and KID are each cell's mean over "
    "its sampling seeds). FID floor: the real-vs-real FID at the same sample count, mean ± std over the sampling "
    "seeds (it depends on the seed's draw of held-out images, not on the model). KID: mean with its 95% t interval "
    "over training seeds; a row with one training seed shows ± torch-fidelity's std over KID subsets instead. "
    "Stability: spikes by skipdiff.eval's median + k·MAD rule; CV = std/mean of the total gradient norm; "
    "first/last = median ratio of the first to the last block's gradient norm (< 1: vanishing toward the input). "
    "Rows marked (inference) are the trained models of the row above them scored another way: other skips at "
    "inference only, or (`map`) a model with stochastic skips (markov, bernoulli) run on its most likely path, with "
    "the fraction of skips that path closes and the FLOPs of one UNet forward saved by removing them "
    "(skipdiff.eval.compute); the model's own row samples with every stochastic gate at its expected value.",
    "inference": "No training: one pretrained model, each row a setting applied at inference only (a skip "
    "specification, a skip cache; weights untouched). Seeds are sampling seeds, shared by every row (image i of "
    "seed s starts from the same noise in every row), so rows are compared pairwise by seed: mean ± sample std "
    "over sampling seeds. The denoising loss is seed-free (every held-out image noised once per timestep bucket "
    "from fixed seeds).",
    "classifier": "Mean ± sample std over training seeds. Test accuracy and loss on the held-out split after "
    "the last epoch; train loss in eval mode over the whole train split; first/last grad = the first "
    "residual block's gradient norm over the last one's, at step 1 (init) and at the last logged step "
    "(final) (< 1: vanishing toward the input).",
}
RANKING_METRICS = {
    "diffusion": [("fid", "FID", True), ("denoise", "denoising MSE", True)],
    "inference": [("fid", "FID", True), ("clip_score", "CLIP score", False)],
    "classifier": [("test_accuracy", "test accuracy", False)],
}


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for a single value) of the finite, non-None values."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _num(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4g}"


def _pm(mean, std) -> str:
    if mean is None:
        return "–"
    return _num(mean) + ("" if std is None else f" ± {std:.2g}")


def _p(value) -> str:
    return "–" if value is None else f"{value:.2g}"


def row_floors(rows: list[Result]) -> dict[int, float]:
    """Sampling seed -> FID floor, over the row's cells (the same seed gives the same floor)."""
    by_seed: dict[int, list[float]] = {}
    for result in rows:
        for seed, value in result.floors.items():
            by_seed.setdefault(seed, []).append(value)
    return {seed: statistics.fmean(by_seed[seed]) for seed in sorted(by_seed)}


def _kid_text(rows: list[Result]) -> str:
    values = [r.metrics.get("kid") for r in rows if r.metrics.get("kid") is not None]
    if not values:
        return "–"
    interval = stats.t_interval(values)
    if interval is not None:
        return f"{_num(statistics.fmean(values))} [{interval[0]:.2g}, {interval[1]:.2g}]"
    spread = rows[0].metrics.get("kid_subset_std")
    return _num(values[0]) + ("" if spread is None else f" ± {spread:.2g} (subsets)")


def _cell_text(rows: list[Result], key: str, style: str) -> str:
    if style == "kid":
        return _kid_text(rows)
    if style == "floor":
        floors = row_floors(rows)
        if floors:
            return _pm(*mean_std(list(floors.values())))
    mean, std = mean_std([r.metrics.get(key) for r in rows])
    if style == "int":
        return "–" if mean is None else f"{round(mean):,}"
    return _pm(mean, std) if style in ("pm", "floor") else _num(mean)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def columns_for(kind: str, configurations: dict[str, list[Result]]) -> list[tuple[str, str, str]]:
    """The kind's columns, without optional ones that no row has."""
    columns = COLUMNS[kind]
    present = {key for rows in configurations.values() for r in rows for key, v in r.metrics.items() if v is not None}
    return [c for c in columns if c[0] not in OPTIONAL_COLUMNS or c[0] in present]


def configuration_table(kind: str, configurations: dict[str, list[Result]]) -> tuple[list[str], dict]:
    """The table of configurations and its summary (per-seed values of every column)."""
    columns = columns_for(kind, configurations)
    lines = [
        "| configuration | seeds | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    table = {}
    for name, rows in configurations.items():
        table[name] = {
            "seeds": [r.seed for r in rows],
            "cells": [r.cell for r in rows],
            "values": {key: [r.metrics.get(key) for r in rows] for key, _, _ in columns},
        }
        if any(r.floors for r in rows):
            table[name]["fid_floor_by_sampling_seed"] = {str(s): v for s, v in row_floors(rows).items()}
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(_cell_text(rows, k, s) for k, _, s in columns) + " |")
    return lines, table


def floor_line(configurations: dict[str, list[Result]]) -> tuple[list[str], dict | None]:
    """The FID floor by sampling seed over the whole table, one line (and its summary)."""
    floors = row_floors([r for rows in configurations.values() for r in rows])
    if not floors:
        return [], None
    mean, std = mean_std(list(floors.values()))
    seeds = ", ".join(f"seed {seed}: {value:.4g}" for seed, value in floors.items())
    return (
        [f"FID floor by sampling seed: {seeds} (mean {_pm(mean, std)} over {len(floors)} seed(s)).", ""],
        {"by_sampling_seed": {str(s): v for s, v in floors.items()}, "mean": mean, "std": std},
    )


def ranking_metric(kind: str, configurations: dict[str, list[Result]]) -> tuple[str, str, bool] | None:
    """The first metric every configuration of the dataset has (FID, else denoising loss)."""
    for key, name, lower in RANKING_METRICS[kind]:
        if all(any(r.metrics.get(key) is not None for r in rows) for rows in configurations.values()):
            return key, name, lower
    return None


def markov_markdown(configuration: str, rows: list[Result]) -> list[str]:
    """The chain's learned probabilities at the end of training, mean over seeds."""
    finals = [r.chain for r in rows if r.chain and r.variant is None]
    if not finals:
        return []
    lines = [
        f"Markov chain of **{configuration}** at the end of training (mean over {len(finals)} seed(s)):",
        "",
        "| link | gates | P(open) | P(open \\| previous closed) | P(open \\| previous open) |",
        "|---|---|---|---|---|",
    ]
    clipped = 0
    for k, unit in enumerate(finals[0]["links"]):
        cells = [f"{statistics.fmean(f['p_open'][k] for f in finals):.3f}"]
        for key in ("p_closed", "p_prev_open"):
            at_clip = sum(_at_clip(f[key][k], f) for f in finals)
            clipped += at_clip
            mark = f" (clip: {at_clip}/{len(finals)})" if at_clip else ""
            cells.append(f"{statistics.fmean(f[key][k] for f in finals):.3f}{mark}")
        lines.append(f"| {k} | {unit} | " + " | ".join(cells) + " |")
    if clipped:
        bounds = sorted({(f.get("p_min"), f.get("p_max")) for f in finals})
        lines += [
            "",
            "(clip: n/N): in n of the N seeds this transition probability sits at a bound every open probability is "
            f"clipped to (p_min, p_max = {', '.join(f'{lo}, {hi}' for lo, hi in bounds)}): the chain would have "
            "gone further, so the value is the clip, not an estimate of it.",
        ]
    return lines + [""]


def _at_clip(value: float, chain: dict) -> bool:
    """Whether a transition probability equals (within float32 rounding) one of its chain's bounds."""
    bounds = [b for b in (chain.get("p_min"), chain.get("p_max")) if b is not None]
    return any(math.isclose(value, bound, abs_tol=1e-6) for bound in bounds)


# --------------------------------------------------------------------------------------------------
# Rankings
# --------------------------------------------------------------------------------------------------


def _test_text(row: dict) -> str:
    if row["test"] in ("paired", "sign-flip"):
        left_out = row["seeds"] - row["shared_seeds"]  # seeds the reference lacks: not in the test
        return f"{row['test']} ({row['shared_seeds']} seeds" + (f"; {left_out} unshared left out)" if left_out else ")")
    if row["test"] == "welch":
        return f"Welch (df {row['df']:.2g})"
    if row.get("exploratory"):
        return f"none ({row['shared_seeds']} shared seed(s))"
    return "–"


def _delta_text(row: dict, reference: str) -> str:
    if row["configuration"] == reference:
        return "–"
    text = f"{row['delta']:+.4g}"
    return text + (f" [{row['ci'][0]:+.3g}, {row['ci'][1]:+.3g}]" if row["ci"] else "")


def ranking_table(result: dict, metric: str) -> list[str]:
    """The ranking's rows: every configuration against the reference, best difference first (with a TOST
    column when the metric has an equivalence margin)."""
    reference, n_ref = result["reference"], result["reference_seeds"]
    margin = result.get("margin")
    tost = f" TOST ±{margin:g} p (Holm) |" if margin is not None else ""
    lines = [
        f"| # | configuration | seeds | {metric} | Δ vs reference [95% CI] | test | p | p (Holm) |{tost} verdict |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if tost else "") + "---|",
    ]
    for i, row in enumerate(result["rows"], 1):
        name = f"**{row['configuration']}**" if row["configuration"] == reference else row["configuration"]
        verdict = row["verdict"] + (
            f"; fewer seeds than the reference ({row['seeds']} of {n_ref})" if row["seeds"] < n_ref else ""
        )
        tost_cell = f" {_p(row.get('tost_p_holm'))} |" if tost else ""
        lines.append(
            f"| {i} | {name} | {row['seeds']} | {_pm(row['mean'], row['std'])} | "
            f"{_delta_text(row, reference)} | {_test_text(row)} | {_p(row['p'])} | {_p(row['p_holm'])} |"
            f"{tost_cell} {verdict} |"
        )
    return lines


def family_text(result: dict) -> str:
    """Which Holm family a ranking's adjusted p's belong to."""
    family = result["family"]
    scope = {"table": "this table"}.get(family["scope"], f"the family `{family['scope']}`")
    tables = f" in {family['tables']} tables" if family["tables"] > 1 else ""
    return (
        f"Holm over {scope} ({family['rows_tested']} tested row(s){tables}, {family['hypotheses']} "
        f"hypotheses; first step at α/{family['rows_tested'] or 1} = {family['first_step_alpha']:.3g})"
    )


# What a seed is, and why two rows' values at one seed are paired, by kind of sweep.
SEEDS = {
    "inference": ("sampling", "image i of a sampling seed starts from the same noise in every row"),
    "diffusion": ("training", "a seed fixes the initial weights, the data order and the noise"),
    "classifier": ("training", "a seed fixes the initial weights and the data order"),
}


def _method_note(result: dict, kind: str = "diffusion") -> str:
    seed, why = SEEDS.get(kind, SEEDS["diffusion"])
    test = (
        "`sign-flip` = the exact sign-flip test of the paired differences (rows with 6 or more pairs; "
        "`paired` = the paired t-test below that); "
        if result.get("test") == "sign-flip"
        else "`paired` = paired t-test on those seeds; "
    )
    text = (
        f"Reference: **{result['reference']}** ({result['reference_seeds']} {seed} seed(s); another with "
        f"`--reference`). Each row is compared with it on the {seed} seeds they share ({why}, so the values "
        "are paired), on its own differences only: "
        + test
        + "`Welch` = Welch's t-test, for rows with no seed in common (5 or more seeds a side); a row with fewer seeds than its "
        "test needs is exploratory (values shown, no p). "
    )
    if result.get("margin") is not None:
        text += (
            f"Equivalence: two one-sided tests (TOST) of |Δ| < {result['margin']:g}, the declared margin; "
            "their p's are Holm-adjusted with the difference tests (at most one true null per row). "
        )
    text += (
        f"p (Holm) = {family_text(result)}; verdicts read it at α = {result['alpha']}: better/worse, "
        "equivalent within the margin, or undecided at this seed count. Δ = mean of (row − reference) over the "
        "shared seeds (difference of means without shared seeds), with its unadjusted 95% interval."
    )
    return text


def detectable_note(result: dict, metric: str) -> str:
    """One sentence: the smallest difference in ``metric`` each row's test could detect, at the level Holm
    applies at its first step (power 0.8)."""
    found = result["detectable"]
    if not found["by_design"]:
        return (
            "Smallest detectable difference: not estimable (no row shares two seeds with the reference and "
            "varies between them)."
        )
    parts = []
    for design in found["by_design"]:
        span = (
            f"{design['min']:.3g}"
            if design["rows"] == 1
            else f"{design['min']:.3g} ({design['min_row']}) to {design['max']:.3g} ({design['max_row']})"
        )
        parts.append(f"|Δ| ≥ {span} by the paired test on {design['n']} seeds (df {design['df']})")
    return (
        f"Smallest detectable difference in {metric} (power {found['power']}, two-sided at {found['alpha']:.3g}, "
        "the level Holm applies at its first step, taking each row's own sd of paired differences as the "
        "truth): " + "; ".join(parts) + '. A smaller true difference is likely to read "undecided".'
    )


def _findings(dataset: str, result: dict, metric: str) -> str:
    rows = [r for r in result["rows"] if r["configuration"] != result["reference"]]
    labels = [ranking_module.WORSE, ranking_module.BETTER]
    if result.get("margin") is not None:
        labels.append(ranking_module.equivalent_verdict(result["margin"]))
    labels.append(ranking_module.UNDECIDED)
    groups = {
        label: [f"{r['configuration']} ({r['delta']:+.3g})" for r in rows if r["verdict"] == label] for label in labels
    }
    exploratory = [r["configuration"] for r in rows if r["exploratory"]]
    untested = [r["configuration"] for r in rows if r["p"] is None and not r["exploratory"]]
    tests = sum(r["p"] is not None for r in rows)
    text = f"**Findings ({dataset}, {metric} against {result['reference']}, Holm over {tests} test(s)):** "
    text += "; ".join(f"{label}: {', '.join(names) if names else 'none'}" for label, names in groups.items()) + "."
    if exploratory:
        text += f" Exploratory (too few seeds for a test): {', '.join(exploratory)}."
    if untested:
        text += f" Not testable: {', '.join(untested)}."
    return text


# The heading of a comparison's second section, the same test by exact sign flips (ranking.compare(test="sign-flip")).
SIGN_FLIP_HEADING = (
    "## The same, by an exact sign-flip test (no normality assumed; a row with fewer than 6 pairs keeps the paired t)"
)


def comparison_section(heading: str, result: dict, metric: str) -> list[str]:
    """A comparison (:func:`skipdiff.report.ranking.compare`) as a block of lines for a study's own table:
    a blank line, ``heading``, the ranking table and the smallest detectable difference."""
    return ["", heading, "", *ranking_table(result, metric), "", detectable_note(result, metric)]


def ranking_markdown(dataset: str, result: dict, metric: str, lower: bool, kind: str = "diffusion") -> list[str]:
    """The ranking section of one table (``kind``: the sweep's, which says what its seeds are)."""
    heading = f"### {metric} against {result['reference']} ({'lower' if lower else 'higher'} is better)"
    return [
        heading,
        "",
        *ranking_table(result, metric),
        "",
        _method_note(result, kind),
        "",
        detectable_note(result, metric),
        "",
        _findings(dataset, result, metric),
        "",
    ]


def rank_configurations(
    configurations: dict[str, list[Result]],
    key: str,
    lower: bool,
    reference: str,
    margins: dict[str, float] | None = None,
    test: str = "t",
) -> dict:
    """:func:`ranking.compare` on the table's per-seed values of ``key`` (one Holm family per table)."""
    values = {name: {r.seed: r.metrics.get(key) for r in rows} for name, rows in configurations.items()}
    inference = [name for name in configurations if name.endswith(INFERENCE)]
    return ranking_module.compare(values, reference, lower, inference, margin=(margins or {}).get(key), test=test)


# --------------------------------------------------------------------------------------------------
# Sampling speed (inference sweeps with a skip cache)
# --------------------------------------------------------------------------------------------------

SPEED_NOTE = (
    "Measured: wall-clock seconds per image of each row's FID / CLIP-score sampling in this sweep "
    "(decoding included, feature extraction not), mean ± sample std over sampling seeds; the speed-up is "
    "the reference's seconds over the row's at each sampling seed, mean [min, max] over the seeds they share. "
    "The cells ran one after another on one machine, not interleaved (bench/skip_cache.py interleaves "
    "repeats for timings to quote). FLOP bound: T / (R + (T − R) f) for the run's T steps with R full "
    "forwards, f the FLOPs a cached step still computes (eval.json's cache section)."
)


def speed_section(configurations: dict[str, list[Result]], reference: str) -> tuple[list[str], dict | None]:
    """A table of sampling seconds per image, the measured speed-up against ``reference`` (paired by
    sampling seed) and the FLOP bound of each row's skip cache; ``([], None)`` when no row used a cache."""
    bounds = {
        name: next((r.metrics.get("cache_bound") for r in rows if r.metrics.get("cache_bound")), None)
        for name, rows in configurations.items()
    }
    if not any(bounds.values()):
        return [], None
    speedups = paired_speedups(configurations, reference)
    lines = [
        f"### Sampling speed against {reference}",
        "",
        "| configuration | s/image | measured speed-up | FLOP bound |",
        "|---|---|---|---|",
    ]
    summary: dict = {"reference": reference, "rows": {}}
    for name, rows in configurations.items():
        seconds = seconds_by_seed(rows)
        ratios = speedups.get(name, [])
        mean, std = mean_std(list(seconds.values()))
        if name == reference:
            measured = "1 (reference)" if seconds else "–"
        elif ratios:
            measured = f"{statistics.fmean(ratios):.3g} [{min(ratios):.3g}, {max(ratios):.3g}]"
        else:
            measured = "–"
        bound = "–" if bounds[name] is None else f"{bounds[name]:.3g}"
        lines.append(f"| {name} | {_pm(mean, std)} | {measured} | {bound} |")
        summary["rows"][name] = {
            "seconds_per_image": {str(k): v for k, v in sorted(seconds.items())},
            "speedup_by_seed": ratios if name != reference else None,
            "speedup": statistics.fmean(ratios) if ratios and name != reference else None,
            "flop_bound": bounds[name],
        }
    return lines + ["", SPEED_NOTE, ""], summary


# --------------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------------


def shown_path(path: str | Path) -> str | None:
    """``path`` as a report may name it: relative as given, an absolute one relative to the working directory
    when it lies inside it, else None (reports name no absolute paths: committed copies must not carry a
    machine's folders, and the same JSON must give the same bytes wherever it is read)."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return None


def command_text(command: dict) -> str:
    """A command recorded in sweep.json (:func:`skipdiff.sweep.runner.spec_command`) as a shell line, its
    paths as :func:`shown_path` shows them (``<spec>``, ``<folder>`` where it shows none)."""
    parts = ["python", "-m", command["module"], _quoted(command["spec"], "<spec>")]
    if command.get("out") is not None:
        parts += ["--out", _quoted(command["out"], "<folder>")]
    return " ".join(parts)


def _quoted(path: str, placeholder: str) -> str:
    shown = shown_path(path)
    return placeholder if shown is None else shlex.quote(shown)


def _header(sweep: dict, cells: list[dict], folder: str) -> list[str]:
    """Title, description, cell counts, and the commands that regenerate the report from ``folder`` (the
    sweep folder it was read from) and finish missing cells (the command sweep.json records)."""
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.get("status", "missing")] = counts.get(cell.get("status", "missing"), 0) + 1
    name = sweep["name"]
    lines = [f"# Sweep `{name}`", ""]
    if sweep.get("description"):
        lines += [sweep["description"].strip(), ""]
    shown = _quoted(folder, "<folder>")
    command = sweep.get("relaunch")
    relaunch = (
        f"relaunching `{command_text(command)}` finishes missing cells"
        if command
        else f"relaunching its spec (`python -m skipdiff.sweep <spec> --out {shown}`; this sweep.json does not "
        "record which file) finishes missing cells"
    )
    lines += [
        f"Kind: {sweep['kind']}; {len(cells)} cells ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ").",
        f"Regenerate with `python -m skipdiff.report {shown}` (written to {shown}/report/; `--out` writes it "
        f"elsewhere, e.g. a committed copy under eval/results/); {relaunch}.",
    ]
    hidden = [path for path in [folder, *((command or {}).get(k) for k in ("spec", "out"))] if path is not None]
    if any(shown_path(path) is None for path in hidden):
        lines.append(
            "(A path outside the working directory is not written into a report: fill in `<spec>` / `<folder>`.)"
        )
    lines.append("")
    if sweep.get("eval"):
        settings = ", ".join(f"{k}={v}" for k, v in sorted(sweep["eval"].items()))
        lines += [f"Evaluation (`python -m skipdiff.eval`): {settings}.", ""]
    unfinished = [f"`{c['name']}` ({c.get('status', 'missing')})" for c in cells if c.get("status") != "done"]
    if unfinished:
        lines += ["Not in the tables (not done): " + ", ".join(unfinished) + ".", ""]
    return lines


def dataset_section(
    kind: str,
    dataset: str,
    configurations: dict[str, list[Result]],
    reference: str,
    figures: list[str],
    margins: dict[str, float] | None = None,
    test: str = "t",
) -> tuple[list[str], dict]:
    """One dataset's table, floor line, ranking, chains and figures, and its summary entry."""
    table_lines, table = configuration_table(kind, configurations)
    lines = [f"## {dataset}", "", *table_lines, "", TABLE_NOTES[kind], ""]
    entry: dict = {"configurations": table}
    floor_lines, floors = floor_line(configurations)
    lines += floor_lines
    if floors:
        entry["fid_floor"] = floors
    metric = ranking_metric(kind, configurations)
    if metric:
        key, name, lower = metric
        result = rank_configurations(configurations, key, lower, reference, margins, test)
        entry["ranking"] = {"metric": key, "lower_is_better": lower, **result}
        lines += ranking_markdown(dataset, result, name, lower, kind)
    if kind == "inference":
        speed_lines, speed = speed_section(configurations, reference)
        if speed:
            lines += speed_lines
            entry["speed"] = speed
    for name, rows in configurations.items():
        lines += markov_markdown(name, rows)
    if figures:
        lines += ["### Figures", ""] + [line for figure in figures for line in (figure, "")]
    return lines, entry


def results_to_markdown(
    sweep: dict,
    cells: list[dict],
    grouped: dict,
    references: dict[str, str],
    figures: dict[str, list[str]],
    margins: dict[str, float] | None = None,
    test: str = "t",
    folder: str | None = None,
) -> tuple[str, dict]:
    """The report's Markdown and the summary dict behind it (``references``: dataset -> reference row;
    ``margins``: metric key -> equivalence margin; ``test``: "t" or "sign-flip"; ``folder``: the sweep
    folder read, named in the regenerate command)."""
    lines = _header(sweep, cells, folder or str(sweep.get("folder", f"runs/sweeps/{sweep['name']}")))
    summary: dict = {
        "name": sweep["name"],
        "kind": sweep["kind"],
        "margins": dict(margins or {}),
        "test": test,
        "datasets": {},
    }
    for dataset, configurations in grouped.items():
        section, entry = dataset_section(
            sweep["kind"], dataset, configurations, references[dataset], figures.get(dataset, []), margins, test
        )
        lines += section
        summary["datasets"][dataset] = entry
    return "\n".join(lines).rstrip("\n") + "\n", summary
