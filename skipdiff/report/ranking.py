"""A table's ranking: every configuration against one named reference configuration, with Holm's
correction over a declared family of tests, equivalence within declared margins, and what each row's
test can detect.

``values`` maps configuration -> {training seed: value}. Each other row is tested against the reference
on its own paired differences (:mod:`.stats`); nothing is borrowed from other rows:

* two or more shared seeds: the paired t-test on them (the seeds not shared are left out, and said so),
  or with ``test="sign-flip"`` the exact sign-flip test where a row has 6 or more pairs (paired t below);
* no shared seeds: Welch's test when both sides have 5 or more seeds (``stats.WELCH_MIN_SEEDS``: with
  fewer its size runs up to 10% at nominal 5% under unequal variances);
* otherwise (one shared seed, or too few seeds for Welch): **exploratory**, its values shown, no p. The
  one-seed test against seed noise pooled over other rows is gone: their sds of paired differences
  differ by up to 70x in the committed sweeps, which made its size anything from 0% to 22%.

With a ``margin`` m for the metric, each tested row also gets a TOST p of equivalence (H0: |δ| >= m).
Both kinds of p are Holm-adjusted together over the family (by default the table; :func:`adjust_family`
for a family of several tables), with Shaffer's bound that each row has at most one true null. A row's
verdict is one of :data:`BETTER`, :data:`WORSE`, ``"equivalent within ±m"`` (:func:`equivalent_verdict`),
:data:`UNDECIDED`, or exploratory/reference, never "not distinguishable" alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence

from . import stats

DEFAULT_REFERENCE = "skips=full"
TESTS = ("t", "sign-flip")
BETTER, WORSE, UNDECIDED = "better", "worse", "undecided at this seed count"
REFERENCE, EXPLORATORY = "reference", "exploratory"
# Margins may be declared by the metric's summary key or by a more explicit name. FID minus its floor has
# the same paired differences as FID (every row of a sweep shares the floor of each sampling seed).
METRIC_ALIASES = {"fid_minus_floor": "fid", "denoise_mse": "denoise"}


def equivalent_verdict(margin: float) -> str:
    return f"equivalent within ±{margin:g}"


def choose_reference(names: list[str], requested: str | None, table: str) -> str:
    """``requested`` (it must be one of ``names``), else ``skips=full`` when present, else the first row."""
    if requested is not None:
        if requested not in names:
            raise ValueError(f"--reference {requested!r} is no configuration of table {table!r}; choices: {names}")
        return requested
    return DEFAULT_REFERENCE if DEFAULT_REFERENCE in names else names[0]


def parse_margins(items: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """``["fid_minus_floor=0.1", "denoise=5e-4"]`` (or a dict) -> ``{"fid": 0.1, "denoise": 0.0005}`` (aliases
    resolved); ``ValueError`` naming a malformed or non-positive margin."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, Mapping) else [_split_margin(item) for item in items]
    margins = {}
    for metric, value in pairs:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--margin {metric}={value!r}: a margin must be a positive number")
        margins[METRIC_ALIASES.get(metric, metric)] = value
    return margins


def _split_margin(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"--margin {item!r}: expected metric=value, e.g. fid_minus_floor=0.1")
    metric, value = item.split("=", 1)
    try:
        float(value)
    except ValueError:
        raise ValueError(f"--margin {item!r}: {value!r} is not a number") from None
    return metric.strip(), value


def _finite(values: Mapping[int, float | None]) -> dict[int, float]:
    return {seed: float(v) for seed, v in values.items() if v is not None and math.isfinite(v)}


# --------------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------------


def _paired(
    mine: dict[int, float], ref: dict[int, float], shared: list[int], test: str, margin: float | None, alpha: float
) -> dict:
    """The paired (or sign-flip) test and TOST of a row on its shared seeds."""
    row, reference = [mine[s] for s in shared], [ref[s] for s in shared]
    differences = [a - b for a, b in zip(row, reference, strict=True)]
    flip = test == "sign-flip" and len(shared) >= stats.SIGN_FLIP_MIN_PAIRS
    found = stats.sign_flip_test(row, reference, alpha) if flip else stats.paired_test(row, reference, alpha)
    out = _from_test(found)
    out["sd_diff"] = statistics.stdev(differences)
    if margin is not None and found.p is not None:
        out["tost_p"] = stats.tost_sign_flip(differences, margin) if flip else stats.tost_paired(differences, margin)
    return out


def _welch(mine: dict[int, float], ref: dict[int, float], margin: float | None, alpha: float) -> dict:
    """Welch's test (and its TOST with the same df) for a row that shares no seed with the reference."""
    found = stats.welch_test(list(mine.values()), list(ref.values()), alpha)
    out = _from_test(found)
    if margin is not None and found.p is not None:
        # scipy (~0.8 s) only for p-values: the report's import stays light
        from scipy.stats import t

        lower = t.sf((found.delta + margin) / found.se, found.df)
        upper = t.cdf((found.delta - margin) / found.se, found.df)
        out["tost_p"] = float(max(lower, upper))
    return out


