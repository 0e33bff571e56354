"""A search spec: YAML -> a validated :class:`SearchSpec` (the format is in :mod:`skipdiff.search`'s docstring).

Everything is checked here, before a study is created or anything trains: unknown keys, wrong types,
empty or inverted ranges, objectives unknown or without the evaluation they need, a pruner on a
multi-objective study, confirmation seeds that a trial already used.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..eval.options import EvalOptions
from ..sweep.spec import read_yaml_spec
from ..training.options import TrainOptions
from .objectives import OBJECTIVES, needed_eval
from .space import Space, parse_space

SPEC_KEYS = (
    "kind",
    "description",
    "base",
    "space",
    "objectives",
    "constraints",
    "budget",
    "sampler",
    "pruner",
    "prune",
    "seed",
    "enqueue",
    "eval",
    "confirm",
    "storage",
)
KINDS = ("training", "inference")
SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2", "grid", "qmc")
PRUNERS = ("none", "successive_halving", "hyperband", "median", "threshold")
TRAINING_SET_BY_SEARCH = ("output_dir", "resume_from_checkpoint", "dry_run", "overwrite_output_dir")
INFERENCE_SET_BY_SEARCH = ("out", "compare", "dry_run")


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """A parsed search spec."""

    name: str
    kind: str
    base: dict
    space: Space
    objectives: tuple[str, ...]
    constraints: dict[str, float]
    budget: dict
    sampler: dict
    pruner: dict
    prune: dict
    seed: int
    enqueue: tuple[dict, ...]
    eval: dict
    confirm: dict
    storage: dict
    description: str = ""
    raw: dict = dataclasses.field(default_factory=dict)
    source: str | None = None  # the YAML file it was read from

    @property
    def training(self) -> bool:
        return self.kind == "training"

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name].direction for name in self.objectives]

    @property
    def pruned(self) -> bool:
        return self.pruner["name"] != "none"


def options_class(kind: str) -> type:
    """The dataclass of one trial's options: training options, or evaluation options (inference)."""
    if kind == "training":
        return TrainOptions
    return EvalOptions


