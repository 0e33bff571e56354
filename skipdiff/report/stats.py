"""The statistics behind a sweep's rankings: t-tests of a configuration against a reference over training
seeds, Holm's correction, t intervals, and the smallest difference a test can detect.

Each configuration contributes one value per training seed. A training seed fixes the initial weights,
the data order and the noise, so two configurations run on the same seed are paired: their difference
on that seed is free of the seed's own effect, and a paired test on the differences is the right one
(:func:`paired_test`, the same as ``scipy.stats.ttest_rel``). Without shared seeds the samples are
independent (:func:`welch_test`, ``scipy.stats.ttest_ind(equal_var=False)``). A configuration that
shares one seed with the reference has a single difference; it can only be tested against the seed
noise of differences pooled over configurations that share two or more seeds with the reference
(:func:`pooled_sd`, :func:`pooled_paired_test`), which assumes that noise is the same for all.

Every function is pure (numbers in, numbers out) and checked against scipy in tests/test_report_stats.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

ALPHA = 0.05
POWER = 0.8


@dataclasses.dataclass(frozen=True)
class TTest:
    """A two-sided t-test of ``delta`` = mean(row) - mean(reference) against 0."""

    name: str  # "paired", "pooled paired" or "welch"
    n: int  # pairs (paired tests) or the row's values (welch)
    df: float
    delta: float
    se: float  # standard error of delta
    p: float | None  # None when the standard error is 0 (identical differences: nothing to test)
    ci: tuple[float, float] | None  # the (1 - alpha) interval of delta, unadjusted

    @property
    def statistic(self) -> float | None:
        return self.delta / self.se if self.se > 0 else None


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _variance(values: Sequence[float]) -> float:
    """Sample variance (ddof 1)."""
    mean = _mean(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


def t_test(name: str, n: int, delta: float, se: float, df: float, alpha: float = ALPHA) -> TTest:
    """The two-sided p-value and (1 - alpha) interval of ``delta`` with standard error ``se``, ``df`` degrees
    of freedom."""
    from scipy.stats import t

    if not (se > 0 and math.isfinite(se) and df > 0):
        return TTest(name, n, df, delta, se, None, None)
    half = float(t.ppf(1 - alpha / 2, df)) * se
    p = float(2 * t.sf(abs(delta / se), df))
    return TTest(name, n, df, delta, se, p, (delta - half, delta + half))


def paired_test(row: Sequence[float], reference: Sequence[float], alpha: float = ALPHA) -> TTest | None:
    """Paired t-test (``scipy.stats.ttest_rel``) of ``row[i]`` against ``reference[i]`` (the same seed);
    None for fewer than two pairs."""
    if len(row) != len(reference):
        raise ValueError(f"a paired test needs one reference value per row value, got {len(row)} and {len(reference)}")
    if len(row) < 2:
        return None
    differences = [a - b for a, b in zip(row, reference, strict=True)]
    se = math.sqrt(_variance(differences) / len(differences))
    return t_test("paired", len(differences), _mean(differences), se, len(differences) - 1, alpha)


def welch_test(row: Sequence[float], reference: Sequence[float], alpha: float = ALPHA) -> TTest | None:
    """Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``) for independent samples;
    None when either side has fewer than two values."""
    if len(row) < 2 or len(reference) < 2:
        return None
    a, b = _variance(row) / len(row), _variance(reference) / len(reference)
    se = math.sqrt(a + b)
    df = (a + b) ** 2 / (a**2 / (len(row) - 1) + b**2 / (len(reference) - 1)) if se > 0 else 0.0
    return t_test("welch", len(row), _mean(row) - _mean(reference), se, df, alpha)


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """The standard deviation pooled over the groups with two or more values (sum of squares over the
    sum of n_i - 1) and its degrees of freedom; (nan, 0) when no group has two values."""
    squares, df = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            squares += _variance(values) * (len(values) - 1)
            df += len(values) - 1
    return (math.sqrt(squares / df), df) if df else (math.nan, 0)


def pooled_paired_test(differences: Sequence[float], sd: float, df: int, alpha: float = ALPHA) -> TTest | None:
    """t-test of the mean of ``differences`` (row - reference on shared seeds) with the seed noise of
    differences ``sd`` pooled over other configurations (``df`` degrees of freedom); None without one."""
    if not differences or df < 1 or not math.isfinite(sd):
        return None
    return t_test("pooled paired", len(differences), _mean(differences), sd / math.sqrt(len(differences)), df, alpha)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None entries are no tests and stay None).

    With the m p-values sorted, p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)). Rejecting where the adjusted p <= alpha controls the family-wise error
    rate at alpha for any dependence between the tests (Holm 1979)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def power(delta: float, sd: float, n: int, df: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample t-test (``df`` degrees of freedom; the paired test on ``n`` pairs
    has df = n - 1, a pooled one more) to detect a true mean difference ``delta`` when the differences
    have standard deviation ``sd``: P(|T| > t_crit) with T noncentral t(df, delta sqrt(n) / sd)."""
    from scipy.stats import nct, t

    critical = float(t.ppf(1 - alpha / 2, df))
    noncentrality = delta * math.sqrt(n) / sd
    # P(T < -c | nc) written as P(T > c | -nc): scipy's nct.cdf returns nan deep in the tail, sf does not.
    return float(nct.sf(critical, df, noncentrality) + nct.sf(critical, df, -noncentrality))


def detectable_difference(sd: float, n: int, df: float, alpha: float = ALPHA, power_wanted: float = POWER) -> float | None:
    """The smallest true difference the test of :func:`power` detects with probability ``power_wanted``
    (None when ``sd`` is unknown or 0)."""
    from scipy.optimize import brentq

    if not (math.isfinite(sd) and sd > 0 and n >= 1 and df > 0):
        return None
    scale = sd / math.sqrt(n)
    upper = 1.0
    while power(upper * scale, sd, n, df, alpha) < power_wanted:  # df = 1 needs about 16 standard errors
        upper *= 2
    return brentq(lambda k: power(k * scale, sd, n, df, alpha) - power_wanted, 0.0, upper, xtol=1e-10) * scale


def t_interval(values: Sequence[float], alpha: float = ALPHA) -> tuple[float, float] | None:
    """The (1 - alpha) t interval of the mean of ``values`` (None for fewer than two)."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    half = float(t.ppf(1 - alpha / 2, len(values) - 1)) * math.sqrt(_variance(values) / len(values))
    return _mean(values) - half, _mean(values) + half
