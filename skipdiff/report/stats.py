"""The statistics behind a sweep's rankings: tests of a configuration against a reference over training
seeds, equivalence within a declared margin, Holm's correction, t intervals, and the smallest difference
a test can detect.

Each configuration contributes one value per training seed. A training seed fixes the initial weights,
the data order and the noise, so two configurations run on the same seed are paired: their difference
on that seed is free of the seed's own effect. The tests, each on that row's own differences only:

* :func:`paired_test`: the paired t-test (``scipy.stats.ttest_rel``) on two or more shared seeds;
* :func:`sign_flip_test`: its distribution-free counterpart, exact over all 2^n sign flips of the
  differences (valid when a difference is as likely to be +d as -d under the null); it can reach
  p < 0.05 only from 6 pairs on (its smallest p is 2 / 2^n);
* :func:`welch_test`: Welch's test (``scipy.stats.ttest_ind(equal_var=False)``) without shared seeds, used
  by the ranking only from :data:`WELCH_MIN_SEEDS` values a side (below that its size is not kept);
* :func:`tost_paired` / :func:`tost_sign_flip`: two one-sided tests (TOST) of equivalence, H0: |δ| >= m
  against |δ| < m for a declared margin m;
* :func:`holm`: Holm's step-down adjustment, optionally with a bound on how many null hypotheses can be
  true at once (a difference and an equivalence null of one row cannot both be true, Shaffer 1986).

No test borrows variance from another configuration: the sds of paired differences in the committed
sweeps differ by 70x between rows, so a pooled sd would give some rows a nominal 5% test that rejects a
true null 0-22% of the time (tests/test_report_size.py checks every test here by simulation).

The core arithmetic works on numpy arrays along the last axis (``*_arrays`` functions), so a simulation
runs exactly the code the report runs; the scalar functions wrap them. Checked against scipy in
tests/test_report_stats.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

ALPHA = 0.05
POWER = 0.8
SIGN_FLIP_MIN_PAIRS = 6  # 2 / 2^6 = 0.031: the fewest pairs at which an exact sign-flip test can reach 0.05
# Welch's test keeps its size (<= 0.058 at nominal 0.05 for sd ratios 1/70 to 70, tests/test_report_size.py)
# only from 5 values a side: at 2 vs 4 a true null is rejected 10% of the time when the smaller side varies more.
WELCH_MIN_SEEDS = 5
SIGN_FLIP_MAX_PAIRS = 16  # 65536 flips enumerated exactly; more would need Monte Carlo flips


@dataclasses.dataclass(frozen=True)
class TTest:
    """A two-sided test of ``delta`` = mean(row) - mean(reference) against 0."""

    name: str  # "paired", "sign-flip" or "welch"
    n: int  # pairs (paired tests) or the row's values (welch)
    df: float
    delta: float
    se: float  # standard error of delta
    p: float | None  # None when the standard error is 0 (identical differences: nothing to test)
    ci: tuple[float, float] | None  # the (1 - alpha) t interval of delta, unadjusted

    @property
    def statistic(self) -> float | None:
        return self.delta / self.se if self.se > 0 else None


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _variance(values: Sequence[float]) -> float:
    """Sample variance (ddof 1)."""
    mean = _mean(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


# --------------------------------------------------------------------------------------------------
# Vectorised cores: arrays of shape (..., n), one test per leading index
# --------------------------------------------------------------------------------------------------


def paired_arrays(differences: np.ndarray) -> dict[str, np.ndarray]:
    """The paired t-test on the last axis: ``delta``, ``se``, ``df`` and the two-sided ``p`` (nan where the
    standard error is 0)."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.stats import t

    d = np.asarray(differences, dtype=float)
    n = d.shape[-1]
    delta = d.mean(-1)
    se = d.std(-1, ddof=1) / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(se > 0, 2 * t.sf(np.abs(delta / se), n - 1), np.nan)
    return {"delta": delta, "se": se, "df": np.full(delta.shape, n - 1.0), "p": p}


