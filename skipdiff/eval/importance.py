"""Which skips does a model rely on? Ablate each skip alone and measure the damage.

For every skip k and every factor f, skip k's gate is temporarily replaced by ``scale:f`` (``zero`` for
f = 0) while all other skips keep their gates; the change in held-out denoising loss per timestep bucket
against the unablated model forms a skip x timestep matrix.

**One noised batch, every ablation.** Images are encoded and their captions embedded once; per timestep
bucket one noised batch is drawn (:mod:`.denoise`) and the baseline and all K x F ablations are evaluated
on it.

**Replay instead of recomputation.** Ablating skip k changes nothing the UNet computes before the decoder
resnet that receives skip k: ``conv_in``, the whole encoder, the mid block, the up blocks before it and,
inside its up block, the resnets and attentions before it give the same outputs as in the baseline
forward. The baseline forward records those outputs (forward hooks); each ablated forward replays them
(the modules' ``forward`` replaced, for that pass only, by the recorded output) and computes only the rest
of the decoder. The ablated forward is the UNet's own ``forward`` on the same inputs with the same batch
size, so the result equals a full recomputation bit for bit on deterministic kernels (tested). The saving
is what the encoder, the mid block and the untouched part of the decoder cost: :func:`replay_flops`
counts it.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..skips.spec import build_gate
from .denoise import (
    UnetKwargs,
    bucket_edges,
    bucket_summary,
    noised_buckets,
    per_example_mse,
    predict,
    prepared_batches,
)

# Up blocks whose forward alternates resnets[i] (receiving skip i of the block) and attentions[i]: inside
# them the layers before the ablated skip are replayed too. Other block types are recomputed whole.
LAYERED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D")


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


# --------------------------------------------------------------------------------------------------
# Replaying the part of a forward an ablation does not change
# --------------------------------------------------------------------------------------------------


def unchanged_modules(unet: nn.Module, info) -> list[nn.Module]:
    """The modules whose outputs do not change when skip ``info`` (a SkipInfo) alone is ablated, in forward
    order: conv_in, every down block, the mid block, the up blocks before ``info.up_block`` and, in a layered
    up block, its resnets and attentions before ``info.layer``."""
    modules = [unet.conv_in, *unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else [])]
    modules += list(unet.up_blocks[: info.up_block])
    block = unet.up_blocks[info.up_block]
    attentions = getattr(block, "attentions", None)
    if type(block).__name__ in LAYERED_UP_BLOCKS and (attentions is None or len(attentions) == len(block.resnets)):
        modules += list(block.resnets[: info.layer])
        modules += list(attentions[: info.layer]) if attentions is not None else []
    return modules


def can_replay(unet: nn.Module, router) -> bool:
    """Replay needs the unchanged part of a forward to be the same in every pass (no sampled gate states) and
    its outputs never modified in place (diffusers' own ``enable_freeu`` scales the backbone in place)."""
    sampled = router.inference == "sample" and any(g.stochastic for g in router.gates)
    freeu = any(getattr(block, "b1", None) for block in unet.up_blocks)
    return not sampled and not freeu


@contextmanager
def recording(modules: list[nn.Module]):
    """``with recording(modules) as outputs:`` a forward fills ``outputs`` (module -> its output)."""
    outputs: dict[nn.Module, object] = {}
    handles = [m.register_forward_hook(lambda module, args, out: outputs.__setitem__(module, out)) for m in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replaying(outputs: dict[nn.Module, object]):
    """For the length of the block each module of ``outputs`` returns its recorded output instead of
    computing (its own ``forward`` is restored afterwards, including an instance-level one)."""
    saved = {}
    for module, output in outputs.items():
        saved[module] = module.__dict__.get("forward")
        module.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


# --------------------------------------------------------------------------------------------------
# The importance matrix
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def skip_importance(
    unet,
    scheduler,
    encoder,
    batches,
    factors=(0.0,),
    buckets: int = 10,
    seed: int = 0,
    conditional: bool = False,
    unet_kwargs: UnetKwargs | None = None,
    replay: bool = True,
    router=None,
) -> dict:
    """Delta denoising loss (ablated - baseline) per skip, factor and timestep bucket.

    ``router`` gates ``unet``'s skips (default ``unet.skip_router``, a SkipUNet2DModel's; for any other UNet
    the router :func:`skipdiff.skips.unet.apply_skip_spec` returned). ``replay=False`` recomputes every ablated forward in full (the
    reference the replay is tested against). Returns ``{"baseline": [per bucket], "baseline_mean",
    "denoise": the baseline's denoising_loss_by_bucket result, "factors": {f: {"delta": K x buckets,
    "delta_mean": [K]}}, "buckets", "skips", "forwards": {"full", "partial"}}``.
    """
    router = router if router is not None else unet.skip_router
    if unet_kwargs is None and conditional:
        unet_kwargs = lambda batch: {"class_labels": batch["labels"]}  # noqa: E731
    replay = replay and can_replay(unet, router)
    device = next(unet.parameters()).device
    variants = [(str(f), ablation_entry(f), info) for f in factors for info in router.skips]
    plans = {info.index: unchanged_modules(unet, info) for info in router.skips}
    recorded = list(dict.fromkeys(m for plan in plans.values() for m in plan)) if replay else []
    base_rows, rows = [], {(name, info.index): [] for name, _, info in variants}
    was_training = unet.training
    unet.eval()
    try:
        prepared = prepared_batches(encoder, batches, unet_kwargs, device, seed)
        for _, noisy, timesteps, target, kwargs in noised_buckets(scheduler, prepared, buckets, seed):
            with recording(recorded) as outputs:
                base_rows.append(per_example_mse(predict(unet, noisy, timesteps, kwargs), target).cpu())
            for name, entry, info in variants:
                replayed = {m: outputs[m] for m in plans[info.index]} if replay else {}
                with gate_override(router, info.index, entry, device), replaying(replayed):
                    prediction = predict(unet, noisy, timesteps, kwargs)
                rows[name, info.index].append(per_example_mse(prediction, target).cpu())
    finally:
        unet.train(was_training)
    edges = bucket_edges(scheduler.config.num_train_timesteps, buckets)
    baseline = bucket_summary(_per_example(base_rows, buckets), edges, seed)
    base = np.array([b["loss"] for b in baseline["buckets"]])
    result = {
        "baseline": base.tolist(),
        "baseline_mean": baseline["mean"],
        "denoise": baseline,
        "factors": {},
        "buckets": [[b["t_min"], b["t_max"]] for b in baseline["buckets"]],
        "skips": router.describe(),
        "replay": replay,
        "seed": seed,
    }
    for factor in factors:
        delta = np.zeros((len(router.skips), buckets))
        for info in router.skips:
            ablated = _per_example(rows[str(factor), info.index], buckets).mean(dim=0).numpy()
            delta[info.index] = ablated - base
        result["factors"][str(factor)] = {"delta": delta.tolist(), "delta_mean": delta.mean(axis=1).tolist()}
    return result


def _per_example(columns: list[torch.Tensor], buckets: int) -> torch.Tensor:
    """Per-bucket loss vectors in (batch, bucket) order -> (N, buckets) float64."""
    per_batch = [torch.stack(columns[i : i + buckets], dim=1) for i in range(0, len(columns), buckets)]
    return torch.cat(per_batch).double()


# --------------------------------------------------------------------------------------------------
# What replay saves
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def replay_flops(unet, router, sample: torch.Tensor, timesteps: torch.Tensor, unet_kwargs: dict | None = None) -> dict:
    """FLOPs of the baseline forward and of each skip's replayed (partial) forward on ``sample``.

    ``router`` gates ``unet``'s skips. Works on the ``meta`` device (no weights or memory needed): build the
    UNet under ``torch.device("meta")`` and pass meta tensors. Returns ``{"full", "partial": [per skip],
    "naive_over_replay"}``, the last being the cost of K full ablated forwards plus the baseline over the
    baseline plus K partial ones (per factor, per noised batch).
    """
    kwargs = unet_kwargs or {}
    with recording([m for info in router.skips for m in unchanged_modules(unet, info)]) as outputs:
        with FlopCounterMode(display=False) as counter:
            unet(sample, timesteps, **kwargs)
    full = counter.get_total_flops()
    partial = []
    for info in router.skips:
        replayed = {m: outputs[m] for m in unchanged_modules(unet, info)}
        with gate_override(router, info.index, {"mode": "zero"}, sample.device), replaying(replayed):
            with FlopCounterMode(display=False) as counter:
                unet(sample, timesteps, **kwargs)
        partial.append(int(counter.get_total_flops()))
    count = len(partial)
    return {"full": int(full), "partial": partial, "naive_over_replay": (full * (1 + count)) / (full + sum(partial))}


def importance_heatmap(result: dict, factor: str, path) -> None:
    """Save the skip x timestep delta-loss matrix of one factor as a PNG heatmap: one row per skip (its index
    and the resolution at which it joins the decoder), one column per timestep bucket, colour = the change in
    held-out denoising MSE when that skip alone is scaled by ``factor`` (red: the loss rises without it).
    Each cell is annotated with its value in units of 10^-k, k chosen so the largest prints as 3 digits."""
    # matplotlib (~0.5 s) only for the heatmap
    from .plots import new_figure, save_figure

    delta = np.array(result["factors"][factor]["delta"])
    limit = float(np.abs(delta).max()) or 1.0
    exponent = 2 - int(np.floor(np.log10(limit)))  # largest |delta| x 10^exponent in [100, 1000)
    scaled = delta * 10.0**exponent
    fig, ax = new_figure(max(4.5, 2.6 + 0.5 * delta.shape[1]), max(3.0, 1.6 + 0.3 * delta.shape[0]))
    bound = limit * 10.0**exponent
    image = ax.imshow(scaled, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    if scaled.size <= 400:  # small enough to print every value
        for (k, b), value in np.ndenumerate(scaled):
            ax.text(
                b,
                k,
                f"{round(value):d}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if abs(value) > 0.6 * bound else "black",
            )
    ax.set_xticks(range(delta.shape[1]), [f"{lo}-{hi}" for lo, hi in result["buckets"]], rotation=60, fontsize=7)
    ax.set_yticks(
        range(delta.shape[0]),
        [f"{s['index']} ({s['resolution']}×{s['resolution']})" for s in result["skips"]],
        fontsize=7,
    )
    ax.set_xlabel("timestep bucket (t from-to; low t: little noise)")
    ax.set_ylabel("skip index (resolution)")
    ablation = "zeroed" if float(factor) == 0 else f"scaled by {factor}"
    ax.set_title(f"change in denoising loss, each skip alone {ablation}", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"Δ loss × $10^{{{exponent}}}$\n(MSE, ablated − all kept)")
    save_figure(fig, path)
