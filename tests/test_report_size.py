"""Every test the report runs keeps its nominal size, in the seed layouts of the committed sweeps with their
unequal variances (issue 26): a true null is rejected at most 6% of the time at nominal 5%.

The simulations run the report's own vectorised arithmetic (``skipdiff.report.stats.*_arrays``), and
:func:`test_compare_runs_the_simulated_arithmetic` checks that ``ranking.compare`` gives the same p's on
simulated draws, so what is checked here is what the report computes. Null data: each configuration's value
on a seed is a shared seed effect plus its own noise, with the sds that reproduce each row's observed sd
of paired differences (0.009 to 0.65 FID in cpu_digits, 0.12 to 75 in photo_patches_core).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from skipdiff.report import stats
from skipdiff.report.ranking import compare

RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results"
SIMULATIONS = 6000  # the binomial sd of a rate near 0.05 is 0.0028: 0.06 is 3.6 sd above the nominal size
LIMIT = 0.06
LAYOUTS = [
    ("cpu_digits", "fid"),
    ("cpu_digits", "denoise"),
    ("photo_patches_core", "fid"),
    ("photo_patches_core", "denoise"),
]


def layout(sweep: str, metric: str, reference: str = "skips=full") -> dict:
    """The committed table's layout: the reference's seeds and, per other row, its shared seeds and its
    observed sd of paired differences (None for rows sharing one seed)."""
    summary = json.loads((RESULTS / sweep / "summary.json").read_text())
    (table,) = [entry["configurations"] for entry in summary["datasets"].values()]
    by_seed = {name: dict(zip(row["seeds"], row["values"][metric], strict=True)) for name, row in table.items()}
    ref = by_seed[reference]
    rows = {}
    for name, values in by_seed.items():
        shared = sorted(set(values) & set(ref))
        if name != reference:
            sd = float(np.std([values[s] - ref[s] for s in shared], ddof=1)) if len(shared) >= 2 else None
            rows[name] = {"seeds": shared, "sd_diff": sd}
    return {"reference_seeds": sorted(ref), "rows": rows}


def noise_sds(found: dict, one_seed_sd: float | None = None) -> tuple[float, dict[str, float]]:
    """The reference's and every row's own noise sd: var(row - ref) = σ_row² + σ_ref² reproduces each row's
    observed sd of differences (σ_ref from the least noisy row; one-seed rows, whose sd nobody measured, get
    ``one_seed_sd``, by default the median)."""
    observed = [r["sd_diff"] for r in found["rows"].values() if r["sd_diff"]]
    sigma_ref = min(observed) / math.sqrt(2)
    unmeasured = one_seed_sd or float(np.median(observed))
    own = {
        name: math.sqrt(max((r["sd_diff"] or unmeasured) ** 2 - sigma_ref**2, sigma_ref**2))
        for name, r in found["rows"].items()
    }
    return sigma_ref, own


def simulate(
    found: dict,
    rng: np.random.Generator,
    sims: int,
    shifts: dict[str, float] | None = None,
    seeds: int | None = None,
    noise=None,
    one_seed_sd: float | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(reference (sims, n), {row: (sims, n)}) on the reference's seeds (or ``seeds`` of them), rows at their
    ``shifts`` from the reference (0: the null)."""
    sigma_ref, own = noise_sds(found, one_seed_sd)
    n = seeds or len(found["reference_seeds"])
    draw = noise or (lambda size: rng.normal(0.0, 1.0, size))
    seed_effect = rng.normal(0.0, 5.0, (sims, n))  # cancels in paired differences, as a training seed's does
    ref = seed_effect + sigma_ref * draw((sims, n))
    rows = {name: seed_effect + (shifts or {}).get(name, 0.0) + sd * draw((sims, n)) for name, sd in own.items()}
    return ref, rows


def rows_with_a_test(found: dict) -> list[str]:
    return [name for name, r in found["rows"].items() if len(r["seeds"]) >= 2]


@pytest.mark.parametrize("sweep,metric", LAYOUTS)
def test_paired_tests_and_their_holm_family_keep_their_size(sweep, metric):
    found = layout(sweep, metric)
    rng = np.random.default_rng(0)
    ref, rows = simulate(found, rng, SIMULATIONS)
    names = rows_with_a_test(found)
    assert names, (sweep, metric)
    p = np.stack([stats.paired_arrays(rows[name] - ref)["p"] for name in names], -1)  # (sims, rows)
    rates = (p <= 0.05).mean(0)
    assert rates.max() <= LIMIT, dict(zip(names, rates, strict=True))
    family_wise = (stats.holm_arrays(p) <= 0.05).any(-1).mean()  # P(any true null rejected after Holm)
    assert family_wise <= LIMIT