def _from_test(found: stats.TTest) -> dict:
    return {
        "test": found.name,
        "delta": found.delta,
        "se": found.se,
        "df": found.df,
        "p": found.p,
        "ci": list(found.ci) if found.ci else None,
        "pairs": found.n,
        "why_untested": None if found.p is not None else "not testable (the same difference on every seed)",
    }


def _row(
    name: str,
    mine: dict[int, float],
    ref: dict[int, float],
    is_reference: bool,
    test: str,
    margin: float | None,
    alpha: float,
) -> dict:
    values = list(mine.values())
    shared = sorted(set(mine) & set(ref))
    row = {
        "configuration": name,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "seeds": len(values),
        "shared_seeds": len(shared),
        "values_by_seed": {str(s): mine[s] for s in sorted(mine)},
        "p": None,
        "p_holm": None,
        "tost_p": None,
        "tost_p_holm": None,
        "test": None,
        "df": None,
        "ci": None,
        "se": None,
        "sd_diff": None,
        "exploratory": False,
        "why_untested": None,
    }
    if shared:
        row["delta"] = statistics.fmean(mine[s] - ref[s] for s in shared)
    else:
        row["delta"] = row["mean"] - statistics.fmean(ref.values())
    if is_reference:
        return row
    if len(shared) >= 2:
        row.update(_paired(mine, ref, shared, test, margin, alpha))
    elif not shared and min(len(mine), len(ref)) >= stats.WELCH_MIN_SEEDS:
        row.update(_welch(mine, ref, margin, alpha))
    else:
        row["exploratory"] = True
        row["why_untested"] = (
            f"exploratory: {len(shared)} shared seed(s); a paired test needs 2"
            if shared
            else f"exploratory: no shared seed; Welch's test needs {stats.WELCH_MIN_SEEDS} a side"
        )
    return row


# --------------------------------------------------------------------------------------------------
# A family of tables
# --------------------------------------------------------------------------------------------------


def _verdict(row: dict, margin: float | None, lower_is_better: bool, alpha: float) -> str:
    if row["is_reference"]:
        return REFERENCE
    if row["p"] is None:
        return row["why_untested"]
    if row["p_holm"] <= alpha:
        return BETTER if (row["delta"] < 0) == lower_is_better else WORSE
    if row["tost_p_holm"] is not None and row["tost_p_holm"] <= alpha:
        return equivalent_verdict(margin)
    return UNDECIDED


def _equivalence_bound(row: dict, level: float) -> float | None:
    """The smallest margin the row's TOST at ``level`` would accept: |δ| + t_(1-level, df) se (t-based)."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.stats import t

    if row["p"] is None or not row["se"] or not row["df"]:
        return None
    return abs(row["delta"]) + float(t.ppf(1 - level, row["df"])) * row["se"]


def _detectable(row: dict, level: float) -> float | None:
    """The smallest true difference the row's own test detects with power 0.8, two-sided at ``level``, taking
    its observed sd of paired differences as the truth (Welch rows: not computed)."""
    if row["p"] is None or row["sd_diff"] is None:
        return None
    return stats.detectable_difference(row["sd_diff"], row["pairs"], row["pairs"] - 1, level)


def adjust_family(results: Sequence[dict], scope: str = "table") -> None:
    """Holm over every test of ``results`` (rankings from :func:`compare`) as one family, in place.

    Sets each row's ``p_holm``, ``tost_p_holm``, ``verdict``, ``detectable`` (power 0.8 at the first Holm
    step's level α/k, k = rows tested in the family) and ``equivalent_within`` (the smallest margin TOST
    would accept at that level), and each result's ``family`` and ``detectable``. The difference and
    equivalence p's are adjusted together with at most k true nulls (one per row)."""
    if not results:
        return
    alpha = results[0]["alpha"]
    if any(r["alpha"] != alpha for r in results):
        raise ValueError(f"one Holm family needs one alpha, got {sorted({r['alpha'] for r in results})}")
    rows = [row for result in results for row in result["rows"] if not row["is_reference"]]
    tested = [row for row in rows if row["p"] is not None]
    k = len(tested)
    adjusted = stats.holm([row["p"] for row in rows] + [row["tost_p"] for row in rows], max_true=k or None)
    level = alpha / k if k else alpha
    for row, p_holm, tost_holm in zip(rows, adjusted[: len(rows)], adjusted[len(rows) :], strict=True):
        row["p_holm"], row["tost_p_holm"] = p_holm, tost_holm
        row["detectable"], row["equivalent_within"] = _detectable(row, level), _equivalence_bound(row, level)
    family = {
        "scope": scope,
        "tables": len(results),
        "rows_tested": k,
        "hypotheses": sum(p is not None for p in adjusted),
        "first_step_alpha": level,
    }
    for result in results:
        result["family"] = family
        for row in result["rows"]:
            row["verdict"] = _verdict(row, result["margin"], result["lower_is_better"], alpha)
        result["detectable"] = detectable_summary(result["rows"], level)


