"""How stable was training? Figures from a run's ``stats.jsonl``, plus a gradient-shattering probe.

Spike rule (documented, used everywhere in skipdiff): a value is a spike when it exceeds the median
of the preceding ``window`` values by more than ``k`` times their median absolute deviation (MAD,
scaled by 1.4826 to estimate a standard deviation), with at least ``window // 2`` values seen.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLOCK_ORDER_PREFIXES = ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out")


def ordered_blocks(names) -> list[str]:
    """Block names from input to output: conv_in, down_blocks.i, mid_block, up_blocks.i, conv_out."""

    def key(name: str):
        for rank, prefix in enumerate(BLOCK_ORDER_PREFIXES):
            if name.startswith(prefix):
                index = int(name.split(".")[1]) if "." in name else 0
                return (rank, index)
        return (len(BLOCK_ORDER_PREFIXES), 0)

    return sorted((n for n in names if key(n)[0] < len(BLOCK_ORDER_PREFIXES)), key=key)


def count_spikes(values, window: int = 50, k: float = 6.0) -> int:
    """Number of spikes in a series by the module's median + k·MAD rule."""
    series = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    spikes = 0
    for i in range(len(series)):
        past = series[max(0, i - window) : i]
        if len(past) < max(2, window // 2):
            continue
        median = np.median(past)
        mad = 1.4826 * np.median(np.abs(past - median))
        if series[i] > median + k * max(mad, 1e-12):
            spikes += 1
    return spikes


def loss_series(records: list[dict]) -> tuple[list[float], bool]:
    """The training loss of every step (``step_losses`` of each record, in step order; a skipped step is
    left out) and True, or the logged window means and False for logs written before per-step losses.

    Spikes are counted on per-step losses: a window mean of 10 steps dilutes a one-step spike tenfold."""
    by_step: dict[int, dict] = {}
    for record in records:
        if "loss" in record:
            by_step[record["step"]] = record  # a resumed run's rewritten step replaces the old one
    ordered = [by_step[s] for s in sorted(by_step)]
    if ordered and all("step_losses" in r for r in ordered):
        return [v for r in ordered for v in r["step_losses"] if v is not None], True
    return [r["loss"] for r in ordered], False


def stability_from_stats(records: list[dict], window: int = 50, k: float = 6.0) -> dict:
    """Gradient and loss stability figures from the training records of a ``stats.jsonl``."""
    steps = [r for r in records if "grad_norm_by_block" in r and r.get("grad_norm_by_block")]
    if not steps:
        raise ValueError("stats.jsonl has no gradient records (was the run logged with --log_every?)")
    blocks = ordered_blocks({b for r in steps for b in r["grad_norm_by_block"]})
    per_block = {}
    for block in blocks:
        series = np.asarray([r["grad_norm_by_block"].get(block, np.nan) for r in steps], dtype=np.float64)
        series = series[np.isfinite(series)]
        per_block[block] = {
            "mean": float(series.mean()),
            "median": float(np.median(series)),
            "std": float(series.std()),
            "cv": float(series.std() / series.mean()) if series.mean() > 0 else None,
        }
    first, last = blocks[0], blocks[-1]
    ratios = [
        r["grad_norm_by_block"][first] / r["grad_norm_by_block"][last]
        for r in steps
        if r["grad_norm_by_block"].get(last)
    ]
    total = np.asarray([r["grad_norm"] for r in steps if r.get("grad_norm") is not None], dtype=np.float64)
    losses, per_step = loss_series(records)
    nonfinite = max([r.get("nonfinite_total", 0) for r in records] + [0])
    return {
        "blocks": per_block,
        "first_block": first,
        "last_block": last,
        "first_to_last_ratio_median": float(np.median(ratios)) if ratios else None,
        "grad_norm_cv": float(total.std() / total.mean()) if len(total) and total.mean() > 0 else None,
        "loss_spikes": count_spikes(losses, window, k),
        "loss_spikes_counted_on": "per-step losses" if per_step else "logged window means",
        "loss_spikes_window_means": count_spikes([r["loss"] for r in records if "loss" in r], window, k),
        "grad_spikes": count_spikes(total.tolist(), window, k),
        "nonfinite_total": int(nonfinite),
        "num_records": len(steps),
        "spike_rule": f"value > median + {k} * 1.4826 * MAD of the previous {window} values",
    }


def shattering_probe(
    unet,
    sample_shape,
    timestep: int = 500,
    points: int = 64,
    span: float = 2.0,
    seed: int = 0,
    class_label: int | None = None,
) -> dict:
    """Gradient shattering (Balduzzi et al., 2017) along a line through input space.

    Inputs x_i = x0 + s_i·d for s_i evenly spaced in [-span/2, span/2] (x0, d Gaussian, |d| = 1
    per element on average); at each, the gradient g_i = d<u, f(x_i)>/dx_i for a fixed random
    projection u of the output. Reports the mean Pearson correlation of consecutive gradients
    (lag-1 autocorrelation): near 1 for smooth (unshattered) gradients, near 0 for white noise.
    """
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(sample_shape, generator=generator)
    direction = torch.randn(sample_shape, generator=generator)
    device = next(unet.parameters()).device
    with torch.no_grad():
        out_shape = unet(
            x0[None].to(device), torch.tensor([timestep], device=device), class_labels=_label(class_label, device)
        ).sample.shape[1:]
    projection = torch.randn(out_shape, generator=generator).to(device)
    offsets = torch.linspace(-span / 2, span / 2, points)
    inputs = (x0[None] + offsets[:, None, None, None] * direction[None]).to(device).requires_grad_(True)
    was_training = unet.training
    unet.eval()
    labels = None if class_label is None else torch.full((points,), class_label, device=device)
    output = unet(inputs, torch.full((points,), timestep, device=device), class_labels=labels).sample
    (grads,) = torch.autograd.grad((output * projection).sum(), inputs)
    unet.train(was_training)
    flat = grads.flatten(1).double().cpu()
    centred = flat - flat.mean(dim=1, keepdim=True)
    normed = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lag1 = (normed[:-1] * normed[1:]).sum(dim=1)
    return {
        "lag1_autocorrelation": float(lag1.mean()),
        "points": points,
        "span": span,
        "timestep": timestep,
        "seed": seed,
    }


def _label(class_label, device):
    return None if class_label is None else torch.tensor([class_label], device=device)