@pytest.mark.parametrize("sweep,metric", LAYOUTS)
def test_equivalence_and_difference_tests_together_keep_the_family_wise_size(sweep, metric):
    # Half the rows at no difference (their difference null true), half on the margin (their equivalence
    # null true): no verdict may be wrong more than 6% of the time, after Holm with Shaffer's bound.
    found = layout(sweep, metric)
    names = rows_with_a_test(found)
    margin = float(np.median([found["rows"][n]["sd_diff"] for n in names]))
    on_margin = {name: margin * (-1) ** i for i, name in enumerate(names) if i % 2}
    rng = np.random.default_rng(1)
    ref, rows = simulate(found, rng, SIMULATIONS, shifts=on_margin)
    diffs = [rows[name] - ref for name in names]
    p = np.stack(
        [stats.paired_arrays(d)["p"] for d in diffs] + [stats.tost_paired_arrays(d, margin) for d in diffs], -1
    )
    adjusted = stats.holm_arrays(p, max_true=len(names))
    k = len(names)
    wrong = np.zeros(SIMULATIONS, dtype=bool)
    for i, name in enumerate(names):
        true_null = (
            i if name not in on_margin else k + i
        )  # at 0: "no difference" holds; on the margin: "not equivalent"
        wrong |= adjusted[:, true_null] <= 0.05
        assert (p[:, true_null] <= 0.05).mean() <= LIMIT, name  # each test alone too
    assert wrong.mean() <= LIMIT


def test_sign_flip_tests_keep_their_size_at_six_seeds_with_heavy_tails():
    # The design the issue asks for: 6 training seeds, cpu_digits' unequal variances, Laplace noise.
    found = layout("cpu_digits", "fid")
    rng = np.random.default_rng(2)
    ref, rows = simulate(found, rng, 3000, seeds=6, noise=lambda size: rng.laplace(0.0, 1 / math.sqrt(2), size))
    names = rows_with_a_test(found)
    p = np.stack([stats.sign_flip_arrays(rows[name] - ref) for name in names], -1)
    assert (p <= 0.05).mean(0).max() <= LIMIT
    assert (stats.holm_arrays(p) <= 0.05).any(-1).mean() <= LIMIT
    margin = 0.3
    on_margin = [stats.tost_sign_flip_arrays(rows[name] - ref + margin, margin) for name in names[:4]]
    assert max((q <= 0.05).mean() for q in on_margin) <= LIMIT


@pytest.mark.parametrize("n_row,n_ref", [(5, 5), (5, 8), (8, 5)])
def test_welch_keeps_its_size_from_five_seeds_a_side_under_unequal_variances(n_row, n_ref):
    rng = np.random.default_rng(3)
    for ratio in (1 / 70, 1 / 8, 1.0, 8.0, 70.0):  # the committed rows' sds of differences span 70x
        p = stats.welch_arrays(rng.normal(0, ratio, (SIMULATIONS, n_row)), rng.normal(0, 1, (SIMULATIONS, n_ref)))["p"]
        assert (p <= 0.05).mean() <= LIMIT, ratio
    # ... and why the ranking does not run it below 5: at 2 against 4 seeds its size doubles.
    p = stats.welch_arrays(rng.normal(0, 4, (SIMULATIONS, 2)), rng.normal(0, 1, (SIMULATIONS, 4)))["p"]
    assert (p <= 0.05).mean() > 0.08


def pooled_one_seed_rates(found: dict, one_seed_sd: float, rng: np.random.Generator) -> list[float]:
    """The size of the removed test: a one-seed row's difference against the sd of paired differences
    pooled over the two-seed rows (df 1 each), at the one-seed rows' true sd ``one_seed_sd``."""
    ref, rows = simulate(found, rng, SIMULATIONS, one_seed_sd=one_seed_sd)
    pooled = rows_with_a_test(found)
    pooled_var = np.mean([(rows[n] - ref).var(-1, ddof=1) for n in pooled], 0)
    rates = []
    for name, r in found["rows"].items():
        if len(r["seeds"]) == 1:
            t = (rows[name] - ref)[:, 0] / np.sqrt(pooled_var)
            rates.append(float(np.mean(2 * scipy_stats.t.sf(np.abs(t), len(pooled)) <= 0.05)))
    return rates


