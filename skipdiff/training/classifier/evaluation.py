"""Evaluation of a classifier run: loss and accuracy over a split, gradient flow per block, and the size of
the activations each block hands on (the quantities a vanishing-gradient or degradation study reads)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from ...classifiers import SkipClassifierPreTrainedModel, first_last_ratio, unit_of
from ...gradients import grad_norms_by_block
from .data import model_inputs
from .gates import BlockGates, gate_kwargs


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, gates: BlockGates) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a loader (eval mode, gathered over processes)."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in loader:
        inputs, labels = model_inputs(batch)
        logits = model(**inputs, **gate_kwargs(gates.eval_gates(labels.shape[0]), labels.device)).logits
        logits, labels = accelerator.gather_for_metrics((logits, labels))  # (N, C), (N,)
        total_loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += labels.shape[0]
    model.train(was_training)
    return {"loss": total_loss / count, "accuracy": correct / count}


def gradient_flow(model: nn.Module) -> dict:
    """Gradient norm per unit (stem, blocks.0..N-1, head) and the first-to-last block ratio (one host read)."""
    norms = grad_norms_by_block(model, unit_of(model))
    try:
        ratio = first_last_ratio(norms)
    except ValueError:  # the last block got no gradient
        ratio = float("nan")
    return {"grad_norm": norms, "grad_ratio_first_last": ratio}


@torch.no_grad()
def activation_rms(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Root mean square of the stem's and every block's output on one batch, as training sees them
    (train mode: BatchNorm normalises with the batch's statistics); None for models without per-block
    hidden states (transformers' reference ResNet). Runs on a copy, so no running statistic changes."""
    if not isinstance(model, SkipClassifierPreTrainedModel):
        return None
    probe = copy.deepcopy(model).train()
    inputs, _ = model_inputs(batch)
    hidden = probe(**inputs, output_hidden_states=True).hidden_states  # stem, then blocks: (B, C, ...) each
    names = ["stem", *[f"blocks.{k}" for k in range(len(hidden) - 1)]]
    values = torch.stack([h.float().square().mean().sqrt() for h in hidden]).tolist()
    return dict(zip(names, values, strict=True))