def detectable_summary(rows: list[dict], level: float) -> dict:
    """Per design (pairs, df): the range of the rows' detectable differences at ``level`` (power 0.8)."""
    designs: dict[tuple[int, int], list[tuple[float, str]]] = {}
    for row in rows:
        if row.get("detectable") is not None:
            designs.setdefault((row["pairs"], row["pairs"] - 1), []).append((row["detectable"], row["configuration"]))
    return {
        "power": stats.POWER,
        "alpha": level,
        "by_design": [
            {
                "n": n,
                "df": df,
                "min": min(found)[0],
                "min_row": min(found)[1],
                "max": max(found)[0],
                "max_row": max(found)[1],
                "rows": len(found),
            }
            for (n, df), found in sorted(designs.items())
        ],
    }


def compare(
    values: Mapping[str, Mapping[int, float | None]],
    reference: str,
    lower_is_better: bool,
    inference: Collection[str] = (),
    alpha: float = stats.ALPHA,
    margin: float | None = None,
    test: str = "t",
    family: str | None = "table",
) -> dict:
    """Every configuration against ``reference`` (see the module docstring).

    ``margin``: the equivalence margin of this metric (None: no equivalence test). ``test``: "t" or
    "sign-flip". ``family``: the scope label of a one-table Holm family, or None to leave ``p_holm`` and the
    verdicts unset until :func:`adjust_family` adjusts several tables together. ``inference`` (rows scored
    another way from the same models) is recorded only: no row borrows from another any more.

    Returns ``reference``, ``reference_seeds``, ``alpha``, ``margin``, ``test``, ``lower_is_better``,
    ``correction``, ``family`` and ``detectable`` (see :func:`adjust_family`) and ``rows``: dicts with
    ``configuration``, ``mean``, ``std``, ``seeds``, ``shared_seeds``, ``values_by_seed``, ``delta`` (mean
    paired difference, or difference of means), ``ci`` (unadjusted 95%), ``test``, ``df``, ``se``,
    ``sd_diff``, ``p``, ``p_holm``, ``tost_p``, ``tost_p_holm``, ``detectable``, ``equivalent_within``,
    ``exploratory``, ``fewer_seeds`` and ``verdict``, ordered by delta, best first."""
    if test not in TESTS:
        raise ValueError(f"test {test!r}: choose one of {TESTS}")
    if margin is not None and not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"an equivalence margin must be positive, got {margin!r}")
    clean = {name: _finite(v) for name, v in values.items()}
    clean = {name: v for name, v in clean.items() if v}
    if reference not in clean:
        raise ValueError(f"the reference {reference!r} has no values; configurations with values: {sorted(clean)}")
    ref = clean[reference]
    rows = [_row(name, mine, ref, name == reference, test, margin, alpha) for name, mine in clean.items()]
    for row in rows:
        row["is_reference"] = row["configuration"] == reference
        row["fewer_seeds"] = row["shared_seeds"] < len(ref) and not row["is_reference"]
        row["detectable"] = row["equivalent_within"] = row["verdict"] = None
    sign = 1.0 if lower_is_better else -1.0
    rows.sort(key=lambda r: (sign * r["delta"], r["configuration"]))
    result = {
        "reference": reference,
        "reference_seeds": len(ref),
        "alpha": alpha,
        "margin": margin,
        "test": test,
        "lower_is_better": lower_is_better,
        "correction": "holm",
        "inference": sorted(inference),
        "family": None,
        "detectable": None,
        "rows": rows,
    }
    if family is not None:
        adjust_family([result], family)
    return result


def rank_against(
    reference_values_by_seed: Mapping[int, float],
    rows: Mapping[str, Mapping[int, float]],
    margin: float | None = None,
    alpha: float = stats.ALPHA,
    family: str = "table",
    lower_is_better: bool = True,
    test: str = "t",
    reference_name: str = REFERENCE,
) -> dict:
    """The ranking API for callers with per-seed values in hand (a search's confirmation step).

    ``reference_values_by_seed``: {seed: value} of the reference; ``rows``: {name: {seed: value}} of the
    candidates, seeds shared with the reference where possible (paired). Holm runs over ``rows`` as one
    family labelled ``family``. Returns :func:`compare`'s dict; each row's ``verdict`` is ``"better"``,
    ``"worse"``, ``"equivalent within ±m"`` (only with a ``margin``), ``"undecided at this seed count"``, or
    ``"exploratory: ..."`` (too few seeds for a test); the reference's row is ``"reference"``."""
    if reference_name in rows:
        raise ValueError(f"a candidate is named {reference_name!r}, the reference's name; pass reference_name")
    return compare(
        {reference_name: reference_values_by_seed, **rows},
        reference_name,
        lower_is_better,
        alpha=alpha,
        margin=margin,
        test=test,
        family=family,
    )


def verdicts(result: dict) -> dict[str, str]:
    """configuration -> verdict of a ranking (the reference included)."""
    return {row["configuration"]: row["verdict"] for row in result["rows"]}
