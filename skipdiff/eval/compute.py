"""What a deterministic skip configuration costs at inference: FLOPs of one UNet forward.

A stochastic router (``markov``, ``bernoulli``) recommends a fixed configuration, its MAP path
(:meth:`skipdiff.skips.router.SkipRouter.recommended_spec`). A skip that is closed there can be *removed*:
the receiving resnet is rebuilt without the skip's input channels (``remove`` mode), so its first
convolution and channel-matching 1x1 shortcut shrink. :func:`map_compute` counts the FLOPs of one
forward pass of the trained architecture (every skip's channels present) and of that pruned one with
``torch.utils.flop_counter`` (convolutions, matmuls), and reports the fraction saved.

:func:`cache_compute` counts what feature caching across sampling steps (:mod:`skipdiff.skips.caching`)
leaves of a forward pass: the FLOPs of a refresh step and of a cached step, their ratio ``f``, and
the speed-up that bounds: ``N / (1 + (N - 1) f)`` for a refresh every ``N`` steps, ``T / (R + (T -
R) f)`` for a run of ``T`` steps with ``R`` refreshes. Its counter includes attention on the CPU
(torch's counter has no formula for the CPU kernel of ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..skips.cache_options import SkipCacheOptions, refresh_steps
from ..skips.caching import enable_skip_cache
from ..skips.unet import SkipUNet2DModel


def forward_flops(unet: torch.nn.Module, sample_shape: tuple[int, ...], class_label: int | None = None) -> int:
    """FLOPs of one forward pass of ``unet`` on one sample of shape ``(C, H, W)`` (batch 1, CPU)."""
    sample = torch.zeros(1, *sample_shape)
    labels = None if class_label is None else torch.tensor([class_label])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([10]), class_labels=labels)
    return int(counter.get_total_flops())


def map_compute(unet: SkipUNet2DModel, sample_shape: tuple[int, ...], class_label: int | None = None) -> dict:
    """The MAP configuration of ``unet``'s stochastic skips and the inference compute it saves.

    Returns ``recommended`` (the gate mode per skip), ``closed`` (indices of skips the MAP path
    closes), ``fraction_closed`` (over all long skips), and ``flops_trained`` / ``flops_map`` /
    ``flops_saved_fraction`` for one forward pass. The pruned model is built from ``unet``'s config
    with closed skips set to ``remove`` (weights are not needed to count FLOPs).
    """
    recommended = unet.skip_router.recommended_spec()
    closed = [i for i, entry in enumerate(recommended) if entry["mode"] in ("zero", "remove")]
    pruned_skips = [{"mode": "remove"} if i in closed else entry for i, entry in enumerate(recommended)]
    trained_skips = [{"mode": "keep"} if i in closed else entry for i, entry in enumerate(recommended)]
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    flops = {}
    for name, skips in (("trained", trained_skips), ("map", pruned_skips)):
        model = SkipUNet2DModel(**{**config, "skips": skips, "markov": {}}).eval()
        flops[name] = forward_flops(model, sample_shape, class_label)
    return {
        "recommended": [entry["mode"] for entry in recommended],
        "closed": closed,
        "fraction_closed": len(closed) / max(len(recommended), 1),
        "flops_trained": flops["trained"],
        "flops_map": flops["map"],
        "flops_saved_fraction": 1.0 - flops["map"] / flops["trained"],
    }


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (convolutions, matmuls, attention), counting attention on the CPU as well."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of ``call()``, run without gradients."""
    with torch.no_grad(), flop_counter() as counter:
        call()
    return int(counter.get_total_flops())


def speedup_bound(interval: int, cached_fraction: float) -> float:
    """The FLOP bound on the speed-up of refreshing every ``interval`` steps: N / (1 + (N - 1) f)."""
    return interval / (1 + (interval - 1) * cached_fraction)


def cache_compute(
    unet: torch.nn.Module, options: SkipCacheOptions, args: tuple, kwargs: dict | None = None, num_steps: int = 50
) -> dict:
    """What a cached step of ``unet`` under ``options`` still computes, and the speed-up that bounds.

    ``args``/``kwargs`` are one UNet call's inputs (e.g. ``(sample, timestep)`` and
    ``{"encoder_hidden_states": ...}``); the count is of two calls, a refresh and a cached one.
    Returns ``flops_full``, ``flops_cached``, ``cached_fraction`` (f), ``cached_bytes`` (the features
    kept between refreshes, for this batch), ``num_steps``, ``refresh_steps`` (R of them in a run of
    ``num_steps``), ``bound_interval`` (N / (1 + (N-1) f)) and ``bound_run`` (T / (R + (T - R) f), the
    bound for that run's actual schedule), and ``branch`` (the skip branch a ``skip_branch`` cache uses, its
    default resolved; None for encoder propagation). Works on the meta device (no compute, same counts).
    """
    kwargs = kwargs or {}
    # Which modules a cached step skips depends on mode and branch only: probe with refresh, cached.
    probe = dataclasses.replace(options, cache_interval=2, cache_schedule="uniform", cache_key_steps=None)
    cache = enable_skip_cache(unet, probe)
    try:
        cache.start_run(2)
        full = count_flops(lambda: unet(*args, **kwargs))
        kept = cache.cached_bytes()  # what the refresh call left for the cached one
        cache.end_step()
        cached = count_flops(lambda: unet(*args, **kwargs))
    finally:
        cache.disable()
    fraction = cached / full
    refreshes = len(refresh_steps(options, num_steps))
    return {
        "branch": cache.options.cache_branch,
        "flops_full": full,
        "flops_cached": cached,
        "cached_fraction": fraction,
        "cached_bytes": kept,
        "num_steps": num_steps,
        "refresh_steps": refreshes,
        "bound_interval": speedup_bound(options.cache_interval, fraction),
        "bound_run": num_steps / (refreshes + (num_steps - refreshes) * fraction),
    }
