"""What a deterministic skip configuration costs at inference: FLOPs of one UNet forward.

A stochastic router (``markov``, ``bernoulli``) recommends a fixed configuration, its MAP path
(:meth:`skipdiff.router.SkipRouter.recommended_spec`). A skip that is closed there can be *removed*:
the receiving resnet is rebuilt without the skip's input channels (``remove`` mode), so its first
convolution and channel-matching 1x1 shortcut shrink. :func:`map_compute` counts the FLOPs of one
forward pass of the trained architecture (every skip's channels present) and of that pruned one with
``torch.utils.flop_counter`` (convolutions, matmuls), and reports the fraction saved.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..unet import SkipUNet2DModel


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
