"""Every kind of figure skipdiff writes, rendered on tiny data: nothing drawn outside the canvas (the tight
bounding box of everything drawn lies inside the figure), and every axis says what it measures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
from helpers.eval_scripts import eval_script
from matplotlib.figure import Figure  # noqa: E402

from skipdiff.eval import plots  # noqa: E402
from skipdiff.eval.importance import importance_heatmap  # noqa: E402
from skipdiff.report import figures  # noqa: E402
from skipdiff.report.read import Result  # noqa: E402
from skipdiff.search import report as search_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def outside_canvas(fig: Figure) -> list[str]:
    """What of ``fig``'s tight bounding box lies outside its canvas (more than a pixel), after drawing."""
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    width, height = fig.get_size_inches()
    tolerance = 1.0 / fig.dpi
    sides = {"left": -box.x0, "bottom": -box.y0, "right": box.x1 - width, "top": box.y1 - height}
    return [f"{side} by {over:.2f} in" for side, over in sides.items() if over > tolerance]


def unlabelled_axes(fig: Figure) -> list[str]:
    """Axes without an x or y label (a colour bar needs its own label on its long side; panels in a row of
    subplots may share the first panel's y label)."""
    missing = []
    labelled_rows = {
        ax.get_subplotspec().rowspan.start for ax in fig.axes if ax.get_subplotspec() is not None and ax.get_ylabel()
    }
    for ax in fig.axes:
        colorbar = getattr(ax, "_colorbar", None)
        if colorbar is not None:
            label = ax.get_ylabel() if colorbar.orientation == "vertical" else ax.get_xlabel()
            missing += [] if label else ["colour bar"]
            continue
        missing += [f"x of {ax.get_title()!r}"] if not ax.get_xlabel() else []
        shared = ax.get_subplotspec() is not None and ax.get_subplotspec().rowspan.start in labelled_rows
        missing += [f"y of {ax.get_title()!r}"] if not ax.get_ylabel() and not shared else []
    return missing


@pytest.fixture
def saved(monkeypatch):
    """Every figure saved while the test runs: its clipping and labelling problems, by file name (the figure is
    drawn for the check, not written: the PNG encoding is not what is tested)."""
    found: dict[str, list[str]] = {}

    def checking_savefig(fig, path, *args, **kwargs):
        name = Path(path).name  # figures are written atomically, through a temporary '.<name>.tmp<pid>'
        name = name[1 : name.rindex(".tmp")] if name.startswith(".") and ".tmp" in name else name
        found[name] = outside_canvas(fig) + [f"unlabelled {a}" for a in unlabelled_axes(fig)]
        Path(path).write_bytes(b"")  # (for the rename that follows)

    monkeypatch.setattr(Figure, "savefig", checking_savefig)
    return found


def _records(steps=5):
    blocks = ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "conv_out"]
    return [
        {
            "step": 10 * (i + 1),
            "loss": 1.0 / (i + 1),
            "grad_norm_by_block": {b: 0.1 * (i + 1) * (k + 1) for k, b in enumerate(blocks)},
            "markov": {"skips": list(range(9)), "marginals": [0.5] * 9},
            "grad_norm": {"stem": 0.3, "block 0": 0.2 + i, "head": 0.1},
        }
        for i in range(steps)
    ]


