"""Classifier baselines on shared datasets from different fields, one concept per module:

* :mod:`.options`: :class:`ClassifierOptions` (the CLI is generated from it; no torch import),
* :mod:`.models`: the registry of model builders (``skipresnet``, ``mlp``, ``reference``),
* :mod:`.data`: train/test splits from the shared data layer,
* :mod:`.gates`: per-example block gates, sampled by the UNet router's code (:func:`skipdiff.skips.router.draw_gate_states`),
* :mod:`.evaluation`: loss and accuracy, gradient flow per block, activation size per block,
* :mod:`.loop`: :func:`train_classifier`.

The ablation (depth, widths, ``skip_connections``, ``batch_norm``, ``gate_target``) goes into the model's
config and round-trips through ``save_pretrained``; the run's settings go to ``training_options.json``.
Block gating (``--gating bernoulli``: stochastic depth, Huang et al. 2016; ``--gating markov``: the
:class:`~skipdiff.skips.markov.MarkovChain` the UNet's skips use, learning from per-example losses) reaches the
model only through its ``block_gates`` argument.

Names other than :class:`ClassifierOptions` are imported on first use, so that the command line answers
``--help`` without importing torch.
"""

from __future__ import annotations

import importlib

from .options import ClassifierOptions

# name -> submodule that defines it
_EXPORTS = {
    "train_classifier": ".loop",
    "evaluate": ".evaluation",
    "gradient_flow": ".evaluation",
    "activation_rms": ".evaluation",
    "load_classifier_data": ".data",
    "ClassifierData": ".data",
    "BlockGates": ".gates",
    "MODELS": ".models",
    "build_model": ".models",
}

__all__ = ["ClassifierOptions", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