def welch_arrays(row: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Welch's test on the last axes of two independent samples (``delta``, ``se``, ``df``, ``p``)."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.stats import t

    row, reference = np.asarray(row, dtype=float), np.asarray(reference, dtype=float)
    na, nb = row.shape[-1], reference.shape[-1]
    a, b = row.var(-1, ddof=1) / na, reference.var(-1, ddof=1) / nb
    se = np.sqrt(a + b)
    delta = row.mean(-1) - reference.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(se > 0, (a + b) ** 2 / (a**2 / (na - 1) + b**2 / (nb - 1)), 0.0)
        p = np.where(se > 0, 2 * t.sf(np.abs(delta / se), np.maximum(df, 1e-300)), np.nan)
    return {"delta": delta, "se": se, "df": df, "p": p}


def tost_paired_arrays(differences: np.ndarray, margin: float) -> np.ndarray:
    """TOST p on the last axis: the larger of the one-sided t-tests of H0: δ <= -m and H0: δ >= m (nan where
    the standard error is 0). p <= α is the (1 - 2α) t interval of δ lying inside (-m, m)."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.stats import t

    tests = paired_arrays(differences)
    delta, se, df = tests["delta"], tests["se"], tests["df"]
    with np.errstate(divide="ignore", invalid="ignore"):
        above_lower = t.sf((delta + margin) / se, df)  # H0: δ <= -m
        below_upper = t.cdf((delta - margin) / se, df)  # H0: δ >= m
        return np.where(se > 0, np.maximum(above_lower, below_upper), np.nan)


def _signs(n: int) -> np.ndarray:
    """All 2^n sign vectors, shape (2^n, n)."""
    if n > SIGN_FLIP_MAX_PAIRS:
        raise ValueError(f"an exact sign-flip test enumerates 2^n flips; n = {n} > {SIGN_FLIP_MAX_PAIRS}")
    return np.array(list(itertools.product((1.0, -1.0), repeat=n)))


def sign_flip_arrays(differences: np.ndarray) -> np.ndarray:
    """Exact two-sided sign-flip p on the last axis: the share of the 2^n sign flips whose |mean| is at least
    the observed one (the observed flip included, so p >= 2 / 2^n)."""
    d = np.asarray(differences, dtype=float)
    flipped = np.abs(d @ _signs(d.shape[-1]).T)  # (..., 2^n): |sum| of every flip
    observed = np.abs(d.sum(-1, keepdims=True))
    tolerance = 1e-12 * np.maximum(1.0, np.abs(d).sum(-1, keepdims=True))  # ties despite float rounding
    return (flipped >= observed - tolerance).mean(-1)


def _one_sided_flip(d: np.ndarray) -> np.ndarray:
    """Share of sign flips whose sum is at least the observed sum (H0: symmetric about 0, H1: shifted up)."""
    sums = d @ _signs(d.shape[-1]).T
    observed = d.sum(-1, keepdims=True)
    tolerance = 1e-12 * np.maximum(1.0, np.abs(d).sum(-1, keepdims=True))
    return (sums >= observed - tolerance).mean(-1)


def tost_sign_flip_arrays(differences: np.ndarray, margin: float) -> np.ndarray:
    """TOST by one-sided sign-flip tests of d + m (H0: δ <= -m) and m - d (H0: δ >= m), on the last axis."""
    d = np.asarray(differences, dtype=float)
    return np.maximum(_one_sided_flip(d + margin), _one_sided_flip(margin - d))


def holm_arrays(pvalues: np.ndarray, max_true: int | None = None) -> np.ndarray:
    """Holm-adjusted p on the last axis (no nans): sorted p_(1) <= ... <= p_(m), adjusted p_(i) = max over
    j <= i of min(1, c_j p_(j)) with c_j = m - j + 1 (Holm 1979), or min(max_true, m - j + 1) when at most
    ``max_true`` of the nulls can be true at once (Shaffer 1986: a row's "no difference" and its "not
    equivalent" cannot both hold, so 2k hypotheses over k rows have at most k true)."""
    p = np.asarray(pvalues, dtype=float)
    m = p.shape[-1]
    if m == 0:
        return p.copy()
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, -1)
    factors = np.arange(m, 0, -1, dtype=float)
    if max_true is not None:
        factors = np.minimum(factors, float(max_true))
    adjusted_sorted = np.maximum.accumulate(np.minimum(1.0, factors * ranked), axis=-1)
    adjusted = np.empty_like(adjusted_sorted)
    np.put_along_axis(adjusted, order, adjusted_sorted, -1)
    return adjusted


# --------------------------------------------------------------------------------------------------
# Scalar tests (one row)
# --------------------------------------------------------------------------------------------------


def t_test(name: str, n: int, delta: float, se: float, df: float, alpha: float = ALPHA) -> TTest:
    """The two-sided p-value and (1 - alpha) interval of ``delta`` with standard error ``se``, ``df`` degrees
    of freedom."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.stats import t

    if not (se > 0 and math.isfinite(se) and df > 0):
        return TTest(name, n, df, delta, se, None, None)
    half = float(t.ppf(1 - alpha / 2, df)) * se
    p = float(2 * t.sf(abs(delta / se), df))
    return TTest(name, n, df, delta, se, p, (delta - half, delta + half))


def _differences(row: Sequence[float], reference: Sequence[float]) -> list[float]:
    if len(row) != len(reference):
        raise ValueError(f"a paired test needs one reference value per row value, got {len(row)} and {len(reference)}")
    return [a - b for a, b in zip(row, reference, strict=True)]


def paired_test(row: Sequence[float], reference: Sequence[float], alpha: float = ALPHA) -> TTest | None:
    """Paired t-test (``scipy.stats.ttest_rel``) of ``row[i]`` against ``reference[i]`` (the same seed);
    None for fewer than two pairs."""
    differences = _differences(row, reference)
    if len(differences) < 2:
        return None
    se = math.sqrt(_variance(differences) / len(differences))
    return t_test("paired", len(differences), _mean(differences), se, len(differences) - 1, alpha)


def sign_flip_test(row: Sequence[float], reference: Sequence[float], alpha: float = ALPHA) -> TTest | None:
    """Exact sign-flip test of the paired differences (:func:`sign_flip_arrays`), with the paired t interval
    for the size of the difference; None for fewer than :data:`SIGN_FLIP_MIN_PAIRS` pairs, where it could
    never reach 0.05."""
    differences = _differences(row, reference)
    if len(differences) < SIGN_FLIP_MIN_PAIRS:
        return None
    t_version = paired_test(row, reference, alpha)
    p = float(sign_flip_arrays(np.array(differences)))
    return dataclasses.replace(t_version, name="sign-flip", p=p if t_version.se > 0 else None)


def welch_test(row: Sequence[float], reference: Sequence[float], alpha: float = ALPHA) -> TTest | None:
    """Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``) for independent samples;
    None when either side has fewer than two values."""
    if len(row) < 2 or len(reference) < 2:
        return None
    a, b = _variance(row) / len(row), _variance(reference) / len(reference)
    se = math.sqrt(a + b)
    df = (a + b) ** 2 / (a**2 / (len(row) - 1) + b**2 / (len(reference) - 1)) if se > 0 else 0.0
    return t_test("welch", len(row), _mean(row) - _mean(reference), se, df, alpha)


def tost_paired(differences: Sequence[float], margin: float) -> float | None:
    """TOST p of equivalence within ±``margin`` from paired differences (t-based); None for fewer than two
    differences or a zero standard error."""
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be positive, got {margin!r}")
    if len(differences) < 2:
        return None
    p = float(tost_paired_arrays(np.array(differences, dtype=float), margin))
    return None if math.isnan(p) else p


def tost_sign_flip(differences: Sequence[float], margin: float) -> float | None:
    """TOST p by exact sign flips (:func:`tost_sign_flip_arrays`); None below :data:`SIGN_FLIP_MIN_PAIRS`."""
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be positive, got {margin!r}")
    if len(differences) < SIGN_FLIP_MIN_PAIRS:
        return None
    return float(tost_sign_flip_arrays(np.array(differences, dtype=float), margin))


def holm(pvalues: Sequence[float | None], max_true: int | None = None) -> list[float | None]:
    """Holm's step-down adjusted p-values (None entries are no tests and stay None); see :func:`holm_arrays`.

    Rejecting where the adjusted p <= alpha controls the family-wise error rate at alpha for any dependence
    between the tests (Holm 1979)."""
    present = [i for i, p in enumerate(pvalues) if p is not None]
    adjusted: list[float | None] = [None] * len(pvalues)
    values = holm_arrays(np.array([pvalues[i] for i in present], dtype=float), max_true)
    for i, value in zip(present, values, strict=True):
        adjusted[i] = float(value)
    return adjusted


# --------------------------------------------------------------------------------------------------
# Power and intervals
# --------------------------------------------------------------------------------------------------


def power(delta: float, sd: float, n: int, df: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample t-test (``df`` degrees of freedom; the paired test on ``n`` pairs
    has df = n - 1) at level ``alpha`` to detect a true mean difference ``delta`` when the differences have
    standard deviation ``sd``: P(|T| > t_crit) with T noncentral t(df, delta sqrt(n) / sd)."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.stats import nct, t

    critical = float(t.ppf(1 - alpha / 2, df))
    noncentrality = delta * math.sqrt(n) / sd
    # P(T < -c | nc) written as P(T > c | -nc): scipy's nct.cdf returns nan deep in the tail, sf does not.
    return float(nct.sf(critical, df, noncentrality) + nct.sf(critical, df, -noncentrality))


def detectable_difference(
    sd: float, n: int, df: float, alpha: float = ALPHA, power_wanted: float = POWER
) -> float | None:
    """The smallest true difference the test of :func:`power` detects with probability ``power_wanted``
    (None when ``sd`` is unknown or 0). For a row of a Holm family of m tests pass ``alpha / m``: the level
    Holm applies at its first step, the most lenient any row can face."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.optimize import brentq

    if not (math.isfinite(sd) and sd > 0 and n >= 1 and df > 0):
        return None
    scale = sd / math.sqrt(n)
    upper = 1.0
    while power(upper * scale, sd, n, df, alpha) < power_wanted:  # df = 1 at alpha / 10 needs hundreds of se
        upper *= 2
    return brentq(lambda k: power(k * scale, sd, n, df, alpha) - power_wanted, 0.0, upper, xtol=1e-10) * scale


def t_interval(values: Sequence[float], alpha: float = ALPHA) -> tuple[float, float] | None:
    """The (1 - alpha) t interval of the mean of ``values`` (None for fewer than two)."""
    # scipy (~0.8 s) only for p-values: the report's import stays light
    from scipy.stats import t

    if len(values) < 2:
        return None
    half = float(t.ppf(1 - alpha / 2, len(values) - 1)) * math.sqrt(_variance(values) / len(values))
    return _mean(values) - half, _mean(values) + half