def load_search_spec(path: str | os.PathLike) -> SearchSpec:
    """Read and check a YAML spec; the search's (and its study's) name is the file's stem."""
    spec = parse_search_spec(read_yaml_spec(path, "search spec"), Path(path).stem)
    return dataclasses.replace(spec, source=str(path))


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, got {value!r}")
    return dict(value)


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_search_spec(data: Any, name: str) -> SearchSpec:
    """A spec dict (as read from YAML) -> :class:`SearchSpec`; raises ``ValueError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"search spec {name!r} must be a mapping with keys {SPEC_KEYS}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"search spec {name!r}: unknown key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"search spec {name!r}: kind must be one of {KINDS}, got {kind!r}")
    training = kind == "training"
    cls = options_class(kind)
    fields = {f.name for f in dataclasses.fields(cls)}
    base = _mapping(data.get("base"), "base")
    objectives = _objectives(data.get("objectives"), training)
    if not training:  # an inference trial is one evaluation: it computes what the objectives need
        base = {**needed_eval(objectives), **base}
    set_by_search = TRAINING_SET_BY_SEARCH if training else INFERENCE_SET_BY_SEARCH
    for key in sorted(set(base) & set(set_by_search)):
        raise ValueError(f"base option {key!r} is set by the search for every trial; remove it")
    try:
        from_dict(cls, base)
    except (ValueError, TypeError) as err:
        raise ValueError(f"base: {err}") from err
    if not training and not base.get("checkpoint"):
        raise ValueError("an inference search needs base: checkpoint (a pipeline folder, run folder or Hub id)")
    space = parse_space(data.get("space"), fields - set(set_by_search), training)
    pruner = _pruner(data.get("pruner"), objectives, training)
    spec = SearchSpec(
        name=name,
        kind=kind,
        base=base,
        space=space,
        objectives=objectives,
        constraints=_constraints(data.get("constraints"), objectives),
        budget=_budget(data.get("budget")),
        sampler=_sampler(data.get("sampler"), len(objectives)),
        pruner=pruner,
        prune=_prune(data.get("prune"), pruner),
        seed=_int(data.get("seed", 0), "seed"),
        enqueue=_enqueue(data.get("enqueue"), space),
        eval=_eval(data.get("eval"), objectives, training),
        confirm=_confirm(data.get("confirm"), base, space, training),
        storage=_storage(data.get("storage")),
        description=str(data.get("description") or ""),
        raw=data,
    )
    if len(spec.enqueue) > spec.budget.get("trials", len(spec.enqueue)):
        raise ValueError(
            f"enqueue lists {len(spec.enqueue)} configurations but budget trials is {spec.budget['trials']}"
        )
    if "denoise_mse" in objectives and "prediction_type" in space.params:
        raise ValueError(
            "objective denoise_mse compares losses of one prediction type; prediction_type cannot be "
            "searched with it (use fid_minus_floor or kid)"
        )
    return spec


def _objectives(raw: Any, training: bool) -> tuple[str, ...]:
    names = raw if isinstance(raw, list) else [raw] if isinstance(raw, str) else None
    if not names:
        raise ValueError(f"objectives must be a non-empty list of {sorted(OBJECTIVES)}, got {raw!r}")
    for objective in names:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; objectives: {sorted(OBJECTIVES)}")
        if OBJECTIVES[objective].training_only and not training:
            raise ValueError(f"objective {objective!r} needs a training search")
    if len(set(names)) != len(names):
        raise ValueError(f"objectives lists one twice: {names}")
    return tuple(names)


def _constraints(raw: Any, objectives: tuple[str, ...]) -> dict[str, float]:
    constraints = _mapping(raw, "constraints")
    for key, limit in constraints.items():
        if key not in OBJECTIVES:
            raise ValueError(f"constraint {key!r} is no measured quantity; one of {sorted(OBJECTIVES)}")
        if isinstance(limit, bool) or not isinstance(limit, int | float):
            raise ValueError(f"constraint {key!r} must be a number (the largest value allowed), got {limit!r}")
    return {k: float(v) for k, v in constraints.items()}


def _budget(raw: Any) -> dict:
    budget = _mapping(raw, "budget")
    unknown = sorted(set(budget) - {"trials", "minutes"})
    if unknown or not budget:
        raise ValueError(f"budget needs trials and/or minutes (per launch), got {raw!r}")
    if "trials" in budget:
        _int(budget["trials"], "budget trials", 1)
    if "minutes" in budget and (
        isinstance(budget["minutes"], bool) or not isinstance(budget["minutes"], int | float) or budget["minutes"] <= 0
    ):
        raise ValueError(f"budget minutes must be a number > 0, got {budget['minutes']!r}")
    return budget


def _sampler(raw: Any, n_objectives: int) -> dict:
    sampler = {"name": raw} if isinstance(raw, str) else _mapping(raw, "sampler")
    sampler.setdefault("name", "tpe")
    if sampler["name"] not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler['name']!r}")
    if sampler["name"] in ("cmaes", "gp") and n_objectives > 1:
        raise ValueError(f"sampler {sampler['name']!r} is single-objective; use tpe or nsga2 for several objectives")
    return sampler


def _pruner(raw: Any, objectives: tuple[str, ...], training: bool) -> dict:
    pruner = {"name": raw} if isinstance(raw, str) else _mapping(raw, "pruner")
    pruner.setdefault("name", "none")
    if pruner["name"] not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS}, got {pruner['name']!r}")
    if pruner["name"] != "none":
        if len(objectives) > 1:
            raise ValueError(
                f"pruner {pruner['name']!r} on {len(objectives)} objectives: Optuna prunes single-objective "
                "studies only; drop the pruner, or keep one objective and turn FLOPs or parameters into "
                "constraints"
            )
        if not training:
            raise ValueError("pruning needs intermediate values: a training search only")
        if objectives[0] != "denoise_mse":
            raise ValueError(
                f"pruning reports the held-out denoising MSE during training; objective must be "
                f"denoise_mse, got {objectives[0]!r}"
            )
    return pruner


def _prune(raw: Any, pruner: dict) -> dict:
    prune = _mapping(raw, "prune")
    unknown = sorted(set(prune) - {"steps", "images", "buckets"})
    if unknown:
        raise ValueError(f"prune: unknown key(s) {unknown}; prune takes steps, images, buckets")
    if pruner["name"] == "none":
        if prune:
            raise ValueError("prune: given without a pruner; add pruner: successive_halving (or hyperband, median)")
        return {}
    steps = prune.get("steps")
    if (
        not isinstance(steps, list)
        or not steps
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps)
    ):
        raise ValueError(
            f"prune steps must be a list of training steps >= 1 (where the held-out loss is reported), got {steps!r}"
        )
    return {
        "steps": sorted(set(steps)),
        "images": _int(prune.get("images", 128), "prune images", 1),
        "buckets": _int(prune.get("buckets", 10), "prune buckets", 1),
    }


def _enqueue(raw: Any, space: Space) -> tuple[dict, ...]:
    """The known configurations, each parameter checked against the space and stored as Optuna stores it
    (a list choice such as ``model.block_out_channels: [32, 64, 64]`` travels as its JSON text)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(e, dict) and e for e in raw):
        raise ValueError(f"enqueue must be a list of parameter mappings (e.g. - {{skips: full}}), got {raw!r}")
    queued = []
    for entry in raw:
        params = {}
        for name, value in entry.items():
            param = space.param_of(str(name))
            if param is None:
                raise ValueError(
                    f"enqueue {entry}: {name!r} is no parameter of the space; space: {sorted(space.params)}"
                )
            try:
                params[name] = param.queued(value)
            except ValueError as err:
                raise ValueError(f"enqueue {entry}: {err}") from None
        queued.append(params)
    return tuple(queued)


def _eval(raw: Any, objectives: tuple[str, ...], training: bool) -> dict:
    evaluation = _mapping(raw, "eval")
    for key in ("checkpoint", "out", "compare"):
        if key in evaluation:
            raise ValueError(f"eval option {key!r} is set by the search; remove it")
    if not training:
        if evaluation:
            raise ValueError("an inference search evaluates with its base options; put evaluation options in base")
        return {}
    evaluation = {**needed_eval(objectives), **evaluation}
    if training:
        try:
            from_dict(EvalOptions, {**evaluation, "checkpoint": "<trial>"})
        except (ValueError, TypeError) as err:
            raise ValueError(f"eval: {err}") from err
    return evaluation


def trial_seeds(base: dict, space: Space, training: bool) -> set[int]:
    """Every seed a trial can use: the training seed (training) or the sampling seeds (inference)."""
    if training:
        if "seed" in space.params:
            param = space.params["seed"]
            return set(param.choices) if param.choices else set(range(int(param.low), int(param.high) + 1))
        return {int(base.get("seed", 0))}
    return set(base.get("seeds", [0, 1, 2]))


def _confirm(raw: Any, base: dict, space: Space, training: bool) -> dict:
    confirm = _mapping(raw, "confirm")
    if not confirm:
        return {}
    unknown = sorted(set(confirm) - {"top", "seeds", "reference", "also", "eval"})
    if unknown:
        raise ValueError(f"confirm: unknown key(s) {unknown}; confirm takes top, seeds, reference, also, eval")
    top = _int(confirm.get("top", 3), "confirm top", 1)
    seeds = confirm.get("seeds")
    if (
        not isinstance(seeds, list)
        or len(seeds) < 2
        or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
    ):
        raise ValueError(f"confirm seeds must be a list of at least 2 integer seeds, got {seeds!r}")
    reused = sorted(set(seeds) & trial_seeds(base, space, training))
    if reused:
        raise ValueError(f"confirm seeds {reused} were used by the search's trials: confirmation needs fresh seeds")
    reference = _mapping(confirm.get("reference", {"skips": "full"}), "confirm reference")
    out = {"top": top, "seeds": list(seeds), "reference": reference}
    if "also" in confirm:
        out["also"] = _also(confirm["also"])
    if "eval" in confirm:  # e.g. FID for the confirmation only, where the search scores the denoising loss
        if not training:
            raise ValueError("confirm eval: an inference confirmation evaluates with the base options")
        out["eval"] = _eval(confirm["eval"], (), training)
    return out


def _also(raw: Any) -> dict:
    """``confirm.also``: configurations found elsewhere (a grid's winner, a paper's setting), each a label
    and its option overrides, confirmed beside the search's best on the same seeds against the same
    reference, so that the two ways of choosing are compared on one footing."""
    also = _mapping(raw, "confirm also")
    for label, overrides in also.items():
        if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
            raise ValueError(f"confirm also: label {label!r} must be letters, digits, '_', '.' or '-'")
        if label == "reference" or label.startswith("trial-"):
            raise ValueError(
                f"confirm also: label {label!r} is taken (the reference and trial-NNNN name the search's rows)"
            )
        _mapping(overrides, f"confirm also {label}")
        if not overrides:
            raise ValueError(f"confirm also {label}: empty overrides (that is the base, not a configuration)")
    return {label: dict(overrides) for label, overrides in also.items()}


def default_storage_settings() -> dict:
    """The ``storage:`` settings of a spec that gives none (heartbeat 60 s, grace 120 s, 3 retries)."""
    return _storage(None)


def _storage(raw: Any) -> dict:
    storage = _mapping(raw, "storage")
    unknown = sorted(set(storage) - {"heartbeat_seconds", "grace_seconds", "max_retry"})
    if unknown:
        raise ValueError(
            f"storage: unknown key(s) {unknown}; storage takes heartbeat_seconds, grace_seconds, max_retry"
        )
    heartbeat = _int(storage.get("heartbeat_seconds", 60), "storage heartbeat_seconds", 1)
    return {
        "heartbeat_seconds": heartbeat,
        "grace_seconds": _int(storage.get("grace_seconds", 2 * heartbeat), "storage grace_seconds", heartbeat + 1),
        "max_retry": _int(storage.get("max_retry", 3), "storage max_retry"),
    }
