"""``python -m skipdiff.search``: find the best skip configuration with Optuna, on one process or many.

    python -m skipdiff.search eval/searches/digits_skips.yaml --dry_run        # the space, objectives, budget
    python -m skipdiff.search eval/searches/digits_skips.yaml                  # -> runs/searches/digits_skips/
    python -m skipdiff.search eval/searches/digits_skips.yaml --workers 2      # 2 processes, 1 thread each
    python -m skipdiff.search SPEC --workers 4 --devices 0,1,2,3               # one GPU per worker
    python -m skipdiff.search SPEC --storage postgresql+psycopg://me@db:5432/optuna   # shared by machines
    python -m skipdiff.search.worker --storage URL --study NAME                # join from another machine / job
    python -m skipdiff.report runs/searches/digits_skips                       # history, importance, confirmation

Spec (YAML):

    kind: training                  # each trial trains a model (as a sweep cell), or inference: a
                                    #   pretrained pipeline / run (base: checkpoint), skips and caching only
    base: {max_train_steps: 300}    # options of every trial (training options, or evaluation options)
    space:                          # choices (a list) or ranges ({low, high[, log, step, type]})
      skips: [full, per_skip, scalelong, markov]    # the skip family; its parameters exist only when chosen
      skip: [keep, zero, scale]     # per_skip: each skip's mode (parameters skip.0 ... skip.K-1)
      skip.scale: {low: 0.2, high: 1.0}             # a scaled skip's factor (skip.<k>.scale)
      scalelong.kappa: {low: 0.5, high: 0.95}       # any preset's argument: freeu.b1, linear.inner, ...
      markov.p_init: {low: 0.6, high: 0.95}         # Markov-chain options (with skips: markov)
      model.layers_per_block: [1, 2]                # the UNet: block_out_channels, layers_per_block, attention
      learning_rate: {low: 3.0e-4, high: 3.0e-3, log: true}   # any other option of a trial
    objectives: [denoise_mse]       # denoise_mse, fid_minus_floor, fid, kid, clip_score, sampling_seconds,
                                    #   flops, parameters (each with its own direction)
    constraints: {flops: 4.0e+7}    # upper limits, recorded for the sampler (feasible when <= the limit)
    pruner: successive_halving      # or hyperband, median, threshold ({name: threshold, upper: 0.5}), none
                                    #   (single-objective training searches only)
    prune: {steps: [100, 200]}      # report the held-out denoising MSE there (images: 128, buckets: 10)
    sampler: tpe                    # or random, gp, cmaes, nsga2, qmc, grid; {name: tpe, n_startup_trials: 5}
    seed: 0                         # the sampler's seed: the same proposals again
    enqueue: [{skips: full}]        # known configurations, tried first
    budget: {trials: 30, minutes: 60}   # trials: finished trials of the study; minutes: per launch
    eval: {denoise_loss: true}      # skipdiff.eval options per trial (the objectives add what they need)
    confirm: {top: 3, seeds: [100, 101, 102], reference: {skips: full}, eval: {fid: true, denoise_loss: true}}
                                    # fresh seeds, after the search (eval: default the search's);
                                    # also: {grid-best: {skips: learned}} confirms configurations chosen
                                    # elsewhere beside the top k, on the same seeds and reference
    storage: {heartbeat_seconds: 60, grace_seconds: 120, max_retry: 3}

Layout of --out: ``search.json`` (the spec as run), ``study.db`` (the default storage: SQLite),
``trials/trial-NNNN/`` (a normal run folder with ``trial.json``: parameters, options, state, values),
``confirm/`` (the confirmation sweep and its report), ``report/`` (``python -m skipdiff.report``).

Modules: spec (YAML -> SearchSpec), space (parameters -> a trial's options), objectives (what can be
optimised), engine (everything Optuna), trial (one trial), worker (the loop over trials), confirm (top-k
on fresh seeds), report (the search's figures and tables), __main__ (the command line).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "SearchSpec": ".spec",
    "load_search_spec": ".spec",
    "parse_search_spec": ".spec",
    "Space": ".space",
    "parse_space": ".space",
    "suggest": ".space",
    "FixedTrial": ".space",
    "OBJECTIVES": ".objectives",
    "run_worker": ".worker",
    "run_confirmation": ".confirm",
    "write_search_report": ".report",
    "main": ".__main__",
    "cli": ".__main__",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
