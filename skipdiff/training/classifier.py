"""Classifier baselines on shared datasets from different fields: options and the training loop.

One loop trains any of three models on any built-in dataset (or a Hub/folder image set):

* ``skipresnet``: :class:`~skipdiff.classifiers.SkipResNetForImageClassification` (images),
* ``mlp``: :class:`~skipdiff.classifiers.ResidualMLPForClassification` (tabular rows),
* ``reference``: transformers' ``ResNetForImageClassification`` (:func:`~skipdiff.classifiers.reference_resnet`).

The ablation (depth, widths, ``skip_connections``, ``batch_norm``, ``gate_target``) goes into the
model's config and round-trips through ``save_pretrained``; the run's settings go to
``training_options.json``. Block gating (``--gating bernoulli``: stochastic depth, Huang et al. 2016;
``--gating markov``: the :class:`~skipdiff.markov.MarkovChain` the UNet's skips use, learning from
per-example losses) reaches the model only through its ``block_gates`` argument.

Outputs in ``output_dir``: ``stats.jsonl`` (+ tensorboard), ``metrics.json``, the model
(``config.json`` + ``model.safetensors``), ``training_options.json``, ``markov_chain.safetensors``
for Markov gating, and ``checkpoint-{step}`` folders.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..classifiers import (
    ResidualMLPConfig,
    ResidualMLPForClassification,
    SkipResNetConfig,
    SkipResNetForImageClassification,
    first_last_grad_ratio,
    grad_norms_per_block,
    reference_resnet,
)
from ..config import option, parse_key_values, subset, to_json
from ..data import (
    collate_images,
    dataset_channels,
    image_transform,
    load_image_splits,
    load_tabular_splits,
    num_classes,
    with_pixel_values,
)
from ..data_options import DataOptions
from ..markov import MarkovChain, check_options
from .checkpoints import check_writable, read_state, resolve_checkpoint, save_checkpoint
from .telemetry import StatsWriter

GATINGS = ("none", "bernoulli", "markov")
GATE_TARGETS = ("residual", "skip")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULERS = ("constant", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")


@dataclasses.dataclass
class ClassifierOptions(DataOptions):
    # ---- data: every field of skipdiff.data_options.DataOptions ----------------------------------------
    # ---- model -----------------------------------------------------------------------------------
    model: str = option(
        "skipresnet",
        "skipresnet / reference (images) or mlp (tabular)",
        choices=("skipresnet", "mlp", "reference"),
    )
    depth: int = option(2, "residual blocks per stage (skipresnet, reference) or in all (mlp)")
    widths: list[int] = option([16, 32, 64], "channels of each stage (skipresnet, reference)")
    hidden_size: int = option(64, "width of the skipresnet's FC head / of every mlp layer")
    skip_connections: bool = option(True, "residual shortcuts; --no-skip_connections gives the plain network")
    batch_norm: bool = option(
        True, "BatchNorm after every conv/linear layer (--no-batch_norm: none, biased layers)"
    )
    gating: str = option(
        "none",
        "per-example block gates: none, bernoulli (stochastic depth) or markov (MarkovChain)",
        choices=GATINGS,
    )
    gate_target: str = option(
        "residual", "what a gate multiplies: the residual branch or the skip", choices=GATE_TARGETS
    )
    gate_keep_prob: float = option(0.8, "--gating bernoulli: probability that a block's gate is open")
    gate_rescale: bool = option(
        True,
        "divide open gates by their keep probability in training (inverted dropout), so eval uses open gates",
    )
    markov: str = option(
        "", "--gating markov: MarkovChain options, e.g. 'p_init=0.8,warmup_steps=50,min_count=16,cost=0.1'"
    )
    # ---- optimisation ----------------------------------------------------------------------------
    optimizer: str = option("adamw", "adamw, or sgd with Nesterov momentum 0.9", choices=OPTIMIZERS)
    learning_rate: float = option(1e-3, "peak learning rate")
    lr_scheduler: str = option(
        "cosine", "learning-rate schedule (cosine decays to 0 at the last step)", choices=LR_SCHEDULERS
    )
    weight_decay: float = option(1e-4, "decoupled (AdamW) or L2 (SGD) weight decay")
    max_grad_norm: float = option(
        0.0, "gradient clipping norm (0: none, so vanishing/exploding gradients show)"
    )
    train_batch_size: int = option(
        64, "batch size per process (the last incomplete batch of an epoch is dropped)"
    )
    eval_batch_size: int = option(256, "batch size for test and train-set evaluation")
    num_epochs: int | None = option(10, "epochs (ignored when --max_train_steps is given)")
    max_train_steps: int | None = option(None, "optimizer steps; overrides --num_epochs")
    seed: int = option(
        0, "seed of weights, data order and gates: the same seed gives the same loss curve on CPU"
    )
    num_threads: int | None = option(None, "torch CPU threads per process (default: torch's choice)")
    mixed_precision: str | None = option(None, "no, fp16 or bf16 (default: the accelerate config's)")
    # ---- outputs, logging, checkpoints -----------------------------------------------------------
    output_dir: str = option("runs/classifier-digits", "the run's folder: model, logs, metrics, checkpoints")
    log_every: int = option(10, "steps between stats.jsonl/tensorboard records (step 1 is always logged)")
    report_to: str = option("tensorboard", "accelerate tracker: tensorboard or none", choices=REPORT_TO)
    checkpointing_steps: int = option(0, "steps between checkpoints (0: none)")
    checkpoints_total_limit: int | None = option(2, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from")
    dry_run: bool = option(False, "print the resolved options and exit")

    def markov_options(self) -> dict:
        return parse_key_values(self.markov, "--markov")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value (called by ``parse_args``/``from_dict``)."""
        super().validate()
        positive = ("depth", "hidden_size", "resolution", "train_batch_size", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {name}={getattr(self, name)}")
        for name in ("num_epochs", "max_train_steps", "num_threads", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {name}={value}")
        if self.num_epochs is None and self.max_train_steps is None:
            raise ValueError("give --num_epochs or --max_train_steps")
        if self.checkpointing_steps < 0:
            raise ValueError(f"--checkpointing_steps must be >= 0, got {self.checkpointing_steps}")
        if not self.widths or any(width < 1 for width in self.widths):
            raise ValueError(f"--widths must be one or more integers >= 1, got {self.widths}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
                raise ValueError(f"--{name} must be a finite number >= 0 (learning_rate > 0), got {value}")
        if not 0.0 < self.gate_keep_prob <= 1.0:
            raise ValueError(f"--gate_keep_prob must lie in (0, 1], got {self.gate_keep_prob}")
        for name, allowed in (("model", tuple(MODELS)), ("gating", GATINGS), ("gate_target", GATE_TARGETS),
                              ("optimizer", OPTIMIZERS), ("lr_scheduler", LR_SCHEDULERS), ("report_to", REPORT_TO)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"--mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        self._validate_dataset_and_model()
        self._validate_gating()

    def _validate_dataset_and_model(self) -> None:
        takes = MODEL_KINDS[self.model]
        if takes != self.kind:
            fitting = sorted(name for name, kind in MODEL_KINDS.items() if kind == self.kind)
            source = self.dataset_name or self.train_data_dir or self.dataset
            raise ValueError(
                f"--model {self.model} takes {takes} data, but dataset {source!r} is {self.kind}; "
                f"use --model {' or '.join(fitting)}"
            )
        if self.model == "reference" and not (self.skip_connections and self.batch_norm):
            raise ValueError(
                "--model reference is transformers' ResNet, always with skips and BatchNorm; "
                "use --model skipresnet for --no-skip_connections / --no-batch_norm"
            )

    def _validate_gating(self) -> None:
        if self.gating != "none" and self.model == "reference":
            raise ValueError(
                f"--gating {self.gating} needs block_gates: use --model skipresnet or mlp, not reference"
            )
        if self.gating != "none" and self.gate_target == "skip" and not self.skip_connections:
            raise ValueError(
                "--gate_target skip needs skips to gate; it cannot go with --no-skip_connections"
            )
        if self.markov and self.gating != "markov":
            raise ValueError(
                f"--markov {self.markov!r} is only used with --gating markov, got --gating {self.gating}"
            )
        if self.gating == "markov":
            check_options(self.markov_options())


# --------------------------------------------------------------------------------------------------
# Models: one line each (every builder gets the options and the data's shapes)
# --------------------------------------------------------------------------------------------------

MODEL_KINDS = {"skipresnet": "image", "mlp": "tabular", "reference": "image"}

MODELS: dict[str, Callable[[ClassifierOptions, int, int], nn.Module]] = {
    "skipresnet": lambda o, inputs, labels: SkipResNetForImageClassification(SkipResNetConfig(
        num_labels=labels, num_channels=inputs, widths=list(o.widths), depth=o.depth, hidden_size=o.hidden_size,
        skip_connections=o.skip_connections, batch_norm=o.batch_norm, gate_target=o.gate_target)),
    "mlp": lambda o, inputs, labels: ResidualMLPForClassification(ResidualMLPConfig(
        num_labels=labels, num_features=inputs, width=o.hidden_size, depth=o.depth,
        skip_connections=o.skip_connections, batch_norm=o.batch_norm, gate_target=o.gate_target)),
    "reference": lambda o, inputs, labels: reference_resnet(labels, inputs, tuple(o.widths), o.depth),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClassifierData:
    train: object  # a torch-indexable dataset of rows
    test: object
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    num_inputs: int  # image channels or tabular features
    num_labels: int


def collate_features(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows ``{"features": [...], "label": int}`` -> ``input_features`` (B, F) and ``labels`` (B,)."""
    return {
        "input_features": torch.tensor([r["features"] for r in rows], dtype=torch.float32),
        "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
    }


def load_classifier_data(options: ClassifierOptions) -> ClassifierData:
    """Train/test splits with the collate function and the shapes the model needs."""
    if options.kind == "tabular":
        splits = load_tabular_splits(subset(DataOptions, options))
        return ClassifierData(splits["train"], splits["test"], collate_features,
                              len(splits["train"][0]["features"]), num_classes(splits))  # fmt: skip
    splits = load_image_splits(subset(DataOptions, options))
    labels = num_classes(splits)
    if labels is None:
        raise ValueError(f"a classifier needs labels: the dataset has no {options.label_column!r} column")
    channels = dataset_channels(splits, options.image_channels)
    transform = image_transform(options.resolution, channels)
    train, test = (with_pixel_values(splits[name], transform) for name in ("train", "test"))
    return ClassifierData(train, test, collate_images, channels, labels)


def _model_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs without labels, labels (B,))."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


# --------------------------------------------------------------------------------------------------
# Block gates
# --------------------------------------------------------------------------------------------------


class BlockGates:
    """Per-example gates (B, num_blocks) of the residual blocks, passed as ``block_gates``.

    ``bernoulli``: every gate open independently with ``keep_prob`` (stochastic depth).
    ``markov``: a path of the :class:`MarkovChain` per example, the chain learning from the per-example
    losses (:meth:`update`). With ``rescale`` an open gate is ``1 / P(open)`` (the marginal for Markov),
    so E[gate] = 1 and evaluation runs with every gate open; without it, evaluation uses soft gates
    ``P(open)``.
    """

    def __init__(self, kind: str, num_blocks: int, keep_prob: float, rescale: bool, markov: dict | None):
        self.kind, self.num_blocks, self.keep_prob, self.rescale = kind, num_blocks, keep_prob, rescale
        self.chain = MarkovChain.from_options(num_blocks, markov) if kind == "markov" else None

    def keep_probabilities(self) -> torch.Tensor:
        """P(gate k open), shape (K,)."""
        if self.chain is not None:
            return self.chain.marginals().detach().float().cpu()
        return torch.full((self.num_blocks,), float(self.keep_prob))

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(0/1 path (B, K) for the chain's update, gates (B, K) for the model); (None, None) for ``none``."""
        if self.kind == "none":
            return None, None
        keep = self.keep_probabilities()  # (K,)
        if self.chain is not None:
            path = self.chain.sample(batch_size, generator).float().cpu()  # (B, K) 0/1
        else:
            path = (torch.rand(batch_size, self.num_blocks, generator=generator) < keep).float()  # (B, K)
        gates = path / keep.clamp_min(1e-6) if self.rescale else path  # (B, K)
        return path, gates

    def eval_gates(self, batch_size: int) -> torch.Tensor | None:
        """Gates for evaluation: None (every gate open) or the soft gates P(open), (B, K)."""
        if self.kind == "none" or self.rescale:
            return None
        return self.keep_probabilities().expand(batch_size, -1)

    def update(self, path: torch.Tensor | None, losses: torch.Tensor) -> None:
        """Feed the chain the batch's paths and per-example losses (B,) (a no-op without a chain)."""
        if self.chain is not None:
            self.chain.update(path.to(losses.device), losses)

    def summary(self) -> dict:
        """The gates' state for stats.jsonl: keep probability per block, and the chain's learning state."""
        record = {"keep_prob": {f"blocks.{k}": p for k, p in enumerate(self.keep_probabilities().tolist())}}
        if self.chain is not None:
            record["markov_num_updates"] = int(self.chain.num_updates)
            record["markov_learning"] = int(self.chain.num_updates) > self.chain.warmup_steps
        return record


def _gate_kwargs(gates: torch.Tensor | None, device: torch.device) -> dict:
    return {} if gates is None else {"block_gates": gates.to(device)}


def _derived_seed(seed: int, index: int, stream: int) -> int:
    """A seed for one epoch's data order (stream 0) or one step's gates (stream 1 + rank).

    Everything random after the weight init is a function of (seed, epoch or step, rank), so a resumed
    run replays the same data order and gates; different seeds never share a data order.
    """
    return ((seed * 1_000_003 + index) * 4099 + stream) % (2**63)


# --------------------------------------------------------------------------------------------------
# Evaluation and gradient flow
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, gates: BlockGates) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a loader (eval mode, gathered over processes)."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in loader:
        inputs, labels = _model_inputs(batch)
        logits = model(**inputs, **_gate_kwargs(gates.eval_gates(labels.shape[0]), labels.device)).logits
        logits, labels = accelerator.gather_for_metrics((logits, labels))  # (N, C), (N,)
        total_loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += labels.shape[0]
    model.train(was_training)
    return {"loss": total_loss / count, "accuracy": correct / count}


def gradient_flow(model: nn.Module) -> dict:
    """Gradient norm per unit (stem, blocks.0..N-1, head) and the first-to-last block ratio."""
    norms = grad_norms_per_block(model)
    try:
        ratio = first_last_grad_ratio(model)
    except ValueError:  # the last block got no gradient (e.g. gated off for the whole batch)
        ratio = float("nan")
    return {"grad_norm": norms, "grad_ratio_first_last": ratio}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _architecture(options: ClassifierOptions) -> dict:
    """What a checkpoint must match to be resumed by this run."""
    names = ("dataset", "dataset_name", "train_data_dir", "resolution", "model", "depth", "widths", "hidden_size",
             "skip_connections", "batch_norm", "gating", "gate_target", "markov")  # fmt: skip
    return {name: getattr(options, name) for name in names}


def _resume(accelerator: Accelerator, options: ClassifierOptions) -> int:
    """Load the requested checkpoint, if any; returns the step to continue from (0 for a fresh run)."""
    checkpoint = resolve_checkpoint(options.output_dir, options.resume_from_checkpoint)
    if checkpoint is None:
        return 0
    state = read_state(checkpoint)
    saved, wanted = state.get("architecture", {}), _architecture(options)
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        details = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs requested {wanted.get(k)!r}" for k in differing
        )
        raise ValueError(f"checkpoint {str(checkpoint)!r} belongs to another run ({details})")
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return int(state["step"])


def _optimizer(model: nn.Module, options: ClassifierOptions) -> torch.optim.Optimizer:
    if options.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=options.learning_rate, momentum=0.9, nesterov=True,
                               weight_decay=options.weight_decay)  # fmt: skip
    return torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)


def _schedule(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


class _Running:
    """Train loss and accuracy summed over the steps since the last record."""

    def __init__(self):
        self.loss, self.correct, self.count, self.steps = 0.0, 0, 0, 0

    def add(self, losses: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += float(losses.sum())
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.count += labels.shape[0]
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {"loss": self.loss / max(self.count, 1), "accuracy": self.correct / max(self.count, 1)}


def train_classifier(options: ClassifierOptions, accelerator: Accelerator | None = None) -> dict:
    """Train, evaluate at every epoch end, save; returns the metrics written to ``metrics.json``."""
    options.validate()
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    out = Path(options.output_dir)
    check_writable(out)
    accelerator = accelerator or Accelerator(mixed_precision=options.mixed_precision, project_dir=str(out),
                                             log_with=None if options.report_to == "none" else options.report_to)  # fmt: skip
    set_seed(options.seed)

    # ---- data and model --------------------------------------------------------------------------
    data = load_classifier_data(options)
    model = MODELS[options.model](options, data.num_inputs, data.num_labels)
    num_parameters = sum(p.numel() for p in model.parameters())
    num_blocks = getattr(model, "num_blocks", None)
    gates = _block_gates(options, num_blocks or 0, accelerator)

    # ---- optimizer, data loaders, prepare --------------------------------------------------------
    optimizer = _optimizer(model, options)
    data_generator = torch.Generator().manual_seed(options.seed)
    train_loader, test_loader, train_eval_loader = _data_loaders(options, data, data_generator)
    model, optimizer, train_loader, test_loader, train_eval_loader = accelerator.prepare(
        model, optimizer, train_loader, test_loader, train_eval_loader
    )
    steps_per_epoch = len(train_loader)
    total_steps = options.max_train_steps or options.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    schedule = _schedule(optimizer, options.lr_scheduler, total_steps)
    accelerator.register_for_checkpointing(schedule)

    step = _resume(accelerator, options)
    stats = _start_logging(accelerator, options, out, step)

    # ---- train -----------------------------------------------------------------------------------
    unwrapped = accelerator.unwrap_model(model)
    running, nonfinite, flow_init, flow_last, last_epoch_loss = _Running(), 0, None, None, _Running()
    test_metrics: dict[str, float] = {}
    guard = accelerator.scaler is None  # with fp16 loss scaling the scaler skips non-finite steps itself
    quiet = {} if accelerator.is_main_process else {"disable": True}  # the main process honours TQDM_DISABLE
    progress = tqdm(total=total_steps, initial=step, desc=f"{options.model} {options.dataset_name or options.dataset}",
                    **quiet)  # fmt: skip
    gate_generator = torch.Generator()
    start = time.perf_counter()
    tick = start
    model.train()
    for epoch in range(step // steps_per_epoch, num_epochs):
        data_generator.manual_seed(_derived_seed(options.seed, epoch, 0))  # data order of this epoch
        done_in_epoch = step - epoch * steps_per_epoch
        loader = (
            accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
        )
        last_epoch_loss = _Running()
        for batch in loader:
            inputs, labels = _model_inputs(batch)
            gate_generator.manual_seed(_derived_seed(options.seed, step, 1 + accelerator.process_index))
            path, block_gates = gates.sample(labels.shape[0], gate_generator)
            logits = model(**inputs, **_gate_kwargs(block_gates, labels.device)).logits  # (B, C)
            losses = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
            accelerator.backward(losses.mean())
            gates.update(path, losses.detach())
            step += 1
            log_now = step == 1 or step % options.log_every == 0
            grad_norm, flow, updated = _update(accelerator, model, optimizer, schedule, options.max_grad_norm, guard,
                                               unwrapped if log_now else None)  # fmt: skip
            nonfinite += int(not updated)  # guard: a non-finite loss or gradient skips the update (counted, logged)
            running.add(losses.detach(), logits.detach(), labels)
            last_epoch_loss.add(losses.detach(), logits.detach(), labels)
            progress.update(1)
            if flow is not None:
                flow_init = flow_init or flow
                flow_last = flow
                now = time.perf_counter()
                record = {"epoch": epoch, "train": running.means(), "lr": schedule.get_last_lr()[0],
                          "grad_norm_total": grad_norm, **flow, "num_nonfinite": nonfinite,
                          "seconds_per_step": (now - tick) / running.steps}  # fmt: skip
                if options.gating != "none":
                    record["gates"] = gates.summary()
                stats.write(record, step)
                progress.set_postfix(loss=f"{record['train']['loss']:.4f}", acc=f"{record['train']['accuracy']:.3f}")
                running, tick = _Running(), now
            if options.checkpointing_steps and step % options.checkpointing_steps == 0:
                save_checkpoint(accelerator, out, step, {"epoch": epoch, "architecture": _architecture(options)},
                                options.checkpoints_total_limit)  # fmt: skip
            if step >= total_steps:
                break
        test_metrics = evaluate(model, test_loader, accelerator, gates)
        stats.write({"epoch": epoch, "test": test_metrics}, step)
        if step >= total_steps:
            break
    progress.close()
    train_seconds = time.perf_counter() - start

    # ---- final metrics and outputs ---------------------------------------------------------------
    loop = {"test": test_metrics, "last_epoch": last_epoch_loss, "flow_init": flow_init, "flow_last": flow_last,
            "steps": step, "epochs": num_epochs, "nonfinite": nonfinite, "seconds": train_seconds}  # fmt: skip
    return _finish(options, accelerator, model, gates, train_eval_loader, loop, num_parameters, num_blocks)


def _data_loaders(
    options: ClassifierOptions, data: ClassifierData, generator: torch.Generator
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Shuffled train batches (order drawn from ``generator``; the last incomplete batch dropped), and
    test and train-split batches for evaluation."""
    if len(data.train) < options.train_batch_size:
        raise ValueError(
            f"the train split has {len(data.train)} examples, fewer than --train_batch_size "
            f"{options.train_batch_size} (incomplete batches are dropped)"
        )
    train = DataLoader(data.train, batch_size=options.train_batch_size, shuffle=True, drop_last=True,
                       collate_fn=data.collate, generator=generator)  # fmt: skip
    test = DataLoader(data.test, batch_size=options.eval_batch_size, collate_fn=data.collate)
    train_eval = DataLoader(data.train, batch_size=options.eval_batch_size, collate_fn=data.collate)
    return train, test, train_eval


def _block_gates(options: ClassifierOptions, num_blocks: int, accelerator: Accelerator) -> BlockGates:
    """The run's block gates; a Markov chain joins the accelerator's checkpoints."""
    markov = options.markov_options() if options.gating == "markov" else None
    gates = BlockGates(options.gating, num_blocks, options.gate_keep_prob, options.gate_rescale, markov)
    if gates.chain is not None:
        gates.chain.to(accelerator.device)
        accelerator.register_for_checkpointing(gates.chain)
    return gates


def _start_logging(accelerator: Accelerator, options: ClassifierOptions, out: Path, step: int) -> StatsWriter:
    """stats.jsonl (a fresh run in an old folder starts a fresh log) and the tracker."""
    stats = StatsWriter(accelerator, out)
    if accelerator.is_main_process and step == 0 and stats.path.exists():
        stats.path.unlink()
    if options.report_to != "none":
        config = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in dataclasses.asdict(options).items()
        }
        accelerator.init_trackers("classifier", config=config)
    return stats


def _update(
    accelerator: Accelerator, model: nn.Module, optimizer, schedule, max_grad_norm: float, guard: bool,
    flow_of: nn.Module | None,
) -> tuple[float, dict | None, bool]:
    """One optimizer update after ``backward``: (total grad norm, gradient flow of ``flow_of`` before any
    clipping (None when not asked), whether the update was applied). With ``guard``, a non-finite
    gradient skips the update; the schedule steps either way."""
    accelerator.unscale_gradients()  # true gradients for the norms and the clip (fp16 loss scaling)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    flow = gradient_flow(flow_of) if flow_of is not None else None
    updated = not (guard and not math.isfinite(grad_norm))
    if updated:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, flow, updated


def _finish(
    options: ClassifierOptions, accelerator: Accelerator, model: nn.Module, gates: BlockGates, train_eval_loader,
    loop: dict, num_parameters: int, num_blocks: int | None,
) -> dict:
    """Final metrics (``loop`` holds what the training loop measured); save the model, the chain,
    metrics.json and training_options.json; end the run."""
    out = Path(options.output_dir)
    train_metrics = evaluate(model, train_eval_loader, accelerator, gates)
    last_epoch, flow_init, flow_last = loop["last_epoch"], loop["flow_init"], loop["flow_last"]
    metrics = {
        "test_loss": loop["test"].get("loss"),
        "test_accuracy": loop["test"].get("accuracy"),
        "train_loss": train_metrics["loss"],  # eval mode over the whole train split
        "train_accuracy": train_metrics["accuracy"],
        "train_loss_last_epoch": last_epoch.means()["loss"] if last_epoch.count else None,
        "grad_ratio_init": flow_init["grad_ratio_first_last"] if flow_init else None,  # at step 1 of this run
        "grad_ratio_final": flow_last["grad_ratio_first_last"] if flow_last else None,  # last logged step
        "num_parameters": num_parameters,
        "num_blocks": num_blocks,
        "steps": loop["steps"],
        "epochs": loop["epochs"],
        "num_nonfinite_steps": loop["nonfinite"],
        "train_seconds": loop["seconds"],
    }
    if gates.chain is not None:
        metrics["markov"] = gates.chain.state_summary()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)  # config.json + model.safetensors
        if gates.chain is not None:
            save_file({k: v.contiguous().cpu() for k, v in gates.chain.state_dict().items()},
                      str(out / "markov_chain.safetensors"))  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "training_options.json").write_text(to_json(options))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics
