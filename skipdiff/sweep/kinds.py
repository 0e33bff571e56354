"""Kinds of sweep cells, in one registry: what a cell's options are, how it trains, how it is evaluated.

A spec's ``kind:`` names one entry of :data:`KINDS`. The loop (:mod:`.runner`) and a cell's state
machine (:mod:`.cells`) ask the kind and never test its name, so a new kind is one subclass of
:class:`CellKind` and one :func:`register_kind` call. A kind without training (``cli_module = None``,
e.g. inference-only cells over a pretrained pipeline) goes straight from ``new`` to its evaluation.

Heavy imports (torch, the training loops, evaluation) happen inside the methods, so that parsing a
spec and ``--help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import closest, from_dict, subset
from ..data_options import DataOptions
from ..eval.options import EvalOptions, resolve_reference
from ..runfolder import safe_name
from ..training.classifier import ClassifierOptions
from ..training.options import TrainOptions
from .record import read_cell
from .skips import check_skip_specs, check_variant_specs, make_inference_variant

if TYPE_CHECKING:
    from .spec import Cell, SweepSpec

Log = Callable[[str], None]


class CellKind:
    """One kind of sweep cell. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    # The command line that trains one cell, run as `accelerate launch -m <cli_module> <options>`
    # (the module's main(argv) -> int); None: the kind has no training step.
    cli_module: ClassVar[str | None] = None
    metrics_file: ClassVar[str] = "metrics.json"  # what training leaves in the cell's folder
    folder_option: ClassVar[str] = "output_dir"  # the option that receives the cell's folder
    set_by_sweep: ClassVar[tuple[str, ...]] = ("output_dir", "resume_from_checkpoint", "dry_run")

    @property
    def trains(self) -> bool:
        """Whether a cell of this kind trains before its evaluation (and can resume from checkpoints)."""
        return self.cli_module is not None

    def options_class(self) -> type:
        """The dataclass of one cell's options (validated with ``from_dict``)."""
        raise NotImplementedError

    def parse_eval(self, raw: Any) -> dict:
        """The spec's ``eval:`` section, checked; kinds without one refuse it."""
        if raw:
            raise ValueError(f"kind {self.name!r} takes no eval: section; remove it")
        return {}

    def parse_variants(self, raw: Any, evaluation: dict) -> dict[str, str]:
        """The spec's ``inference_variants:`` section, checked; kinds without them refuse it."""
        if raw:
            raise ValueError(f"inference_variants need kind: diffusion (this spec has kind {self.name!r})")
        return {}

    def check_cells(self, spec: SweepSpec, cells: list[Cell]) -> None:
        """Checks across the cells before anything runs (``ValueError`` naming the cell)."""

    def train(self, options: dict) -> dict:
        """Train one cell in this process (:mod:`.launch` resets Accelerate's state around it); returns
        its metrics."""
        raise NotImplementedError(f"kind {self.name!r} has no training step")

    def evaluate(self, spec: SweepSpec, folder: Path, log: Log) -> None:
        """Evaluate a trained cell's folder (writing its results there)."""

    def describe(self, spec: SweepSpec) -> list[str]:
        """Extra lines for ``--dry_run`` (evaluation settings, variants)."""
        return []


KINDS: dict[str, CellKind] = {}


def register_kind(kind: CellKind) -> CellKind:
    """Add a kind to :data:`KINDS`; a name registered twice is an error."""
    if kind.name in KINDS:
        raise ValueError(f"sweep cell kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: Any) -> CellKind:
    """The registered kind ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {name!r}")
    return KINDS[name]


# --------------------------------------------------------------------------------------------------
# Diffusion: train a UNet, then skipdiff.eval on it and on its inference variants
# --------------------------------------------------------------------------------------------------

DEFAULT_EVAL = {"denoise_loss": True, "grad_stability": True}
EVAL_SET_BY_SWEEP = ("checkpoint", "out", "compare", "num_threads")
TRAINING_FREE = ("fid", "denoise_loss", "skip_importance")  # metrics an inference variant can have


def eval_api() -> tuple[type, Callable[[Any], dict]]:
    """``(EvalOptions, evaluate)`` from the evaluation library (imported when a cell is evaluated)."""
    # heavy: torch (skipdiff.eval's evaluate) only when a cell is evaluated
    from ..eval import EvalOptions, evaluate

    return EvalOptions, evaluate


def evaluate_run(folder: Path, evaluation: dict) -> dict:
    """``skipdiff.eval`` on a run folder with the spec's ``eval:`` options, results in ``<folder>/eval``."""
    eval_options, evaluate = eval_api()
    return evaluate(from_dict(eval_options, {**evaluation, "checkpoint": str(folder), "out": str(folder / "eval")}))


class DiffusionKind(CellKind):
    """A ``SkipUNet2DModel`` trained by ``skipdiff.cli.train_unet``, evaluated by ``skipdiff.eval``; each
    inference variant is the trained model with other skips, evaluated the same way."""

    name = "diffusion"
    cli_module = "skipdiff.cli.train_unet"
    metrics_file = "train_metrics.json"

    def options_class(self) -> type:
        return TrainOptions

    def parse_eval(self, raw: Any) -> dict:
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"eval must be a mapping, got {raw!r}")
        evaluation = dict(raw or DEFAULT_EVAL)
        for key in sorted(set(evaluation) & set(EVAL_SET_BY_SWEEP)):
            raise ValueError(f"eval option {key!r} is set by the sweep; remove it from the spec")
        return evaluation

    def parse_variants(self, raw: Any, evaluation: dict) -> dict[str, str]:
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"inference_variants must be a mapping, got {raw!r}")
        variants = {str(k): v for k, v in (raw or {}).items()}
        for label, spec in variants.items():
            if not isinstance(spec, str) or not spec:
                raise ValueError(f"inference variant {label!r} must be a skip spec string, got {spec!r}")
            if safe_name(label) != label:
                raise ValueError(f"inference variant label {label!r} must use only letters, digits and . _ + -")
        if variants and not any(evaluation.get(key) for key in TRAINING_FREE):
            raise ValueError(
                "inference_variants need eval: fid, denoise_loss or skip_importance (training-free metrics)"
            )
        return variants

    def check_cells(self, spec: SweepSpec, cells: list[Cell]) -> None:
        eval_options, _ = eval_api()
        for cell in cells:
            try:
                from_dict(eval_options, {**spec.eval_for(cell.axes), "checkpoint": "<cell>"})
            except (ValueError, TypeError) as err:
                raise ValueError(f"eval{' (eval_by, cell ' + cell.name + ')' if spec.eval_by else ''}: {err}") from err
        check_skip_specs(cells)
        check_fid_sample_sizes(spec, cells)
        if spec.inference_variants:
            check_variant_specs({c.options["model"] for c in cells}, spec.inference_variants)

    def train(self, options: dict) -> dict:
        # heavy: torch only when a cell trains
        from ..training.unet_trainer import train_unet

        return train_unet(from_dict(self.options_class(), options))

    def evaluate(self, spec: SweepSpec, folder: Path, log: Log) -> None:
        evaluation = spec.eval_for(read_cell(folder)["axes"])
        evaluate_run(folder, evaluation)
        variant_eval = {**evaluation, "grad_stability": False}  # stability is the training run's
        for label, skips in spec.inference_variants.items():
            log(f"  inference variant {label}: skips {skips}")
            evaluate_run(make_inference_variant(folder, skips, folder / "variants" / label), variant_eval)

    def describe(self, spec: SweepSpec) -> list[str]:
        lines = [f"eval: {json.dumps(spec.eval, sort_keys=True)}"]
        if spec.eval_by:
            lines.append(f"eval_by: {json.dumps(spec.eval_by, sort_keys=True)}")
        if spec.inference_variants:
            lines.append(f"inference variants: {json.dumps(spec.inference_variants, sort_keys=True)}")
        return lines


