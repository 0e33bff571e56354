"""Which skips does a trained model rely on? Ablate each skip alone and measure the damage.

For every skip k and every factor f, skip k's gate is temporarily replaced by ``scale:f``
(``zero`` for f = 0) while all other skips keep their trained gates; the change in held-out
denoising loss per timestep bucket against the unablated model forms a skip x timestep matrix.
The noise, timesteps and images are the same for every cell (see :mod:`skipdiff.eval.denoise`).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..gates import build_gate
from .denoise import denoising_loss_by_bucket


@contextmanager
def gate_override(router, index: int, entry: dict, device="cpu"):
    """Temporarily give skip ``index`` the gate ``entry`` (e.g. ``{"mode": "zero"}``)."""
    original = router.gates[index]
    router.gates[index] = build_gate(entry, router.skips[index]).to(device)
    try:
        yield
    finally:
        router.gates[index] = original


def ablation_entry(factor: float) -> dict:
    return {"mode": "zero"} if factor == 0 else {"mode": "scale", "factor": float(factor)}


def skip_importance(unet, scheduler, encoder, batches, factors=(0.0,), buckets: int = 10, seed: int = 0,
                    conditional: bool = False) -> dict:  # fmt: skip
    """Delta denoising loss (ablated - baseline) per skip, factor and timestep bucket.

    Returns ``{"baseline": [...per bucket], "factors": {f: {"delta": K x buckets list,
    "delta_mean": [K]}}, "skips": describe rows}``.
    """
    router = unet.skip_router
    baseline = denoising_loss_by_bucket(unet, scheduler, encoder, batches, buckets, seed, conditional)
    base = np.array([b["loss"] for b in baseline["buckets"]])
    result = {"baseline": base.tolist(), "baseline_mean": baseline["mean"], "factors": {},
              "buckets": [[b["t_min"], b["t_max"]] for b in baseline["buckets"]], "skips": router.describe()}  # fmt: skip
    for factor in factors:
        delta = np.zeros((len(router.skips), buckets))
        for info in router.skips:
            with gate_override(router, info.index, ablation_entry(factor), next(unet.parameters()).device):
                ablated = denoising_loss_by_bucket(
                    unet, scheduler, encoder, batches, buckets, seed, conditional
                )
            delta[info.index] = np.array([b["loss"] for b in ablated["buckets"]]) - base
        result["factors"][str(factor)] = {"delta": delta.tolist(), "delta_mean": delta.mean(axis=1).tolist()}
    return result


def importance_heatmap(result: dict, factor: str, path) -> None:
    """Save the skip x timestep delta-loss matrix of one factor as a PNG heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delta = np.array(result["factors"][factor]["delta"])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * delta.shape[1], 1 + 0.35 * delta.shape[0]))
    limit = np.abs(delta).max() or 1.0
    image = ax.imshow(delta, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(
        range(delta.shape[1]), [f"{lo}-{hi}" for lo, hi in result["buckets"]], rotation=60, fontsize=7
    )
    ax.set_yticks(
        range(delta.shape[0]),
        [f"skip {s['index']} ({s['resolution']}px)" for s in result["skips"]],
        fontsize=7,
    )
    ax.set_xlabel("timestep bucket")
    ax.set_title(f"denoising loss change, skip scaled by {factor}")
    fig.colorbar(image, ax=ax, label="Δ loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
