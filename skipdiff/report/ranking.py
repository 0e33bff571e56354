"""A table's ranking: every configuration against one named reference configuration, with Holm's
correction over the table's tests, and what the table can detect at its seed count.

``values`` maps configuration -> {training seed: value}. Each other row is tested against the
reference (:mod:`.stats`):

* two or more shared seeds: a paired t-test on them (the seeds not shared are left out, and said so);
* one shared seed: its difference against the seed noise of differences pooled over the trained
  configurations that share two or more seeds with the reference (``pooled paired``); without such
  configurations, "one seed: not testable";
* no shared seeds: Welch's test when both sides have two or more seeds, else not testable.

Rows scored another way (a MAP path, an inference variant: the same trained models) are tested but never
enter the pooled noise. The p-values of a table are adjusted together by Holm; verdicts read the
adjusted p at alpha = 0.05.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection

from . import stats

DEFAULT_REFERENCE = "skips=full"


def choose_reference(names: list[str], requested: str | None, table: str) -> str:
    """``requested`` (it must be one of ``names``), else ``skips=full`` when present, else the first row."""
    if requested is not None:
        if requested not in names:
            raise ValueError(f"--reference {requested!r} is no configuration of table {table!r}; choices: {names}")
        return requested
    return DEFAULT_REFERENCE if DEFAULT_REFERENCE in names else names[0]


def _finite(values: dict[int, float | None]) -> dict[int, float]:
    return {seed: float(v) for seed, v in values.items() if v is not None and math.isfinite(v)}


def _pooled_noise(values: dict[str, dict[int, float]], reference: str, inference: Collection[str]) -> dict:
    """The sd of paired differences with the reference, pooled over trained rows sharing >= 2 seeds."""
    ref, groups, names = values[reference], [], []
    for name, mine in values.items():
        shared = sorted(set(mine) & set(ref))
        if name != reference and name not in inference and len(shared) >= 2:
            groups.append([mine[s] - ref[s] for s in shared])
            names.append(name)
    sd, df = stats.pooled_sd(groups)
    return {"sd": sd if df else None, "df": df, "from": names}


def _test(mine: dict[int, float], ref: dict[int, float], noise: dict) -> tuple[stats.TTest | None, str | None]:
    """The row's test against the reference, or None and why not."""
    shared = sorted(set(mine) & set(ref))
    if len(shared) >= 2:
        return stats.paired_test([mine[s] for s in shared], [ref[s] for s in shared]), None
    if len(shared) == 1:
        if not noise["df"]:
            return None, "one seed: not testable (no configuration shares two seeds with the reference)"
        return stats.pooled_paired_test([mine[shared[0]] - ref[shared[0]]], noise["sd"], noise["df"]), None
    test = stats.welch_test(list(mine.values()), list(ref.values()))
    return test, None if test else "not testable (one seed on a side, no seeds in common)"


def _row(name: str, mine: dict[int, float], ref: dict[int, float], noise: dict, is_reference: bool) -> dict:
    values = list(mine.values())
    shared = sorted(set(mine) & set(ref))
    row = {"configuration": name, "mean": statistics.fmean(values),
           "std": statistics.stdev(values) if len(values) > 1 else None, "seeds": len(values),
           "shared_seeds": len(shared), "p": None, "p_holm": None, "test": None, "df": None, "ci": None,
           "why_untested": None}  # fmt: skip
    if shared:
        row["delta"] = statistics.fmean(mine[s] - ref[s] for s in shared)
    else:
        row["delta"] = row["mean"] - statistics.fmean(ref.values())
    if is_reference:
        return row
    test, why = _test(mine, ref, noise)
    if test is not None:
        row.update(delta=test.delta, p=test.p, test=test.name, df=test.df, ci=list(test.ci) if test.ci else None)
        why = None if test.p is not None else "not testable (the same difference on every seed)"
    row["why_untested"] = why
    return row


def _verdict(row: dict, reference: str, lower_is_better: bool, alpha: float) -> str:
    if row["configuration"] == reference:
        return "reference"
    if row["p"] is None:
        return row["why_untested"]
    if row["p_holm"] > alpha:
        return "not distinguishable from the reference"
    better = (row["delta"] < 0) == lower_is_better
    return "better than the reference" if better else "worse than the reference"


def compare(values: dict[str, dict[int, float | None]], reference: str, lower_is_better: bool,
            inference: Collection[str] = (), alpha: float = stats.ALPHA) -> dict:  # fmt: skip
    """Every configuration against ``reference`` (see the module docstring).

    Returns ``reference``, ``noise`` (the pooled sd of paired differences, its df and the rows it comes
    from), ``detectable`` (:func:`detectable`) and ``rows``: dicts with ``configuration``, ``mean``,
    ``std``, ``seeds``, ``shared_seeds``, ``delta`` (mean paired difference, or difference of means),
    ``ci``, ``test``, ``df``, ``p``, ``p_holm`` and ``verdict``, ordered by delta, best first."""
    clean = {name: _finite(v) for name, v in values.items()}
    clean = {name: v for name, v in clean.items() if v}
    if reference not in clean:
        raise ValueError(f"the reference {reference!r} has no values; configurations with values: {sorted(clean)}")
    noise = _pooled_noise(clean, reference, inference)
    ref = clean[reference]
    rows = [_row(name, mine, ref, noise, name == reference) for name, mine in clean.items()]
    for row, adjusted in zip(rows, stats.holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adjusted
        row["verdict"] = _verdict(row, reference, lower_is_better, alpha)
        row["fewer_seeds"] = row["shared_seeds"] < len(ref) and row["configuration"] != reference
    sign = 1.0 if lower_is_better else -1.0
    rows.sort(key=lambda r: (sign * r["delta"], r["configuration"]))
    return {"reference": reference, "reference_seeds": len(ref), "alpha": alpha, "correction": "holm",
            "noise": noise, "detectable": detectable(noise, len(ref), rows, alpha), "rows": rows}  # fmt: skip


def detectable(noise: dict, reference_seeds: int, rows: list[dict], alpha: float = stats.ALPHA) -> dict:
    """The smallest true difference detected with power 0.8 at ``alpha`` (two-sided), taking the pooled sd
    of paired differences as the truth: by a paired test on the reference's seed count (df n - 1), and,
    when some row has one shared seed, by the pooled test on one seed (df of the pooled sd)."""
    out = {"power": stats.POWER, "paired": None, "one_seed": None}
    if noise["sd"] is None:
        return out
    if reference_seeds >= 2:
        delta = stats.detectable_difference(noise["sd"], reference_seeds, reference_seeds - 1, alpha)
        out["paired"] = {"n": reference_seeds, "df": reference_seeds - 1, "delta": delta}
    if any(r["test"] == "pooled paired" for r in rows):
        out["one_seed"] = {"n": 1, "df": noise["df"], "delta": stats.detectable_difference(noise["sd"], 1, noise["df"], alpha)}
    return out
