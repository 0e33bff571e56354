"""The report's statistics against scipy and by hand, on constructed data (no runs needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from skipdiff.report import stats
from skipdiff.report.ranking import (
    adjust_family,
    choose_reference,
    compare,
    parse_margins,
    rank_against,
    verdicts,
)


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


def test_sign_flip_test_is_scipys_exact_permutation_test():
    rng = np.random.default_rng(3)
    for n in (6, 7, 9):
        d = rng.normal(0.4, 1.0, n)
        exact = scipy_stats.permutation_test(
            (d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples", n_resamples=np.inf
        ).pvalue
        assert float(stats.sign_flip_arrays(d)) == pytest.approx(exact, rel=1e-12), n
    assert float(stats.sign_flip_arrays(np.arange(1.0, 7.0))) == pytest.approx(2 / 64)  # its smallest p at n = 6
    assert stats.sign_flip_test([1.0] * 5, [0.0] * 5) is None  # below 6 pairs it could never reach 0.05
    test = stats.sign_flip_test(list(np.arange(1.0, 7.0)), [0.0] * 6)
    assert test.name == "sign-flip" and test.p == pytest.approx(2 / 64) and test.df == 5


def test_tost_is_the_one_minus_two_alpha_interval_inside_the_margin():
    rng = np.random.default_rng(4)
    for _ in range(50):
        d = list(rng.normal(rng.uniform(-0.2, 0.2), rng.uniform(0.01, 0.3), int(rng.integers(2, 7))))
        margin = float(rng.uniform(0.05, 0.5))
        p = stats.tost_paired(d, margin)
        low, high = scipy_stats.t.interval(0.90, len(d) - 1, loc=np.mean(d), scale=scipy_stats.sem(d))
        assert (p <= 0.05) == (-margin < low and high < margin)
        one_sided = max(
            scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue,
            scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue,
        )
        assert p == pytest.approx(one_sided, rel=1e-9)
    assert stats.tost_paired([0.1], 1.0) is None
    with pytest.raises(ValueError, match="margin must be positive"):
        stats.tost_paired([0.1, 0.2], 0.0)
    # the sign-flip TOST: 6 differences well inside ±1 reach the smallest p, 1/64, on both sides
    assert stats.tost_sign_flip([0.1, -0.1, 0.05, 0.0, 0.02, -0.03], 1.0) == pytest.approx(1 / 64)


def test_holm_with_a_bound_on_true_nulls_is_shaffers():
    # 4 hypotheses, at most 2 true at once: the factors are min(2, 4 - j + 1) = 2, 2, 2, 1.
    assert stats.holm([0.01, 0.02, 0.04, 0.03], max_true=2) == pytest.approx([0.02, 0.04, 0.06, 0.06])
    assert stats.holm([0.01, 0.02], max_true=5) == stats.holm([0.01, 0.02])  # a loose bound is plain Holm
    p = np.random.default_rng(5).uniform(0, 1, (100, 8))
    assert np.all(stats.holm_arrays(p, max_true=4) <= stats.holm_arrays(p) + 1e-15)


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


def test_a_one_seed_row_is_exploratory_and_borrows_nothing():
    values = {
        "full": {0: 1.0, 1: 2.0, 2: 3.0},
        "a": {0: 1.5, 1: 2.4, 2: 3.6},
        "a · map (inference)": {0: 9.0, 1: 2.0, 2: 30.0},
        "one": {0: 1.3},
    }
    result = compare(values, "full", True, inference=["a · map (inference)"])
    rows = {r["configuration"]: r for r in result["rows"]}
    assert rows["one"]["exploratory"] and rows["one"]["p"] is None and rows["one"]["test"] is None
    assert rows["one"]["verdict"].startswith("exploratory: 1 shared seed")
    assert rows["one"]["values_by_seed"] == {"0": 1.3} and rows["one"]["delta"] == pytest.approx(0.3)
    # The map row is tested (paired), and Holm counts it with a: two tests, first step at 0.05 / 2.
    assert rows["a · map (inference)"]["test"] == "paired"
    p = [rows[n]["p"] for n in ("a", "a · map (inference)")]
    assert [rows[n]["p_holm"] for n in ("a", "a · map (inference)")] == pytest.approx(stats.holm(p))
    assert result["family"] == {
        "scope": "table",
        "tables": 1,
        "rows_tested": 2,
        "hypotheses": 2,
        "first_step_alpha": 0.025,
    }
    # Detectable differences: each row's own sd of differences, at Holm's first-step level.
    sd = float(np.std([0.5, 0.4, 0.6], ddof=1))
    assert rows["a"]["detectable"] == pytest.approx(stats.detectable_difference(sd, 3, 2, 0.025))
    assert rows["a"]["detectable"] > stats.detectable_difference(sd, 3, 2, 0.05)


def test_margins_give_equivalence_verdicts_and_holm_counts_them():
    ref = {s: 10.0 + s for s in range(4)}
    values = {
        "ref": ref,
        "same": {s: v + 0.01 * (-1) ** s for s, v in ref.items()},
        "worse": {s: v + 1.0 + 0.01 * s for s, v in ref.items()},
        "noisy": {s: v + (0.5 if s % 2 else -0.5) for s, v in ref.items()},
    }
    result = compare(values, "ref", True, margin=0.1)
    verdict = {r["configuration"]: r["verdict"] for r in result["rows"]}
    assert verdict == {
        "ref": "reference",
        "same": "equivalent within ±0.1",
        "worse": "worse",
        "noisy": "undecided at this seed count",
    }
    rows = {r["configuration"]: r for r in result["rows"]}
    raw = [rows[n][k] for k in ("p", "tost_p") for n in ("same", "worse", "noisy")]
    adjusted = [rows[n][k] for k in ("p_holm", "tost_p_holm") for n in ("same", "worse", "noisy")]
    assert adjusted == pytest.approx(stats.holm(raw, max_true=3))
    assert result["family"]["hypotheses"] == 6 and result["family"]["first_step_alpha"] == pytest.approx(0.05 / 3)
    assert rows["same"]["equivalent_within"] < 0.1 < rows["noisy"]["equivalent_within"]
    # Without a margin nothing is called equivalent: the same row is undecided.
    plain = {r["configuration"]: r["verdict"] for r in compare(values, "ref", True)["rows"]}
    assert plain["same"] == "undecided at this seed count" and "equivalent" not in " ".join(plain.values())


def test_a_family_of_tables_is_adjusted_together():
    a = compare({"r": {0: 1.0, 1: 2.0, 2: 3.0}, "x": {0: 1.5, 1: 2.6, 2: 3.4}}, "r", True, family=None)
    b = compare({"r": {0: 5.0, 1: 6.0, 2: 7.0}, "y": {0: 6.1, 1: 7.0, 2: 8.05}}, "r", True, family=None)
    assert a["rows"][0]["verdict"] is None  # unset until the family is adjusted
    adjust_family([a, b], "section")
    rows = [r for res in (a, b) for r in res["rows"] if r["p"] is not None]
    assert [r["p_holm"] for r in rows] == pytest.approx(stats.holm([r["p"] for r in rows]))
    assert a["family"] == b["family"] and a["family"]["scope"] == "section" and a["family"]["tables"] == 2


def test_rank_against_is_compare_for_per_seed_values():
    ranked = rank_against(
        {0: 1.0, 1: 1.2, 2: 0.9}, {"t1": {0: 1.01, 1: 1.22, 2: 0.9}, "t2": {5: 3.0}}, margin=0.1, family="confirmation"
    )
    assert verdicts(ranked)["reference"] == "reference" and ranked["family"]["scope"] == "confirmation"
    assert verdicts(ranked)["t1"] == "equivalent within ±0.1" and verdicts(ranked)["t2"].startswith("exploratory")
    assert ranked["margin"] == 0.1
    with pytest.raises(ValueError, match="reference's name"):
        rank_against({0: 1.0}, {"reference": {0: 1.0}})


def test_parse_margins():
    assert parse_margins(["fid_minus_floor=0.1", "denoise_mse=5e-4", "kid=0.01"]) == {
        "fid": 0.1,
        "denoise": 0.0005,
        "kid": 0.01,
    }
    assert parse_margins(None) == {} and parse_margins({"fid": 0.2}) == {"fid": 0.2}
    for bad, message in (("fid", "expected metric=value"), ("fid=x", "not a number"), ("fid=-1", "positive")):
        with pytest.raises(ValueError, match=message):
            parse_margins([bad])


def test_rows_without_shared_seeds_use_welch_from_five_a_side_and_partial_overlap_pairs_what_it_can():
    values = {
        "full": {0: 1.0, 1: 1.4, 2: 0.8, 3: 1.1, 4: 0.9},
        "late": {5: 2.0, 6: 2.6, 7: 2.2, 8: 2.9, 9: 2.1},
        "few": {5: 2.0, 6: 2.6},
        "part": {1: 1.9, 2: 1.1, 7: 5.0},
    }
    rows = {r["configuration"]: r for r in compare(values, "full", True)["rows"]}
    assert rows["late"]["test"] == "welch"
    late, full = list(values["late"].values()), list(values["full"].values())
    assert rows["late"]["p"] == pytest.approx(scipy_stats.ttest_ind(late, full, equal_var=False).pvalue)
    # 2 against 5 unpaired seeds: Welch's size reaches 10% there (tests/test_report_size.py), so no test.
    assert rows["few"]["exploratory"] and rows["few"]["p"] is None and "Welch's test needs 5" in rows["few"]["verdict"]
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
