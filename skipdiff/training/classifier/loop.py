"""The classifier training loop (:func:`train_classifier`), in the order of diffusers' training scripts:
accelerator -> data -> model and gates -> optimizer and schedule -> prepare -> resume -> train -> export.

Outputs in ``output_dir``: ``stats.jsonl`` (+ tensorboard), ``metrics.json``, the model (``config.json`` +
``model.safetensors``), ``training_options.json``, ``markov_chain.safetensors`` for Markov gating, and
``checkpoint-{step}`` folders. Everything random after the weight init is a function of (seed, epoch or
step) (:func:`skipdiff.seeding.derived_seed`), so a resumed run replays the same data order and gates.

A step that does not log reads nothing from the device: the fused optimizer skips a non-finite update on
its ``found_inf`` flag, loss and accuracy are summed on the device and read when a record is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...config import to_json
from ...cpu_memory import keep_freed_memory_for_cpu_training
from ...seeding import derived_seed
from ..checkpoints import check_writable, read_state, resolve_checkpoint, save_checkpoint
from ..step import optimizer_step
from ..telemetry import StatsWriter
from .data import ClassifierData, load_classifier_data, model_inputs
from .evaluation import activation_rms, evaluate, gradient_flow
from .gates import BlockGates, gate_kwargs
from .models import build_model
from .options import ClassifierOptions

DATA_STREAM, GATE_STREAM = 0, 1  # derived_seed streams: an epoch's data order, a step's gates
ACTIVATION_PROBE_SIZE = 256  # examples of the train split whose activations are measured at start and end


class Running:
    """Train loss and accuracy summed on the device over the steps since the last read."""

    def __init__(self, device: torch.device):
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.loss = torch.zeros((), dtype=dtype, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.count, self.steps = 0, 0

    def add(self, losses: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += losses.detach().sum().to(self.loss.dtype)
        self.correct += (logits.detach().argmax(-1) == labels).sum()
        self.count += labels.shape[0]
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Mean loss and accuracy (one host read)."""
        loss, correct = torch.stack([self.loss, self.correct.to(self.loss.dtype)]).tolist()
        return {"loss": loss / max(self.count, 1), "accuracy": correct / max(self.count, 1)}


