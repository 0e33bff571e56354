"""The report's statistics against scipy and by hand, on constructed data (no runs needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from skipdiff.report import stats
from skipdiff.report.ranking import choose_reference, compare


def seeded_values(delta: float, seed_effect: float, noise: float, seeds: int, rng: np.random.Generator):
    """(row, reference): one value per training seed, each seed shifting both by the same amount."""
    shift = rng.normal(0.0, seed_effect, seeds)
    return shift + delta + rng.normal(0.0, noise, seeds), shift + rng.normal(0.0, noise, seeds)


def test_paired_test_is_scipys_ttest_rel_and_sees_through_seed_effects():
    rng = np.random.default_rng(0)
    row, ref = seeded_values(delta=0.5, seed_effect=3.0, noise=0.2, seeds=4, rng=rng)
    ours = stats.paired_test(list(row), list(ref))
    theirs = scipy_stats.ttest_rel(row, ref)
    assert ours.name == "paired" and ours.n == 4 and ours.df == 3
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-10)
    assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-10)
    assert ours.ci == pytest.approx(tuple(theirs.confidence_interval()), rel=1e-10)
    # The seed effect (sd 3) hides a difference of 0.5 from a test that treats the seeds as independent.
    assert ours.p < 0.05 < scipy_stats.ttest_ind(row, ref, equal_var=False).pvalue
    assert stats.paired_test([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="one reference value per row value"):
        stats.paired_test([1.0, 2.0], [1.0])


def test_welch_test_is_scipys_unequal_variance_ttest():
    row, ref = [1.0, 2.0, 3.5, 2.2], [0.5, 1.7, 2.0]
    ours, theirs = stats.welch_test(row, ref), scipy_stats.ttest_ind(row, ref, equal_var=False)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-10)
    assert ours.df == pytest.approx(theirs.df, rel=1e-10)
    assert ours.ci == pytest.approx(tuple(theirs.confidence_interval()), rel=1e-10)
    assert stats.welch_test([1.0], ref) is None


def test_pooled_paired_test():
    # Pooled over exactly the tested differences, it is the paired test itself.
    row, ref = [3.0, 2.5, 4.1], [1.0, 1.2, 2.0]
    differences = [a - b for a, b in zip(row, ref, strict=True)]
    sd, df = stats.pooled_sd([differences])
    pooled = stats.pooled_paired_test(differences, sd, df)
    assert df == 2 and pooled.p == pytest.approx(scipy_stats.ttest_rel(row, ref).pvalue, rel=1e-10)
    # One difference against the pooled sd of two groups (and a group of one, which adds nothing).
    groups = [[0.1, 0.4, -0.2], [1.0, 1.5], [7.0]]
    sd, df = stats.pooled_sd(groups)
    hand = math.sqrt((np.var(groups[0], ddof=1) * 2 + np.var(groups[1], ddof=1) * 1) / 3)
    assert df == 3 and sd == pytest.approx(hand, rel=1e-12)
    one = stats.pooled_paired_test([0.9], sd, df)
    assert one.p == pytest.approx(2 * scipy_stats.t.sf(0.9 / hand, 3), rel=1e-10)
    assert stats.pooled_sd([[1.0], [2.0]]) == (pytest.approx(math.nan, nan_ok=True), 0)
    assert stats.pooled_paired_test([0.9], math.nan, 0) is None


def test_zero_standard_error_is_no_evidence():
    test = stats.paired_test([2.0, 3.0], [1.0, 2.0])  # the same difference on both seeds
    assert test.p is None and test.ci is None and test.delta == 1.0


def test_holm_against_a_hand_computation():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept non-decreasing: 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert stats.holm([0.5, None, 0.4]) == [pytest.approx(0.8), None, pytest.approx(0.8)]
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([]) == [] and stats.holm([None]) == [None]
    rng = np.random.default_rng(1)
    p = list(rng.uniform(0, 0.2, 12))
    adjusted = stats.holm(p)
    assert all(a >= q for a, q in zip(adjusted, p, strict=True))  # never below the raw p
    assert all(a <= min(1.0, 12 * q) + 1e-15 for a, q in zip(adjusted, p, strict=True))  # never above Bonferroni
    order = np.argsort(p)
    assert all(np.diff(np.array(adjusted)[order]) >= 0)  # monotone in the raw p


def test_power_and_detectable_difference_match_simulation():
    assert stats.power(0.0, 1.0, 5, 4) == pytest.approx(0.05, abs=1e-9)  # no difference: the false-positive rate
    rng = np.random.default_rng(2)
    trials = 40000
    for n in (2, 3, 5):  # the paired test on n seeds, df n - 1
        delta = stats.detectable_difference(1.0, n, n - 1)
        assert stats.power(delta, 1.0, n, n - 1) == pytest.approx(0.8, abs=1e-6)
        d = rng.normal(delta, 1.0, (trials, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        rate = np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, n - 1))
        assert rate == pytest.approx(0.8, abs=0.01), n  # binomial sd 0.002
    # One difference against an sd estimated with df 8 elsewhere: T = d / s, s^2 ~ chi2(8) / 8.
    delta = stats.detectable_difference(1.0, 1, 8)
    t = rng.normal(delta, 1.0, trials) / np.sqrt(rng.chisquare(8, trials) / 8)
    assert np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, 8)) == pytest.approx(0.8, abs=0.01)
    # Many seeds: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n).
    normal = (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) / math.sqrt(400)
    assert stats.detectable_difference(1.0, 400, 399) == pytest.approx(normal, rel=0.01)
    assert stats.detectable_difference(2.0, 3, 2) == pytest.approx(2 * stats.detectable_difference(1.0, 3, 2))
    assert stats.detectable_difference(math.nan, 3, 2) is None and stats.detectable_difference(0.0, 3, 2) is None


def test_t_interval_is_scipys():
    values = [0.1, 0.4, 0.35, 0.2]
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert stats.t_interval(values) == pytest.approx((low, high), rel=1e-10)
    assert stats.t_interval([1.0]) is None


def test_inference_rows_never_enter_the_pooled_noise():
    values = {"full": {0: 1.0, 1: 2.0, 2: 3.0}, "a": {0: 1.5, 1: 2.4, 2: 3.6},
              "a · map (inference)": {0: 9.0, 1: 2.0, 2: 30.0}, "one": {0: 1.3}}  # fmt: skip
    result = compare(values, "full", True, inference=["a · map (inference)"])
    assert result["noise"]["from"] == ["a"]
    sd = float(np.std([0.5, 0.4, 0.6], ddof=1))
    assert result["noise"]["sd"] == pytest.approx(sd, rel=1e-12) and result["noise"]["df"] == 2
    rows = {r["configuration"]: r for r in result["rows"]}
    assert rows["one"]["p"] == pytest.approx(2 * scipy_stats.t.sf(0.3 / sd, 2), rel=1e-10)
    # The map row itself is tested (paired), and counted by Holm with the two others.
    assert rows["a · map (inference)"]["test"] == "paired"
    p = [rows[n]["p"] for n in ("a", "a · map (inference)", "one")]
    assert [rows[n]["p_holm"] for n in ("a", "a · map (inference)", "one")] == pytest.approx(stats.holm(p))
    assert result["detectable"]["paired"]["delta"] == pytest.approx(stats.detectable_difference(sd, 3, 2))
    assert result["detectable"]["one_seed"]["delta"] == pytest.approx(stats.detectable_difference(sd, 1, 2))


def test_rows_without_shared_seeds_use_welch_and_partial_overlap_pairs_what_it_can():
    values = {"full": {0: 1.0, 1: 1.4, 2: 0.8}, "late": {5: 2.0, 6: 2.6}, "part": {1: 1.9, 2: 1.1, 7: 5.0}}
    rows = {r["configuration"]: r for r in compare(values, "full", True)["rows"]}
    assert rows["late"]["test"] == "welch"
    assert rows["late"]["p"] == pytest.approx(scipy_stats.ttest_ind([2.0, 2.6], [1.0, 1.4, 0.8], equal_var=False).pvalue)
    assert rows["part"]["test"] == "paired" and rows["part"]["shared_seeds"] == 2  # seeds 1 and 2 only
    assert rows["part"]["p"] == pytest.approx(scipy_stats.ttest_rel([1.9, 1.1], [1.4, 0.8]).pvalue)
    assert rows["part"]["mean"] == pytest.approx(8.0 / 3)  # the table shows all its seeds


def test_choose_reference():
    assert choose_reference(["skips=none", "skips=full"], None, "t") == "skips=full"
    assert choose_reference(["a", "b"], None, "t") == "a"
    assert choose_reference(["a", "b"], "b", "t") == "b"
    with pytest.raises(ValueError, match=r"--reference 'c' is no configuration of table 't'; choices: \['a', 'b'\]"):
        choose_reference(["a", "b"], "c", "t")


def test_a_run_that_logs_no_unet_block_gets_no_gradient_heatmap(tmp_path):
    # a gate-only run logs the norm of its gates alone: the report must not crash on it, nor link a missing figure
    from skipdiff.eval import plots

    gate_only = [{"step": s, "grad_norm_by_block": {"gates": 0.01 * s}} for s in (10, 20, 30)]
    assert plots.grad_norm_heatmap(gate_only, tmp_path / "gates.png") is False
    assert not (tmp_path / "gates.png").exists()
    full = [{"step": s, "grad_norm_by_block": {"conv_in": 0.1, "up_blocks.0": 0.2}} for s in (10, 20)]
    assert plots.grad_norm_heatmap(full, tmp_path / "full.png") is True and (tmp_path / "full.png").is_file()