def _importance(skips=12, buckets=10):
    edges = [(100 * b, 100 * b + 99) for b in range(buckets)]
    delta = [[0.001 * (k - b) for b in range(buckets)] for k in range(skips)]
    return {
        "buckets": edges,
        "skips": [{"index": k, "resolution": 64 // 2 ** (k // 3)} for k in range(skips)],
        "factors": {"0.0": {"delta": delta}, "0.5": {"delta": delta}},
    }


def test_every_figure_fits_its_canvas_and_names_its_axes(saved, tmp_path):
    records = _records()
    denoise = {"buckets": [{"t_min": 100 * b, "t_max": 100 * b + 99, "loss": 0.1 + 0.01 * b} for b in range(10)]}
    plots.loss_by_timestep({"runs/a-long-run-name": denoise, "runs/b": denoise}, tmp_path / "loss_by_timestep.png")
    plots.grad_norms_over_training(records, tmp_path / "grad_norms.png", "digits-latent")
    assert plots.grad_norm_heatmap(records, tmp_path / "grad_norm_heatmap.png", "digits-latent")
    importance_heatmap(_importance(), "0.0", tmp_path / "skip_importance_0.0.png")
    importance_heatmap(_importance(skips=3, buckets=2), "0.5", tmp_path / "skip_importance_small.png")
    configurations = {
        f"skips=config-{k}": [
            Result(
                cell=f"c{k}", configuration=f"skips=config-{k}", dataset="digits", seed=0, metrics={}, records=records
            )
        ]
        for k in range(12)
    }
    assert figures.loss_curves(configurations, tmp_path / "loss_digits.png", "digits, 16px: training loss")
    assert figures.classifier_heatmap(records, tmp_path / "grad_classifier.png", "skip-resnet (seed 0)")
    assert figures.markov_plot(records, tmp_path / "markov.png", "skips=markov (seed 0): P(open)")
    inference = {
        name: [
            Result(
                cell=name,
                configuration=name,
                dataset="ddpm",
                seed=seed,
                records=[],
                metrics={
                    "fid": 10.0 + k + seed,
                    "seconds_per_image": 1.0 / (1 + k),
                    "cache_bound": 1.5 + k if k else None,
                },
                floors={seed: 2.0},
            )
            for seed in (0, 1)
        ]
        for k, name in enumerate(["cache=off", "cache=b8-N2", "cache=b8-N3"])
    }
    metric = figures.inference_metric(inference)
    assert figures.metric_plot(
        inference, metric, "cache=off", tmp_path / "metric_ddpm.png", "ddpm: FID by configuration"
    )
    assert figures.speed_plot(inference, metric, "cache=off", tmp_path / "speed_ddpm.png", "ddpm: FID against speed")
    rows = [
        {
            "number": i,
            "state": "pruned" if i % 3 == 2 else "complete",
            "values": [1.0 / (i + 1), 1e6 * i],
            "intermediate": {"100": 0.5},
        }
        for i in range(8)
    ]
    search_report._history(rows, "denoise_mse", True, tmp_path / "history.png")
    search_report._pareto(rows, {0, 3}, ["denoise_mse", "flops"], tmp_path / "pareto.png")
    degradation = _degradation_module()
    results = json.loads((ROOT / "eval" / "results" / "degradation" / "results.json").read_text())
    degradation.summary_to_plot(results["summary"], results["runs"], 3e-3, tmp_path / "degradation.png")
    assert len(saved) == 13, sorted(saved)
    assert {name: problems for name, problems in saved.items() if problems} == {}


def test_the_check_sees_a_clipped_title_and_a_missing_label(tmp_path):
    """The check above can fail: a long title in a figure without layout runs off both sides."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_title("a title far too long for a two-inch figure without any layout engine")
    assert {p.split()[0] for p in outside_canvas(fig)} >= {"left", "right"}
    title = "'a title far too long for a two-inch figure without any layout engine'"
    assert unlabelled_axes(fig) == [f"x of {title}", f"y of {title}"]
    plt.close(fig)


def test_the_atlas_figures_fit_their_canvas(saved, tmp_path):
    from skipdiff.search import atlas_figures

    fields = [
        {
            "field": name,
            "importance": {"skip.family": 0.6, "model.block_out_channels": 0.3, "learning_rate": 0.1},
            "front": [{"flops": 1e6 * (k + 1), "value": 0.3 - 0.01 * k, "trial": k} for k in range(3)],
        }
        for name in ("digits", "photo_patches", "hubble")
    ]
    atlas_figures.importance_figure(fields, tmp_path / "importance.png")
    atlas_figures.front_figure(fields, tmp_path / "front.png")
    rows = [
        {"configuration": "full", "is_reference": True, "mean": 0.3, "delta": 0.0},
        {"configuration": "hubble best", "is_reference": False, "mean": 0.31, "delta": 0.01},
    ]
    atlas_figures.transfer_figure({"digits": {"rows": rows}, "moon": {"rows": rows}}, tmp_path / "transfer.png")
    confirmed = {
        "configuration": "trial-0007",
        "is_reference": False,
        "delta": 0.002,
        "ci": [-0.001, 0.005],
        "verdict": "undecided at this seed count",
    }
    record = {
        "field": "photo_patches",
        "trials": [
            {
                "folder": "runs/x/trials/trial-0007",
                "params": {
                    "skips": "linear",
                    "linear.inner": 0.57,
                    "linear.outer": 1.03,
                    "model.block_out_channels": "[32, 32, 64]",
                },
            }
        ],
        "confirmation": {"denoise": {"rows": [confirmed]}, "fid": {"rows": [{**confirmed, "verdict": "worse"}]}},
    }
    atlas_figures.confirmation_figure(
        {"fields": [record, {**record, "field": "digits"}], "margins": {"denoise": 0.003, "fid": 0.3}},
        tmp_path / "confirmation.png",
    )
    assert len(saved) == 4, sorted(saved)
    assert {name: problems for name, problems in saved.items() if problems} == {}


def test_an_atlas_configuration_has_a_short_name():
    from skipdiff.search.atlas_figures import short_name

    assert (
        short_name({"skips": "learned", "model.block_out_channels": "[32, 64, 64]", "model.layers_per_block": 2})
        == "learned"
    )
    assert (
        short_name(
            {
                "skips": "linear",
                "linear.inner": 0.002,
                "linear.outer": 0.518,
                "model.block_out_channels": "[32, 32, 64]",
            }
        )
        == "linear inner 0.00 outer 0.52 · [32, 32, 64]"
    )
    assert (
        short_name(
            {"skips": "per_skip", "skip.0": "zero", "skip.1": "keep", "skip.10": "zero", "model.layers_per_block": 1}
        )
        == "per-skip 2 of 3 zeroed · 1 layer(s)/block"
    )
    assert short_name({"skips": "markov", "markov.p_init": 0.94, "markov.cost": 0.2, "markov.min_count": 16}) == (
        "markov cost 0.20 p_init 0.94"
    )


def _degradation_module():
    return eval_script("degradation", "degradation_script")
