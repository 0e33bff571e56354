"""One trial: the suggested configuration -> a normal run folder -> its objective values.

A training trial is a diffusion run (``skipdiff.training.train_unet``, the code a sweep cell runs) in
``<search>/trials/trial-NNNN/``, followed by ``skipdiff.eval`` into its ``eval/``. With a pruner it reports
the held-out denoising MSE (the objective itself, on the first ``prune.images`` test images, the same
noise every time) at ``prune.steps``; a pruned trial stops there. The folder is named after the trial's
first attempt, so a retried trial (its worker was killed or preempted) resumes from its checkpoint.
An inference trial is ``skipdiff.eval`` on the base's checkpoint with the trial's skips and options.
Every trial folder holds ``trial.json``: number, parameters, options, state and values.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from ..config import from_dict, redact
from ..runfolder import read_json, write_json_atomic
from ..sweep.kinds import _loaded_target, check_fid_samples, evaluate_run
from ..sweep.launch import fresh_accelerate_state
from ..training.options import TrainOptions
from .objectives import OBJECTIVES, model_record, read_objectives
from .space import FixedTrial, Suggestion, first_choices, model_config, num_skips_of, suggest
from .spec import SearchSpec, options_class

TRIAL_FILE = "trial.json"


def trial_folder(out: Path, root: int) -> Path:
    return Path(out) / "trials" / f"trial-{root:04d}"


def num_skips_for(spec: SearchSpec):
    """``model overrides -> number of long skips`` of a trial's UNet (an inference target: loaded once)."""
    if spec.training:
        base_model = spec.base.get("model", "digits")
        return lambda overrides: num_skips_of(model_config(base_model, overrides))

    def of_target(_overrides) -> int:
        # heavy: torch only when an inference target's skips are counted
        from ..skips.router import discover_skips

        return len(discover_skips(_target(spec).unet))

    return of_target


def _target(spec: SearchSpec):
    return _loaded_target(from_dict(options_class("inference"), spec.base))


def trial_options(spec: SearchSpec, suggestion: Suggestion, folder: Path) -> dict:
    """The trial's full options (its kind's dataclass, as a dict), its folder set, validated."""
    values = {**spec.base, **suggestion.options}
    if spec.training:
        if suggestion.model:
            config = model_config(spec.base.get("model", "digits"), suggestion.model)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "unet_config.json"
            write_json_atomic(path, config)
            values["model"] = str(path)
        values["output_dir"] = str(folder)
    else:
        values["out"] = str(folder / "eval")
    options = from_dict(options_class(spec.kind), values)
    return dataclasses.asdict(options)


def check_configuration(spec: SearchSpec, options: dict) -> None:
    """A trial's skip spec (and chain options) must resolve for its model: ``ValueError`` otherwise."""
    if spec.training:
        # heavy: torch, only for a training search's checks
        from ..training.model_source import check_model_options

        check_model_options(from_dict(TrainOptions, options))
    else:
        # heavy: torch, only for an inference search's checks
        from ..skips.router import SkipRouter, discover_skips

        SkipRouter(list(discover_skips(_target(spec).unet)), options["skips"] or "full")


class PruningMonitor:
    """Reports the held-out denoising MSE to the trial at ``steps``; prunes when Optuna says so."""

    def __init__(self, trial, spec: SearchSpec, options: dict):
        self.trial, self.spec = trial, spec
        self.steps = frozenset(spec.prune["steps"])
        self.options = options
        self._batches = None
        self._constrained = False

    def __call__(self, step: int, view) -> None:
        # heavy: torch and optuna, only while a pruned training trial runs
        from ..eval.denoise import denoising_loss_by_bucket
        from ..eval.run import held_out_batches
        from .engine import TrialPruned

        if not self._constrained:  # at the first report: a trial pruned there carries its constraints too
            self._constrained = True
            set_model_constraints(self.trial, self.spec, getattr(view.model, "module", view.model))
        if self._batches is None:
            self._batches, _ = held_out_batches(self.options, 64, limit=self.spec.prune["images"])
        kwargs = None if view.conditioning.kind == "none" else view.conditioning.unet_kwargs
        loss = denoising_loss_by_bucket(
            view.model,
            view.noise_scheduler,
            view.encoder,
            self._batches,
            self.spec.prune["buckets"],
            seed=0,
            unet_kwargs=kwargs,
        )["mean"]
        self.trial.report(loss, step)
        if self.trial.should_prune():
            raise TrialPruned(f"held-out denoising MSE {loss:.5f} at step {step}")


def set_model_constraints(trial, spec: SearchSpec, unet) -> None:
    """The constraints a trial's architecture decides (FLOPs, parameters), set as soon as training starts, so
    that a pruned trial carries them too (the sampler's feasibility then covers every finished trial). The
    FLOPs are counted on a fresh CPU copy of the architecture in eval mode, as after training."""
    # heavy: torch, only while a training trial runs
    from ..skips.unet import SkipUNet2DModel

    keys = [key for key in spec.constraints if OBJECTIVES[key].from_model]
    if not keys:
        return
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    copy = SkipUNet2DModel(**config).eval()
    record = model_record(copy, (config["in_channels"], config["sample_size"], config["sample_size"]))
    for key in keys:
        trial.set_constraint(key, OBJECTIVES[key].read(record) - spec.constraints[key])


def _model_record(folder: Path) -> dict:
    """FLOPs and parameters of a trained trial's UNet (its exported ``unet/``)."""
    # heavy: torch, only while a training trial runs
    from ..skips.unet import SkipUNet2DModel

    unet = SkipUNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    config = unet.config
    return model_record(unet, (config.in_channels, config.sample_size, config.sample_size))


def run_training_trial(trial, spec: SearchSpec, options: dict, folder: Path) -> tuple[dict, dict]:
    """Train (or resume) the trial's run and evaluate it; returns ``(eval.json, model record)``."""
    # heavy: torch, only while a training trial runs
    from ..training.checkpoints import list_checkpoints
    from ..training.unet_trainer import train_unet

    train = dict(options)
    if (folder / "train_metrics.json").is_file():
        pass  # trained by an earlier attempt (killed during its evaluation): evaluate only
    else:
        if list_checkpoints(folder):
            train["resume_from_checkpoint"] = "latest"
        monitor = PruningMonitor(trial, spec, options) if spec.pruned else None
        with fresh_accelerate_state():
            train_unet(from_dict(TrainOptions, train), monitor=monitor)
    evaluation = evaluate_run(folder, spec.eval)
    return evaluation, _model_record(folder)


def run_inference_trial(spec: SearchSpec, options: dict, folder: Path) -> tuple[dict, dict]:
    """``skipdiff.eval`` on the loaded target with the trial's skips; returns ``(eval.json, {})``."""
    # heavy: torch, only while an inference trial runs
    from ..eval.evaluation import evaluate_target

    eval_options = from_dict(options_class("inference"), options)
    return evaluate_target(_target(spec), eval_options, out=folder / "eval"), {}


def configuration_key(suggestion: Suggestion) -> str:
    """What decides a trial's result beyond the base options: its option and model overrides, as JSON."""
    return json.dumps({"options": suggestion.options, "model": suggestion.model}, sort_keys=True)


def make_objective(spec: SearchSpec, out: Path, log=print):
    """The function Optuna calls per trial: suggest, check, run, score, record; see the module docstring."""
    # optuna (~0.3 s) only once a study is opened: the search command line answers --help and bad arguments before it
    from . import engine

    num_skips = num_skips_for(spec)
    budget = spec.budget.get("trials")

    def objective(trial):
        objective.current = trial.number  # the worker re-queues this trial if it is preempted
        frozen = engine.trials(trial.study)
        this = next(t for t in frozen if t.number == trial.number)
        if (
            budget is not None
            and not engine.is_queued(this)
            and engine.taken(trial.study, below=trial.number) >= budget
        ):
            raise engine.OverBudget(f"trial {trial.number}: the budget of {budget} trials is taken")
        root = engine.root_number(this)
        folder = trial_folder(out, root)
        suggestion = suggest(trial, spec.space, num_skips, spec.base)
        configuration = configuration_key(suggestion)
        trial.set_user_attr("configuration", configuration)
        twin = next(
            (t for t in frozen if t.state.name == "COMPLETE" and t.user_attrs.get("configuration") == configuration),
            None,
        )
        if twin is not None:  # e.g. a family without parameters proposed again: the same run, so its values
            trial.set_user_attr("duplicate_of", twin.number)
            log(f"trial {trial.number}: the configuration of trial {twin.number}; its values, nothing trained")
            return twin.values[0] if len(twin.values) == 1 else list(twin.values)
        options = trial_options(spec, suggestion, folder)
        check_configuration(spec, options)
        trial.set_user_attr("folder", str(folder))
        record = {
            "number": trial.number,
            "root": root,
            "params": trial.params,
            "overrides": suggestion.options,
            "model": suggestion.model,
            "options": redact(options),
            "state": "running",
        }
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / TRIAL_FILE, record, default=str)
        start = time.perf_counter()
        try:
            if spec.training:
                evaluation, model = run_training_trial(trial, spec, options, folder)
            else:
                evaluation, model = run_inference_trial(spec, options, folder)
        except engine.TrialPruned as pruned:
            seconds = time.perf_counter() - start
            trial.set_user_attr("seconds", seconds)  # a pruned trial's time counts in the search's cost too
            write_json_atomic(
                folder / TRIAL_FILE,
                {**record, "state": "pruned", "reason": str(pruned), "seconds": seconds},
                default=str,
            )
            raise
        values = read_objectives(spec.objectives, evaluation, model)
        for key, limit in spec.constraints.items():
            trial.set_constraint(key, OBJECTIVES[key].read(model if OBJECTIVES[key].from_model else evaluation) - limit)
        seconds = time.perf_counter() - start
        trial.set_user_attr("seconds", seconds)
        write_json_atomic(
            folder / TRIAL_FILE,
            {
                **record,
                "state": "complete",
                "values": dict(zip(spec.objectives, values, strict=True)),
                "model_record": model,
                "seconds": seconds,
            },
            default=str,
        )
        return values[0] if len(values) == 1 else values

    objective.current = None
    return objective


def read_trial(folder: Path) -> dict | None:
    path = Path(folder) / TRIAL_FILE
    return read_json(path, "trial record") if path.is_file() else None


def configuration_of(spec: SearchSpec, params: dict) -> Suggestion:
    """The configuration a trial with these Optuna ``params`` ran (its option and model overrides), rebuilt
    from the parameters alone, as a search report records them: a configuration can be trained again
    (confirmed elsewhere, carried to another dataset) without the search's run folders. ``ValueError``
    naming a parameter the space needs and ``params`` lacks."""
    return suggest(FixedTrial(params), spec.space, num_skips_for(spec), spec.base)


def example_configurations(spec: SearchSpec) -> dict[str, dict]:
    """One configuration per skip family of the space (its parameters at their first choices or lower
    ends), each checked as a trial would be: a typo in a preset's argument, a spec that does not fit the
    model, or a model that cannot be built fails here, before any study or training."""
    examples = {}
    with tempfile.TemporaryDirectory() as scratch:
        for family in spec.space.families or (None,):
            suggestion = suggest(
                FixedTrial(first_choices(spec.space, family)), spec.space, num_skips_for(spec), spec.base
            )
            options = trial_options(spec, suggestion, Path(scratch) / "trial")
            try:
                check_configuration(spec, options)
            except ValueError as err:
                raise ValueError(f"space (skips {family or 'as in base'}): {err}") from err
            examples[family or "base"] = {"options": suggestion.options, "model": suggestion.model}
        confirmed = (
            {"reference": spec.confirm.get("reference", {}), **spec.confirm.get("also", {})} if spec.confirm else {}
        )
        for label, overrides in confirmed.items():  # a typo here fails now, not after the whole budget
            try:
                check_configuration(
                    spec, trial_options(spec, Suggestion(dict(overrides), {}), Path(scratch) / "confirm")
                )
            except (ValueError, TypeError) as err:
                raise ValueError(f"confirm {'reference' if label == 'reference' else 'also ' + label}: {err}") from err
    if spec.training:  # FID's floor must fit the data: checked now, not after a trial's or a confirmation's training
        check_fid_samples(spec.eval, options, f"search {spec.name}'s trials")
        if spec.confirm:
            check_fid_samples(spec.confirm.get("eval", spec.eval), options, f"search {spec.name}'s confirmation")
    return examples