def test_the_removed_pooled_one_seed_test_did_not_keep_its_size():
    # What issue 26 found, kept as a check that this simulation sees a miscalibrated test. The one-seed rows'
    # own sd of differences is unmeasured: anywhere in the range the two-seed rows show (0.009 to 0.65 FID),
    # the pooled test's size runs from far below to far above its nominal 5%.
    found = layout("cpu_digits", "fid")
    observed = [r["sd_diff"] for r in found["rows"].values() if r["sd_diff"]]
    rng = np.random.default_rng(4)
    assert max(pooled_one_seed_rates(found, max(observed), rng)) > 0.08
    assert max(pooled_one_seed_rates(found, 2 * min(observed), rng)) < 0.01


def blocked_rates(ref: np.ndarray, rows: dict[str, np.ndarray]) -> dict[str, float]:
    """The size of a seed-blocked model (configuration + seed, one residual variance, df (k-1)(n-1)) testing
    each row against the reference: its rejection rate at 0.05 per row."""
    names = list(rows)
    y = np.stack([ref, *(rows[n] for n in names)], 1)  # (sims, configurations, seeds)
    _, k, n = y.shape
    residual = y - y.mean(2, keepdims=True) - y.mean(1, keepdims=True) + y.mean((1, 2), keepdims=True)
    df = (k - 1) * (n - 1)
    se = np.sqrt(2 * (residual**2).sum((1, 2)) / df / n)
    return {
        name: float(np.mean(2 * scipy_stats.t.sf(np.abs((rows[name] - ref).mean(-1) / se), df) <= 0.05))
        for name in names
    }


def test_a_seed_blocked_model_would_not_keep_its_size_in_the_skip_cache_layout():
    # Issue 26 suggested one for skip_cache (one model, 12 cache settings, shared sampling seeds: 6 since
    # 2026-12-08): it would pool one residual variance over rows whose sds of paired differences run from
    # 0.03 to 0.14 FID (they grow with the cost), so the noisiest rows borrow precision they do not have. The
    # ranking keeps each row's own paired test; more sampling seeds, not a pooled model, resolved the costs.
    found = layout("skip_cache", "fid", reference="cache=off")
    rng = np.random.default_rng(6)
    ref, rows = simulate(found, rng, SIMULATIONS)
    rates = blocked_rates(ref, rows)
    assert max(rates.values()) > 0.08, rates  # unequal variances: the noisiest rows reject a true null too often
    p = np.stack([stats.paired_arrays(rows[name] - ref)["p"] for name in rows_with_a_test(found)], -1)
    assert (p <= 0.05).mean(0).max() <= LIMIT  # the per-row paired tests the ranking runs keep theirs
    one_sd = {n: {**r, "sd_diff": 0.05} for n, r in found["rows"].items()}
    ref, rows = simulate({**found, "rows": one_sd}, rng, SIMULATIONS)
    assert max(blocked_rates(ref, rows).values()) <= LIMIT  # with one variance it is exact: the failure is the pooling


def test_compare_runs_the_simulated_arithmetic():
    found = layout("photo_patches_core", "fid")
    rng = np.random.default_rng(5)
    ref, rows = simulate(found, rng, 5)
    names = rows_with_a_test(found)
    seeds = found["reference_seeds"]
    for i in range(5):
        values = {
            "skips=full": dict(zip(seeds, ref[i], strict=True)),
            **{n: dict(zip(seeds, rows[n][i], strict=True)) for n in names},
        }
        result = compare(values, "skips=full", True, margin=1.0)
        got = {r["configuration"]: r for r in result["rows"]}
        p = np.array([stats.paired_arrays(rows[n][i] - ref[i])["p"] for n in names])
        tost = np.array([stats.tost_paired_arrays(rows[n][i] - ref[i], 1.0) for n in names])
        assert [got[n]["p"] for n in names] == pytest.approx(list(p), rel=1e-9)
        assert [got[n]["tost_p"] for n in names] == pytest.approx(list(tost), rel=1e-9)
        adjusted = stats.holm_arrays(np.concatenate([p, tost]), max_true=len(names))
        assert [got[n]["p_holm"] for n in names] == pytest.approx(list(adjusted[: len(names)]), rel=1e-9)
    # One-seed rows of the committed layout get no p at all.
    one_seed = [n for n, r in found["rows"].items() if len(r["seeds"]) == 1]
    values = {"skips=full": {0: 1.0, 1: 2.0, 2: 3.0}, **{n: {0: 1.0} for n in one_seed}}
    assert all(r["p"] is None for r in compare(values, "skips=full", True)["rows"])
