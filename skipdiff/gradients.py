"""Gradient norms per group of parameters (UNet blocks, classifier blocks): one measurement shared by the
training telemetry, the classifiers and evaluation, free of training code."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

# Prefixes that wrappers put in front of parameter names: torch.compile's and DDP's.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrappers(name: str) -> str:
    """``_orig_mod.module.down_blocks.0.x`` -> ``down_blocks.0.x``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def block_of(parameter_name: str) -> str:
    """The UNet block a parameter belongs to: ``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks.0``."""
    parts = strip_wrappers(parameter_name).split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:2])
    if parts[0] == "skip_router":
        return "gates"
    if parts[0] in ("time_embedding", "class_embedding", "time_proj", "add_embedding", "encoder_hid_proj"):
        return "embedding"
    if parts[0] in ("conv_norm_out", "conv_act"):
        return "conv_out"
    return parts[0]


@torch.no_grad()
def grad_norms_by_block(model: nn.Module, group_of: Callable[[str], str | None] = block_of) -> dict[str, float]:
    """L2 norm of the gradient of each group of parameters (``group_of(name)``; None leaves a parameter
    out, as do parameters without a gradient), in the order groups first appear. One host read."""
    squares: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, param in model.named_parameters():
        group = group_of(name)
        if param.grad is not None and group is not None:
            squares[group].append(param.grad.detach().float().square().sum())
    if not squares:
        return {}
    totals = torch.stack([torch.stack(values).sum() for values in squares.values()]).sqrt().tolist()
    return dict(zip(squares, totals, strict=True))
