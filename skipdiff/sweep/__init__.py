"""``python -m skipdiff.sweep``: a grid of runs, each followed by its evaluation, from a YAML spec.

    python -m skipdiff.sweep eval/sweeps/cpu_digits.yaml --dry_run           # the cells and their options
    python -m skipdiff.sweep eval/sweeps/cpu_digits.yaml --num_threads 2     # -> runs/sweeps/cpu_digits/
    python -m skipdiff.sweep eval/sweeps/classifiers.yaml --only data-wine   # cells whose name contains it
    python -m skipdiff.sweep eval/sweeps/gpu_cifar10.yaml --launcher accelerate --accelerate_args "--mixed_precision bf16"
    python -m skipdiff.report runs/sweeps/cpu_digits                         # -> runs/sweeps/cpu_digits/report/

Spec (YAML):

    kind: diffusion                 # or classifier: a registered cell kind (skipdiff.sweep.kinds)
    description: one line, shown in the report
    base:                           # options shared by every cell (TrainOptions / ClassifierOptions)
      max_train_steps: 300
      learning_rate: 2.0e-3         # YAML reads "2e-3" as a string: write a mantissa with a dot
    grid:                           # the cartesian product of the axes; a list of such dicts is their union
      skips: [full, none]           # an option name -> a list of values (labels made from the values)
      seed: [0, 1]
    #   skips: {full: full, zero0: "zero,keep,..."}       # or label -> value (readable cell names)
    #   skips: {markov: {skips: markov, markov: "warmup_steps=100"}}   # a value that is a dict sets
    #   data: {wine: {dataset: wine, model: mlp}}          #   several options; an axis that is no option
    #                                                      #   must use such dicts only
    eval:                           # skipdiff.eval options (EvalOptions) run on every cell
      denoise_loss: true            #   (diffusion only; default: denoise_loss + grad_stability)
      fid: true
      num_samples: 500
    inference_variants:             # optional, diffusion only: label -> skip spec applied at inference
      identity: "freeu:b1=1:b2=1:s1=1:s2=1"

Every cell's options are validated (from_dict) before anything runs; unknown keys, wrong types,
empty axes and colliding cell names raise ValueError.

Layout of --out (default runs/sweeps/<spec name>):

    sweep.json                      the spec as run and the cell names, in order (the report reads it)
    <cell>/                         the cell's run folder, named from its grid labels
    <cell>/eval/eval.json           skipdiff.eval's results (diffusion)
    <cell>/variants/<label>/        the trained model with the variant's skips (a run folder) + eval/
    <cell>/cell.json                running -> trained -> done (or failed), written atomically
    report/                         python -m skipdiff.report's default output

Relaunching skips done cells, evaluates trained ones and resumes the others from their latest
checkpoint (checkpoint every N steps via base: checkpointing_steps).

Modules: spec (YAML -> cells), kinds (the registry of cell kinds), cells (one cell's state machine),
launch (in process, or accelerate launch -m), runner (the loop), skips (skip specs and inference
variants), __main__ (the command line).
"""

from __future__ import annotations

from ..lazy import lazy_exports

# name -> module (relative to this package) that defines it; imported on first use, so that
# `python -m skipdiff.sweep --help` answers without importing torch.
_EXPORTS = {
    "SweepSpec": ".spec",
    "Cell": ".spec",
    "load_spec": ".spec",
    "parse_spec": ".spec",
    "expand_cells": ".spec",
    "cell_name": ".spec",
    "CellKind": ".kinds",
    "KINDS": ".kinds",
    "register_kind": ".kinds",
    "get_kind": ".kinds",
    "cell_status": ".cells",
    "read_cell": ".cells",
    "run_cell": ".cells",
    "Launcher": ".launch",
    "train_cell": ".launch",
    "options_to_argv": ".launch",
    "accelerate_command": ".launch",
    "run_sweep": ".runner",
    "SweepError": ".runner",
    "with_skips": ".skips",
    "make_inference_variant": ".skips",
    "check_skip_specs": ".skips",
    "check_variant_specs": ".skips",
    "main": ".__main__",
    "cli": ".__main__",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