@dataclasses.dataclass
class ClassifierRun:
    """Everything a run's steps share."""

    options: ClassifierOptions
    accelerator: Accelerator
    out: Path
    data: ClassifierData
    model: nn.Module  # prepared (possibly wrapped)
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    gates: BlockGates
    loaders: dict[str, DataLoader]  # train, test, train_eval
    data_generator: torch.Generator
    stats: StatsWriter
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    nonfinite: torch.Tensor | None = None  # non-finite steps skipped so far (device)
    flow_init: dict | None = None  # gradient flow at the first logged step of this run
    flow_last: dict | None = None  # at the last logged step


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, options: ClassifierOptions) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.9; fused, so a non-finite step is skipped on the device
    (:func:`~skipdiff.training.step.optimizer_step`) instead of by a host read."""
    if options.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=options.learning_rate,
            momentum=0.9,
            nesterov=True,
            weight_decay=options.weight_decay,
            fused=True,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay, fused=True
    )


def _loaders(data: ClassifierData, options: ClassifierOptions, generator: torch.Generator) -> dict[str, DataLoader]:
    # The train loader has its own generator, reseeded every epoch (derived_seed): its order does not depend
    # on the global RNG or on how many iterators were made before (a resumed run makes fewer).
    return {
        "train": DataLoader(
            data.train,
            batch_size=options.train_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=data.collate,
            generator=generator,
        ),
        "test": DataLoader(data.test, batch_size=options.eval_batch_size, collate_fn=data.collate),
        "train_eval": DataLoader(data.train, batch_size=options.eval_batch_size, collate_fn=data.collate),
    }


def _setup(options: ClassifierOptions, accelerator: Accelerator | None) -> ClassifierRun:
    """Accelerator, data, model, gates, optimizer, schedule and loaders, prepared; the step resumed from."""
    out = Path(options.output_dir)
    check_writable(out)
    accelerator = accelerator or Accelerator(
        mixed_precision=options.mixed_precision,
        project_dir=str(out),
        log_with=None if options.report_to == "none" else options.report_to,
    )
    set_seed(options.seed)
    data = load_classifier_data(options)
    if len(data.train) < options.train_batch_size:
        raise ValueError(
            f"the train split has {len(data.train)} examples, fewer than --train_batch_size "
            f"{options.train_batch_size} (incomplete batches are dropped)"
        )
    model = build_model(options, data.num_inputs, data.num_labels)
    markov = options.markov_options() if options.gating == "markov" else None
    gates = BlockGates(
        options.gating, getattr(model, "num_blocks", 0), options.gate_keep_prob, options.gate_rescale, markov
    )
    if gates.chain is not None:
        gates.chain.to(accelerator.device)
        accelerator.register_for_checkpointing(gates.chain)
    optimizer = make_optimizer(model, options)
    data_generator = torch.Generator().manual_seed(options.seed)
    loaders = _loaders(data, options, data_generator)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared, strict=True))
    steps_per_epoch = len(loaders["train"])
    total_steps = options.max_train_steps or options.num_epochs * steps_per_epoch
    schedule = get_scheduler(
        options.lr_scheduler, optimizer, num_warmup_steps=options.lr_warmup_steps, num_training_steps=total_steps
    )
    accelerator.register_for_checkpointing(schedule)
    run = ClassifierRun(
        options,
        accelerator,
        out,
        data,
        model,
        accelerator.unwrap_model(model),
        optimizer,
        schedule,
        gates,
        loaders,
        data_generator,
        StatsWriter(accelerator, out),
        steps_per_epoch,
        total_steps,
    )
    run.nonfinite = torch.zeros((), dtype=torch.long, device=accelerator.device)
    return run


def _resume(run: ClassifierRun) -> None:
    """Load the requested checkpoint, if any, and set ``run.step``; a fresh run starts a fresh log."""
    options, accelerator = run.options, run.accelerator
    checkpoint = resolve_checkpoint(options.output_dir, options.resume_from_checkpoint)
    if checkpoint is None:
        if accelerator.is_main_process and run.stats.path.exists():
            run.stats.path.unlink()  # a fresh run in an old folder starts a fresh log
        return
    state = read_state(checkpoint)
    saved, wanted = state.get("architecture", {}), options.architecture()
    differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs requested {wanted.get(k)!r}" for k in differing)
        raise ValueError(f"checkpoint {str(checkpoint)!r} belongs to another run ({details})")
    accelerator.load_state(str(checkpoint))
    run.step = int(state["step"])
    run.stats.truncate_after(run.step)  # the steps after the checkpoint are logged again
    accelerator.print(f"resumed from {checkpoint} at step {run.step}")


def _probe_batch(run: ClassifierRun) -> dict[str, torch.Tensor]:
    """The first examples of the train split, on the device (built directly: no loader, no RNG touched)."""
    rows = [run.data.train[i] for i in range(min(ACTIVATION_PROBE_SIZE, len(run.data.train)))]
    return {k: v.to(run.accelerator.device) for k, v in run.data.collate(rows).items()}


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def _train_step(run: ClassifierRun, batch: dict, generator: torch.Generator, log_now: bool) -> tuple:
    """Forward, backward and update of one batch. Returns per-example losses (B,), logits (B, C), the gradient
    norm before clipping (0-d) and, when ``log_now``, the gradient flow per block (:func:`gradient_flow`, read
    before the update). A non-finite gradient skips the update (counted)."""
    options, accelerator = run.options, run.accelerator
    inputs, labels = model_inputs(batch)
    # One seed per step, the same on every process: rank_share gives each its slice of the global batch.
    generator.manual_seed(derived_seed(options.seed, run.step, GATE_STREAM))
    gates = run.gates.sample(labels.shape[0], generator)  # (B, K) or None
    logits = run.model(**inputs, **gate_kwargs(gates, labels.device)).logits  # (B, C)
    losses = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
    accelerator.backward(losses.mean())
    accelerator.unscale_gradients()  # true gradients for the norms and the clip (fp16 loss scaling)
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)
    finite = torch.isfinite(grad_norm)
    flow = gradient_flow(run.unwrapped) if log_now else None
    if options.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), options.max_grad_norm)
    if accelerator.scaler is None:  # with fp16 loss scaling the scaler skips non-finite steps itself
        run.nonfinite += (~finite).long()
        optimizer_step(run.optimizer, finite)
    else:
        run.optimizer.step()
    run.gates.update(losses.detach(), counted=finite)
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    return losses.detach(), logits.detach(), grad_norm.detach(), flow


def _log(run: ClassifierRun, epoch: int, running: Running, grad_norm: torch.Tensor, flow: dict, seconds: float) -> dict:
    """Write a train record (the loop's one read of its sums); returns it."""
    run.flow_init = run.flow_init or flow
    run.flow_last = flow
    record = {
        "epoch": epoch,
        "train": running.means(),
        "lr": run.schedule.get_last_lr()[0],
        "grad_norm_total": float(grad_norm),
        **flow,
        "num_nonfinite": int(run.nonfinite),
        "seconds_per_step": seconds / running.steps,
    }
    if run.options.gating != "none":
        record["gates"] = run.gates.summary()
    run.stats.write(record, run.step)
    return record


def _train_epochs(run: ClassifierRun, progress) -> tuple[dict[str, float], Running | None]:
    """Every remaining epoch: steps, records, checkpoints, and the test evaluation at each epoch's end.
    Returns the last test metrics and the last epoch's train sums."""
    options, accelerator = run.options, run.accelerator
    num_epochs = math.ceil(run.total_steps / run.steps_per_epoch)
    gate_generator = torch.Generator()
    test_metrics, last_epoch, tick = {}, None, time.perf_counter()
    running = Running(accelerator.device)
    run.model.train()
    for epoch in range(run.step // run.steps_per_epoch, num_epochs):
        run.data_generator.manual_seed(derived_seed(options.seed, epoch, DATA_STREAM))  # this epoch's order
        done = run.step - epoch * run.steps_per_epoch
        loader = accelerator.skip_first_batches(run.loaders["train"], done) if done else run.loaders["train"]
        last_epoch = Running(accelerator.device)
        for batch in loader:
            log_now = run.step == 0 or (run.step + 1) % options.log_every == 0  # step 1, then every log_every
            losses, logits, grad_norm, flow = _train_step(run, batch, gate_generator, log_now)
            run.step += 1
            running.add(losses, logits, batch["labels"])
            last_epoch.add(losses, logits, batch["labels"])
            progress.update(1)
            if log_now:
                now = time.perf_counter()
                record = _log(run, epoch, running, grad_norm, flow, now - tick)
                progress.set_postfix(loss=f"{record['train']['loss']:.4f}", acc=f"{record['train']['accuracy']:.3f}")
                running, tick = Running(accelerator.device), now
            if options.checkpointing_steps and run.step % options.checkpointing_steps == 0:
                save_checkpoint(
                    accelerator,
                    run.out,
                    run.step,
                    {"epoch": epoch, "architecture": options.architecture()},
                    options.checkpoints_total_limit,
                )
            if run.step >= run.total_steps:
                break
        test_metrics = evaluate(run.model, run.loaders["test"], accelerator, run.gates)
        run.stats.write({"epoch": epoch, "test": test_metrics}, run.step)
        if run.step >= run.total_steps:
            break
    return test_metrics, last_epoch


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _save_outputs(run: ClassifierRun, metrics: dict) -> None:
    """The model (config.json + model.safetensors), the chain, metrics.json and training_options.json."""
    if not run.accelerator.is_main_process:
        return
    run.unwrapped.save_pretrained(run.out)
    if run.gates.chain is not None:
        save_file(
            {k: v.contiguous().cpu() for k, v in run.gates.chain.state_dict().items()},
            str(run.out / "markov_chain.safetensors"),
        )
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run.out / "training_options.json").write_text(to_json(run.options))


def _growth(activations: dict[str, float] | None) -> float | None:
    """RMS of the last block's output over the stem's: how much the activations grew through the blocks."""
    if not activations:
        return None
    values = list(activations.values())
    return values[-1] / values[0] if values[0] > 0 else float("inf")


def train_classifier(options: ClassifierOptions, accelerator: Accelerator | None = None) -> dict:
    """Train, evaluate at every epoch end, save; returns the metrics written to ``metrics.json``."""
    options.validate()
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    keep_freed_memory_for_cpu_training()
    run = _setup(options, accelerator)
    _resume(run)
    accelerator = run.accelerator
    if options.report_to != "none":
        config = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in dataclasses.asdict(options).items()
        }
        accelerator.init_trackers("classifier", config=config)
    probe = _probe_batch(run)
    activations = {"start": activation_rms(run.unwrapped, probe)}
    quiet = {} if accelerator.is_main_process else {"disable": True}  # the main process honours TQDM_DISABLE
    progress = tqdm(total=run.total_steps, initial=run.step, desc=f"{options.model} {options.source()}", **quiet)
    start = time.perf_counter()
    test_metrics, last_epoch = _train_epochs(run, progress)
    progress.close()
    train_seconds = time.perf_counter() - start
    activations["end"] = activation_rms(run.unwrapped, probe)
    run.stats.write({"activation_rms": activations}, run.step)

    train_metrics = evaluate(run.model, run.loaders["train_eval"], accelerator, run.gates)
    flow_init, flow_last = run.flow_init, run.flow_last
    metrics = {
        "test_loss": test_metrics.get("loss"),
        "test_accuracy": test_metrics.get("accuracy"),
        "train_loss": train_metrics["loss"],  # eval mode over the whole train split
        "train_accuracy": train_metrics["accuracy"],
        "train_loss_last_epoch": last_epoch.means()["loss"] if last_epoch and last_epoch.count else None,
        "grad_ratio_init": flow_init["grad_ratio_first_last"] if flow_init else None,  # at step 1 of this run
        "grad_ratio_final": flow_last["grad_ratio_first_last"] if flow_last else None,  # last logged step
        "activation_growth_start": _growth(activations["start"]),  # RMS last block / stem, train mode
        "activation_growth_end": _growth(activations["end"]),
        "num_parameters": sum(p.numel() for p in run.unwrapped.parameters()),
        "num_blocks": getattr(run.unwrapped, "num_blocks", None),
        "steps": run.step,
        "epochs": math.ceil(run.total_steps / run.steps_per_epoch),
        "num_nonfinite_steps": int(run.nonfinite),
        "train_seconds": train_seconds,
    }
    if run.gates.chain is not None:
        metrics["markov"] = run.gates.chain.state_summary()
    _save_outputs(run, metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics
