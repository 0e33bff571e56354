"""Optuna behind one module: the storage, the sampler, the pruner, the study and the trial bookkeeping.

The rest of :mod:`skipdiff.search` sees a study and its trials through these functions. Choices:

* **Storage**: Optuna's RDB storage, SQLite in the search folder by default (no server to start) or a
  PostgreSQL URL for workers on several machines. Both carry Optuna's heartbeat: a worker killed
  mid-trial (``kill -9``, a lost node) stops beating, and after the grace period the next worker to ask
  for a trial fails it and re-queues its parameters (``RetryHeartbeatStaleTrialCallback``); the retry
  keeps the trial's folder (a user attribute), so it resumes from the trial's last checkpoint.
* **Sampler**: TPE by default; in Optuna 5 it is multivariate and uses the constant liar, so parallel
  workers do not propose the same point. ``seed`` makes the proposals reproducible.
* **Pruner**: successive halving, Hyperband or the median rule on the held-out loss reported during
  training (single-objective studies only; the spec refuses the rest).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .spec import SearchSpec, default_storage_settings

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TrialPruned = optuna.TrialPruned

optuna.logging.set_verbosity(optuna.logging.WARNING)  # skipdiff prints one line per finished trial itself
# The heartbeat and its retry callback are marked experimental in Optuna 5; they are what makes a killed
# worker's trial come back, so skipdiff relies on them on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def default_storage(folder: Path) -> str:
    """SQLite in the search folder: ``sqlite:///<folder>/study.db``."""
    return f"sqlite:///{(Path(folder) / 'study.db').resolve()}"


def make_storage(url: str, spec_storage: dict) -> RDBStorage:
    """An RDB storage with heartbeats and retry of a dead worker's trial (the spec's ``storage:`` settings)."""
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise ValueError(f"--storage must be an sqlite:///, postgresql+psycopg:// or mysql:// URL, got {url!r}")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _rdb_storage(url, engine_kwargs, spec_storage)


def _rdb_storage(url: str, engine_kwargs: dict, spec_storage: dict) -> RDBStorage:
    return RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=spec_storage["heartbeat_seconds"],
        grace_period=spec_storage["grace_seconds"],
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=spec_storage["max_retry"]),
    )


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded."""
    options = {k: v for k, v in spec.sampler.items() if k != "name"}
    name, seed = spec.sampler["name"], spec.seed
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **options)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **options)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **options)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **options)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, **options)
    grid = {n: list(p.choices) for n, p in spec.space.params.items() if p.choices is not None}
    if len(grid) != len(spec.space.params) or spec.space.families:
        raise ValueError("sampler grid walks categorical plain options only (use a sweep for skip grids)")
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """The spec's pruner (``none``: never prune)."""
    options = {k: v for k, v in spec.pruner.items() if k != "name"}
    name = spec.pruner["name"]
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**{"min_resource": spec.prune["steps"][0], **options})
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            **{"min_resource": spec.prune["steps"][0], "max_resource": spec.prune["steps"][-1], **options}
        )
    if name == "median":
        return optuna.pruners.MedianPruner(**options)
    if name == "threshold":  # stop trials whose held-out loss passes a bound (diverging runs): {upper: 0.5}
        return optuna.pruners.ThresholdPruner(**options)
    return optuna.pruners.NopPruner()


AFTER_THE_SEARCH = "confirm"  # the one spec section no trial reads: it may change between launches


def open_study(spec: SearchSpec, storage_url: str, study_name: str | None = None) -> optuna.Study:
    """Create the study or join it (the same call from every worker); enqueues the spec's known
    configurations once (a duplicate enqueue from a second worker is skipped)."""
    storage = make_storage(storage_url, spec.storage)
    name = study_name or spec.name
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        directions=spec.directions,
        load_if_exists=True,
    )
    stored = study.user_attrs.get("spec")
    if stored is None:
        study.set_user_attr("spec", spec.raw)
        study.set_user_attr("spec_name", spec.name)
    elif stored != spec.raw:
        changed = sorted(k for k in set(stored) | set(spec.raw) if stored.get(k) != spec.raw.get(k))
        if changed != [AFTER_THE_SEARCH]:
            raise ValueError(
                f"study {name!r} in {storage_url} was created from another spec (it differs in "
                f"{changed}); use another --out/--storage"
            )
        study.set_user_attr("spec", spec.raw)  # the confirmation's settings may change: no trial depends on them
    for params in spec.enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    return study


def stored_spec(storage_url: str, study_name: str, spec_storage: dict | None = None) -> tuple[dict, str]:
    """``(raw spec, spec name)`` kept in the study (what a worker joining from another machine runs)."""
    storage = make_storage(storage_url, spec_storage or default_storage_settings())
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ValueError(f"no study {study_name!r} in {storage_url}") from None
    return study.user_attrs["spec"], study.user_attrs.get("spec_name", study_name)


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    """A study as stored (no sampler state needed: for reports)."""
    return optuna.load_study(study_name=study_name, storage=make_storage(storage_url, default_storage_settings()))


def trials(study: optuna.Study, states=None) -> list:
    """The study's trials (frozen), optionally of ``states`` only."""
    return study.get_trials(deepcopy=False, states=states)


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state name (``complete``, ``pruned``, ``running``, ``waiting``, ``fail``)."""
    out: dict[str, int] = {}
    for trial in trials(study):
        out[trial.state.name.lower()] = out.get(trial.state.name.lower(), 0) + 1
    return out


def taken(study: optuna.Study, below: int | None = None) -> int:
    """Trials that count against the budget: finished or still running (numbers below ``below`` only); a
    repeated configuration (answered from its twin, nothing trained) does not count."""
    return sum(
        1
        for t in trials(study, (*FINISHED, TrialState.RUNNING))
        if (below is None or t.number < below) and "duplicate_of" not in t.user_attrs
    )


def is_duplicate(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number`` was a repeated configuration."""
    return any(t.number == number and "duplicate_of" in t.user_attrs for t in trials(study))


def is_queued(trial) -> bool:
    """Whether the trial came from the queue (an enqueued configuration or a retry), not the sampler."""
    attrs = trial.system_attrs
    return "fixed_params" in attrs or "failed_trial" in attrs


def root_number(trial) -> int:
    """The number of the first attempt of a (retried) trial: the name of its folder."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def fail_stale(study: optuna.Study) -> None:
    """Fail (and re-queue) the trials of workers whose heartbeat stopped."""
    optuna.storages.fail_stale_trials(study)


def retry(study: optuna.Study, number: int, max_retry: int | None) -> None:
    """Re-queue failed trial ``number`` with its parameters and folder (a preempted trial resumes)."""
    frozen = next(t for t in trials(study) if t.number == number)
    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, frozen)


def run_one(study: optuna.Study, objective) -> None:
    """One trial through ``study.optimize`` (heartbeat, pruning and failure bookkeeping are Optuna's)."""
    study.optimize(objective, n_trials=1, catch=(OverBudget,))


class OverBudget(Exception):
    """A sampler's proposal that found the budget already taken by trials numbered before it (a race
    between workers): recorded as failed, never trained, never counted."""


def best_trials(study: optuna.Study, k: int) -> list:
    """The best ``k`` complete trials: by the objective (one), or the Pareto front ordered by the first
    objective (several); a repeated configuration counts once (its first trial)."""
    if len(study.directions) == 1:
        done = [
            t
            for t in trials(study, (TrialState.COMPLETE,))
            if t.value is not None and "duplicate_of" not in t.user_attrs
        ]
        sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
        return sorted(done, key=lambda t: sign * t.value)[:k]
    sign = 1 if study.directions[0].name == "MINIMIZE" else -1
    front = sorted(
        (t for t in study.best_trials if "duplicate_of" not in t.user_attrs), key=lambda t: sign * t.values[0]
    )
    return front[:k]


def importance(study: optuna.Study) -> dict[str, float]:
    """Parameter importance (Optuna's default evaluator, PED-ANOVA, which scores what leads to low values:
    a maximised objective is negated) of the first objective; {} when too few trials."""
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
            return dict(optuna.importance.get_param_importances(study, target=lambda t: sign * t.values[0]))
    except (RuntimeError, ValueError, ZeroDivisionError) as err:
        logging.getLogger(__name__).info("no parameter importance: %s", err)
        return {}