# --------------------------------------------------------------------------------------------------
# Classifier: the training run evaluates itself (metrics.json)
# --------------------------------------------------------------------------------------------------


class ClassifierKind(CellKind):
    """A classifier baseline trained by ``skipdiff.cli.train_classifier``; its test metrics come with it."""

    name = "classifier"
    cli_module = "skipdiff.cli.train_classifier"
    metrics_file = "metrics.json"

    def options_class(self) -> type:
        return ClassifierOptions

    def parse_eval(self, raw: Any) -> dict:
        if raw:
            raise ValueError("classifier cells are evaluated by their training run (metrics.json): remove eval:")
        return {}

    def train(self, options: dict) -> dict:
        # heavy: torch only when a cell trains
        from ..training.classifier import train_classifier

        return train_classifier(from_dict(self.options_class(), options))


# --------------------------------------------------------------------------------------------------
# Inference: skip specifications on a pretrained pipeline (or a trained run), nothing trained
# --------------------------------------------------------------------------------------------------

_TARGETS: dict[tuple, Any] = {}  # loading options -> the loaded StudyTarget, reused by every cell of a sweep


def check_fid_sample_sizes(spec: SweepSpec, cells: list[Cell]) -> None:
    """:func:`check_fid_samples` for every cell of a diffusion sweep, with its own evaluation (``eval_by``)."""
    splits: dict[str, tuple[int, int]] = {}
    for cell in cells:
        check_fid_samples(spec.eval_for(cell.axes), cell.options, f"cell {cell.name}", splits)


def check_fid_samples(evaluation: dict, options: dict, what: str, splits: dict | None = None) -> None:
    """FID's floor needs ``num_samples`` held-out real images: a run on a built-in or local dataset that holds
    fewer in the split the evaluation would hold out fails here, naming the dataset and its split sizes, not
    after its training (a Hub dataset is not loaded at planning time; an evaluation that names its own
    reference data is checked when it runs). ``splits`` caches split sizes across calls."""
    # heavy: the data layer (🤗 datasets, ~0.7 s) only where real images are read
    from ..data import load_image_splits

    own_reference = any(evaluation.get(k) is not None for k in ("dataset", "dataset_name", "train_data_dir"))
    if not evaluation.get("fid") or own_reference or options.get("dataset_name") is not None:
        return
    splits = {} if splits is None else splits
    data = subset(DataOptions, options)
    key = json.dumps(dataclasses.asdict(data), sort_keys=True, default=str)
    if key not in splits:
        loaded = load_image_splits(data)
        splits[key] = (len(loaded["train"]), len(loaded["test"]))
    train, test = splits[key]
    wanted = int(evaluation.get("num_samples", EvalOptions.num_samples))
    reference = evaluation.get("reference", "auto")
    heldout = test if resolve_reference(reference, test, wanted) == "train" else train
    if heldout < wanted:
        heldout = max(train, test) if reference == "auto" else heldout  # the most that auto could give the floor
        raise ValueError(
            f"{what}: eval num_samples={wanted} needs as many held-out real images for the FID floor, "
            f"but {data.source()} has train {train} / test {test} (reference {reference!r}): lower "
            f"num_samples to at most {heldout} (in a sweep, eval_by can set it for one dataset)"
        )


def _loaded_target(options) -> Any:
    """The study target of ``options`` (EvalOptions), loaded once per process: every cell of an inference
    sweep over one pipeline applies its skips to the same weights, which evaluation restores bit for bit."""
    # heavy: torch and diffusers only when a target is loaded
    from ..targets import load_target

    key = (
        options.checkpoint,
        options.subfolder,
        options.revision,
        options.variant,
        options.torch_dtype,
        options.no_ema,
        options.cache_dir,
    )
    if key not in _TARGETS:
        _TARGETS.clear()  # one pipeline in memory at a time (Stable Diffusion is gigabytes)
        _TARGETS[key] = load_target(
            options.checkpoint,
            subfolder=options.subfolder,
            revision=options.revision,
            variant=options.variant,
            torch_dtype=options.torch_dtype,
            use_ema=not options.no_ema,
            cache_dir=options.cache_dir,
        )
    return _TARGETS[key]


def check_spec_names(spec: str, cell: str) -> None:
    """Every mode or preset named in a skip spec string must exist (the check that needs no model)."""
    # heavy: torch (the gate registry) only to check a spec's names: the sweep command line answers --help before it
    from ..skips.spec import GATES, PRESETS

    for entry in spec.split(","):
        name = entry.strip().split(":")[0]
        if name not in GATES and name not in PRESETS:
            raise ValueError(f"cell {cell!r}: unknown skip mode or preset {name!r}{closest(name, [*GATES, *PRESETS])}")


def check_inference_skip_specs(cells: list[Cell], options) -> None:
    """Every cell's skip spec must resolve on the target's UNet (loaded once, as the cells will use it), so a
    typo such as ``zeor`` is refused before the first cell runs (and by ``--dry_run``), naming the cell. A
    Hub target is not downloaded for the check: its specs' mode and preset names are checked instead."""
    # heavy: torch, only to check an inference sweep's skip specs against its target
    from ..skips.router import SkipRouter, discover_skips

    specs = {c.options.get("skips") for c in cells} - {None, ""}
    if not specs:
        return
    if not Path(options.checkpoint).exists():  # a Hub id: check the names without downloading the pipeline
        for cell in (c for c in cells if c.options.get("skips")):
            check_spec_names(cell.options["skips"], cell.name)
        return
    skips = list(discover_skips(_loaded_target(options).unet))
    for cell in (c for c in cells if c.options.get("skips")):
        try:
            SkipRouter(skips, cell.options["skips"])
        except ValueError as err:
            raise ValueError(f"cell {cell.name!r}: {err}") from err


class InferenceKind(CellKind):
    """``skipdiff.eval`` on one pretrained pipeline (or run folder: ``checkpoint`` in ``base``) with each
    cell's skip specification (and any other evaluation option of the grid), nothing trained. A cell's
    options are :class:`skipdiff.eval.EvalOptions`; its sampling seeds (``seeds``) are shared by every cell,
    so that rows are compared on the same noise (the report pairs them by sampling seed)."""

    name = "inference"
    cli_module = None
    folder_option = "out"
    set_by_sweep = ("out", "compare", "dry_run")

    def options_class(self) -> type:
        return EvalOptions

    def check_cells(self, spec: SweepSpec, cells: list[Cell]) -> None:
        missing = [c.name for c in cells if not c.options.get("checkpoint")]
        if missing:
            raise ValueError(f"inference cells need a checkpoint (a pipeline folder or Hub id) in base: {missing[:3]}")
        seeds = {tuple(c.options["seeds"]) for c in cells}
        if len(seeds) > 1:
            raise ValueError(
                f"every inference cell must use the same sampling seeds (the rows are paired by them), got {sorted(seeds)}"
            )
        check_inference_skip_specs(cells, from_dict(self.options_class(), cells[0].options))

    def evaluate(self, spec: SweepSpec, folder: Path, log: Log) -> None:
        # heavy: torch only when a cell is evaluated
        from ..eval.evaluation import evaluate_target

        options = from_dict(self.options_class(), {**read_cell(folder)["options"], "out": str(folder / "eval")})
        log(f"  skips {options.skips or 'as trained'} on {options.checkpoint}")
        evaluate_target(_loaded_target(options), options, out=folder / "eval")

    def describe(self, spec: SweepSpec) -> list[str]:
        return ["no training: each cell is skipdiff.eval on the base's checkpoint with the cell's options"]


register_kind(DiffusionKind())
register_kind(ClassifierKind())
register_kind(InferenceKind())
