"""The classifier registry: model name -> builder, one line each (DiT's ``DiT_models``, timm's registry).

Every builder takes the run's options, the number of inputs (image channels or tabular features) and of
labels. The ablation (depth, widths, ``skip_connections``, ``batch_norm``, ``gate_target``) goes into the
model's config and round-trips through ``save_pretrained``. What data each name takes is
:data:`~skipdiff.training.classifier.options.MODEL_KINDS` (light, for the command line); a test keeps
the two in step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...classifiers import (
    ResidualMLPConfig,
    ResidualMLPForClassification,
    SkipResNetConfig,
    SkipResNetForImageClassification,
    reference_resnet,
)
from .options import MODEL_KINDS, ClassifierOptions

MODELS: dict[str, Callable[[ClassifierOptions, int, int], nn.Module]] = {
    "skipresnet": lambda o, inputs, labels: SkipResNetForImageClassification(
        SkipResNetConfig(
            num_labels=labels,
            num_channels=inputs,
            widths=list(o.widths),
            depth=o.depth,
            hidden_size=o.hidden_size,
            skip_connections=o.skip_connections,
            batch_norm=o.batch_norm,
            gate_target=o.gate_target,
        )
    ),
    "mlp": lambda o, inputs, labels: ResidualMLPForClassification(
        ResidualMLPConfig(
            num_labels=labels,
            num_features=inputs,
            width=o.hidden_size,
            depth=o.depth,
            skip_connections=o.skip_connections,
            batch_norm=o.batch_norm,
            gate_target=o.gate_target,
        )
    ),
    "reference": lambda o, inputs, labels: reference_resnet(labels, inputs, tuple(o.widths), o.depth),
}


def build_model(options: ClassifierOptions, num_inputs: int, num_labels: int) -> nn.Module:
    """The model ``options.model`` names, built for the data's inputs and labels."""
    if options.model not in MODELS:
        raise ValueError(f"unknown --model {options.model!r}; models: {sorted(MODEL_KINDS)}")
    return MODELS[options.model](options, num_inputs, num_labels)
