"""eval/degradation.py's library functions: the grid, the summary and the learning-rate choice (no training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "degradation", Path(__file__).resolve().parents[1] / "eval" / "degradation.py"
)
degradation = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(degradation)


def test_grid_sweeps_the_learning_rate_at_the_deepest_depth_only():
    cells = degradation.grid_cells(
        [1, 8], seeds=[0, 1, 2], lr=3e-3, sweep_lrs=[1e-3, 3e-3, 1e-2], sweep_seeds=[0], epochs=40
    )
    ids = [degradation.cell_id(c) for c in cells]
    assert len(ids) == len(set(ids)) == 2 * 4 * 3 + 2 * 4 * 1  # the main rate is not run twice
    assert {c["depth"] for c in cells if c["learning_rate"] != 3e-3} == {8}
    assert all(c["num_epochs"] == 40 for c in cells)


def _run(depth, skip, bn, lr, seed, train_loss, train_acc, test_acc, epochs=40):
    return dict(
        depth=depth,
        skip_connections=skip,
        batch_norm=bn,
        learning_rate=lr,
        seed=seed,
        num_epochs=epochs,
        epochs=epochs,
        num_blocks=3 * depth,
        num_parameters=100,
        cpu_seconds=1.0,
        train_loss=train_loss,
        train_accuracy=train_acc,
        test_loss=0.0,
        test_accuracy=test_acc,
        grad_ratio_init=0.5,
        grad_ratio_final=2.0,
        activation_growth_start=4.0,
        activation_growth_end=1.0,
    )


def test_summary_means_the_gap_and_the_best_rate_per_variant():
    runs = [
        _run(8, True, True, 3e-3, 0, 0.1, 1.0, 0.9),
        _run(8, True, True, 3e-3, 1, 0.3, 0.98, 0.94),
        _run(8, True, True, 1e-2, 0, 0.01, 1.0, 0.97),
        _run(8, False, False, 3e-3, 0, 2.3, 0.1, 0.1),
        _run(8, False, False, 1e-2, 0, 2.4, 0.1, 0.1),
    ]
    summary = degradation.runs_to_summary(runs)
    row = next(r for r in summary if r["skip_connections"] and r["learning_rate"] == 3e-3)
    assert row["seeds"] == 2 and row["train_loss_mean"] == pytest.approx(0.2)
    assert row["gap_mean"] == pytest.approx(((1.0 - 0.9) + (0.98 - 0.94)) / 2)
    best = degradation.best_learning_rates(summary, 8)
    assert [(r["variant"], r["learning_rate"]) for r in best] == [("skip +BN", 1e-2), ("plain no BN", 3e-3)]
    check = degradation.budget_check_cells(summary, 8, seed=0, epochs=80)
    assert [(c["learning_rate"], c["num_epochs"]) for c in check] == [(1e-2, 80), (3e-3, 80)]
    table = degradation.summary_to_markdown(summary, "cmd", "protocol", 60.0, 3e-3, 40)
    assert "## Learning-rate sweep at 24 blocks" in table and "| 24 | skip +BN | 0.01 | 1 |" in table
