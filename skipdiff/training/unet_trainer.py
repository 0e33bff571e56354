"""The diffusion training loop behind ``train_scripts/train_unet.py``: ``train_unet(options)`` (its one command
line is :mod:`skipdiff.cli.train_unet`).

Order, as in diffusers' ``train_unconditional.py``: output folder -> accelerator -> data and encoder ->
model -> noise scheduler -> optimizer -> loader -> prepare -> resume -> loop -> export. Every option, with
its default, is in :mod:`skipdiff.training.options` (``--help``). Each step runs without reading the
device (:mod:`skipdiff.training.step`); bookkeeping reaches the host once per ``--log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import redact, to_json
from ..encoders import batch_latents
from ..gradients import grad_norms_by_block
from ..runfolder import OPTIONS_FILE, locked, read_stats, write_json_atomic, write_text_atomic
from ..sampling import default_guidance_scale
from ..skips.adapters import ARTEFACT_FOLDER, save_skip_gates
from ..skips.router import format_skip_table
from ..skips.unet import SkipUNet2DModel
from . import checkpoints, hub
from .model_source import ModelSource, check_model_options, trainable_parameters
from .options import TrainOptions
from .runtime import (
    TrainingData,
    check_geometry,
    load_model_source,
    load_training_data,
    make_accelerator,
    make_ema,
    make_optimizer,
    make_pipeline,
    sample_grid,
    save_outputs,
    setup_backends,
    text_sample_grid,
    train_loader,
    validation_cost,
    validation_images,
    validation_line,
)
from .startup import StopRequest, TrainingStopped, is_main_process, prepare_output_dir, resume_checkpoint
from .step import all_finite, batch_loss, draw_noise, gradient_norm, optimizer_step
from .telemetry import StatsWriter, WindowStats

__all__ = ["MonitorView", "TrainingMonitor", "TrainingStopped", "train_unet"]

NOISE_KEYS = ("num_train_timesteps", "beta_schedule", "prediction_type", "clip_sample")


def train_unet(options: TrainOptions, monitor: TrainingMonitor | None = None) -> dict:
    """Train a ``SkipUNet2DModel`` as the options say; returns the final metrics.

    ``monitor`` (one process only) is called after the optimizer steps it lists, with the EMA weights in
    place (what evaluation scores); it may raise to stop the run there, e.g. a search's pruned trial."""
    if monitor is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a training monitor (a search trial's pruning) runs in one process only")
    setup_backends(options)
    check_model_options(options)  # a bad --skips or --markov fails now, not after the VAE stage
    check_geometry(options)  # as does a resolution the VAE or the UNet cannot halve evenly
    # Before the output folder is made or emptied: an offline or unwritable Hub repo leaves nothing behind.
    repo_id = hub.prepare_repo_if_asked(options.hub, is_main_process())
    output_dir = prepare_output_dir(options.run)
    resume_from = resume_checkpoint(options.run)
    with locked(output_dir, enabled=is_main_process()), StopRequest() as stop:
        accelerator = make_accelerator(options.loop, options.run)
        set_seed(options.seed)

        # ---- data, encoder, model, noise scheduler, optimizer, loader -----------------------------
        data = load_training_data(options.data, options.class_conditional)
        source = load_model_source(options, accelerator, data)
        ema = make_ema(options.ema, source.unet)
        learning_rate = options.effective_learning_rate(accelerator.num_processes)
        optimizer = make_optimizer(options.optim, source.unet, learning_rate)
        loader = train_loader(options, data.splits["train"], source.encoder, data.channels)
        run = _prepare(options, accelerator, source, ema, optimizer, loader, data, output_dir)

        # ---- resume, log the start --------------------------------------------------------------------
        if resume_from is not None:
            checkpoints.check_resumable(
                resume_from, dict(run.model.config), options, accelerator.num_processes, num_custom=int(ema is not None)
            )
            accelerator.load_state(str(resume_from))
            run.step = checkpoints.read_state(resume_from)["step"]
            accelerator.print(f"resumed from {resume_from} at step {run.step}")
        elif options.resume_from_checkpoint == "latest":
            accelerator.print(f"no checkpoint in {output_dir} yet: starting from scratch")
        _start_log(run, source.encoder_source, data)
        if accelerator.is_main_process:  # only once the run starts: a refused resume or a failed start leaves
            write_text_atomic(output_dir / OPTIONS_FILE, run.options_json)  # the folder's options as they were

        # ---- the loop -----------------------------------------------------------------------------------
        _train(run, stop, repo_id, monitor)

        # ---- outputs ------------------------------------------------------------------------------------
        run.router.record_norms = False
        grid_path = _validate(run)
        metrics = {
            "final_loss": _last_loss(output_dir),
            "steps": run.step,
            "nonfinite_total": run.nonfinite_total,
            "trainable_parameters": sum(p.numel() for p in trainable_parameters(run.model)),
            **peak_memory(accelerator.device),
        }
        _export(run, _card(run, metrics, grid_path))
        if accelerator.is_main_process:
            write_json_atomic(output_dir / "train_metrics.json", metrics)
            if repo_id:
                hub.upload(output_dir, repo_id, options.hub_token, f"final model after {run.step} steps")
            accelerator.print(
                f"trained {run.step} steps: the run is in {output_dir} (evaluate it with "
                f"python -m skipdiff.eval --checkpoint {output_dir} --fid --denoise_loss)"
            )
        accelerator.end_training()
    return metrics


# --------------------------------------------------------------------------------------------------
# The run's parts, prepared
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything the loop touches. ``unet`` is Accelerate's wrapped model, ``model`` the plain one."""

    options: TrainOptions
    accelerator: object
    unet: torch.nn.Module
    model: torch.nn.Module
    ema: object
    optimizer: object
    lr_scheduler: object
    loader: object
    noise_scheduler: object
    encoder: object
    conditioning: object  # skipdiff.conditioning: none, class labels, or text through a frozen text encoder
    target: object  # the pretrained pipeline's study target (text validation grids), or None
    data: TrainingData
    output_dir: Path
    stats: StatsWriter
    window: WindowStats
    max_steps: int
    steps_per_epoch: int
    options_json: str
    step: int = 0
    nonfinite_total: int = 0
    pending_finite: torch.Tensor | None = None  # the finiteness of an accumulation's batches so far

    @property
    def router(self):
        return self.model.skip_router

    @functools.cached_property
    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters that train; fixed for the run, so listed once rather than on every step."""
        return trainable_parameters(self.unet)


def _prepare(options, accelerator, source: ModelSource, ema, optimizer, loader, data, output_dir) -> Run:
    """The learning-rate schedule, ``accelerator.prepare``, the stats writer and the options file."""
    steps_per_epoch = math.ceil(len(loader) / options.gradient_accumulation_steps)
    max_steps = options.total_steps(steps_per_epoch)
    lr_scheduler = get_scheduler(
        options.lr_scheduler,
        optimizer,
        num_warmup_steps=options.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(source.unet, optimizer, loader, lr_scheduler)
    source.encoder.to(accelerator.device)
    if source.target is not None:
        source.target.pipeline.to(accelerator.device)  # its text encoder conditions every step
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    options_json = to_json(redact(options))  # the token never reaches a file
    window = WindowStats(options.timestep_buckets, options.num_train_timesteps, accelerator.device)
    # The plain module (no DDP or torch.compile wrapper): its parameter names are the model's own, so
    # gradient norms group by block and the saved weights carry no wrapper prefix.
    model = accelerator.unwrap_model(unet, keep_torch_compile=False)
    return Run(
        options,
        accelerator,
        unet,
        model,
        ema,
        optimizer,
        lr_scheduler,
        loader,
        source.noise_scheduler,
        source.encoder,
        source.conditioning,
        source.target,
        data,
        output_dir,
        StatsWriter(accelerator, output_dir),
        window,
        max_steps,
        steps_per_epoch,
        options_json,
    )


def _start_log(run: Run, vae_source: str, data: TrainingData) -> None:
    """Trackers, the skip table, and the ``start`` record (a resumed run keeps its log up to its checkpoint)."""
    options, accelerator = run.options, run.accelerator
    if accelerator.is_main_process:
        config = {k: str(v) for k, v in redact(vars(options)).items()}
        init_kwargs = {"wandb": {"dir": str(run.output_dir), "name": run.output_dir.name}}
        accelerator.init_trackers(options.tracker_project_name, config=config, init_kwargs=init_kwargs)
        accelerator.print(format_skip_table(run.router.describe()))
    validation = _validation_cost(run)
    accelerator.print(validation_line(validation, options.validation_every))
    run.stats.truncate_after(run.step if run.step else -1)  # a fresh start drops an earlier attempt's records
    if run.step == 0:
        run.stats.write(
            {
                "event": "start",
                "vae": vae_source,
                "encoder": run.encoder.describe(),
                "num_parameters": sum(p.numel() for p in run.model.parameters()),
                "num_trainable_parameters": sum(p.numel() for p in trainable_parameters(run.model)),
                "num_processes": accelerator.num_processes,
                "skipped_images": data.skipped_images,
                "train_images": len(data.splits["train"]),
                "test_images": len(data.splits["test"]),
                "image_channels": data.channels,
                "max_train_steps": run.max_steps,
                "noise_scheduler": {k: run.noise_scheduler.config[k] for k in NOISE_KEYS},
                "skips": run.router.describe(),
                "validation": validation,
            },
            step=0,
        )


def _validation_cost(run: Run) -> dict:
    """What the run's validation grids cost against its training (:func:`validation_cost`), printed at the
    start: a text-conditioned pipeline samples with its own guidance (two UNet forwards a step above 1)."""
    text = run.conditioning.kind == "text"
    guidance = text and default_guidance_scale(run.target.pipeline) > 1
    images = validation_images(run.options, text)
    return validation_cost(run.options, run.max_steps, images, guidance, run.accelerator.num_processes)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _train(run: Run, stop: StopRequest, repo_id: str | None, monitor: TrainingMonitor | None = None) -> None:
    """Epochs of optimizer steps until ``max_steps``; logs, validates and checkpoints on schedule."""
    options, accelerator = run.options, run.accelerator
    first_epoch = run.step // run.steps_per_epoch
    skip_batches = (run.step % run.steps_per_epoch) * options.gradient_accumulation_steps
    progress = tqdm(total=run.max_steps, initial=run.step, desc="train", disable=not accelerator.is_local_main_process)
    window_start = time.perf_counter()
    run.unet.train()
    for epoch in range(first_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
        run.loader.set_epoch(epoch)
        batches = run.loader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(run.loader, skip_batches)
        for batch in batches:
            if run.step >= run.max_steps:  # resumed from the last checkpoint: nothing left to train
                return
            logging_step = (run.step + 1) % options.log_every == 0
            run.router.record_norms = logging_step
            done = _micro_step(run, batch, logging_step)
            if done is None:  # gradient accumulation: not an optimizer step yet
                continue
            run.step += 1
            progress.update(1)
            if logging_step or run.step >= run.max_steps:
                _log(run, done, epoch, time.perf_counter() - window_start, progress)
                window_start = time.perf_counter()
            if options.validation_every and run.step % options.validation_every == 0 and run.step < run.max_steps:
                _validate(run)
            if monitor is not None and run.step in monitor.steps:  # before the checkpoint: a resume re-reports
                with _with_ema_weights(run.model, run.ema):
                    monitor(run.step, MonitorView(run.model, run.noise_scheduler, run.encoder, run.conditioning))
            if stop.requested(accelerator, logging_step):
                _checkpoint(run, epoch, repo_id)
                stop.exit(run.step, checkpoints.list_checkpoints(run.output_dir))
            if options.checkpointing_steps and run.step % options.checkpointing_steps == 0 and bool(done.finite):
                _checkpoint(run, epoch, repo_id)  # (the host reads the flag here: a checkpoint waits anyway)
            if run.step >= run.max_steps:
                break
    progress.close()


@dataclasses.dataclass(frozen=True)
class MonitorView:
    """What a :class:`TrainingMonitor` sees: the plain model (EMA weights in place), the noise scheduler,
    the encoder and the conditioning, enough to score held-out data as :mod:`skipdiff.eval.denoise` does."""

    model: torch.nn.Module
    noise_scheduler: object
    encoder: object
    conditioning: object


class TrainingMonitor:
    """Called after the optimizer steps in ``steps`` (a host read there is fine: those steps are rare)."""

    steps: frozenset[int] = frozenset()

    def __call__(self, step: int, view: MonitorView) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class StepDone:
    """What the loop keeps of an optimizer step (device tensors) for the next log record."""

    grad_norm: torch.Tensor
    block_norms: dict
    finite: torch.Tensor  # 0-d bool: the step was taken


def _micro_step(run: Run, batch: dict, logging_step: bool) -> StepDone | None:
    """Forward and backward of one batch; at the end of an accumulation, the optimizer step (skipped on
    the device when a loss or the gradient is not finite). Reads nothing from the device unless logging."""
    options, accelerator = run.options, run.accelerator
    with accelerator.accumulate(run.unet):
        latents = batch_latents(run.encoder, batch, random_flip=options.random_flip)
        if options.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        noise = draw_noise(latents, options.num_train_timesteps, options.noise_offset, options.input_perturbation)
        losses = batch_loss(
            run.unet, run.noise_scheduler, latents, noise, run.conditioning.unet_kwargs(batch), options.snr_gamma
        )
        loss = losses.mean()
        if run.step + 1 in options.inject_nonfinite_steps:
            loss = loss * float("nan")
        finite = all_finite(accelerator, loss)
        run.pending_finite = finite if run.pending_finite is None else run.pending_finite & finite
        accelerator.backward(loss)
        if not accelerator.sync_gradients:
            return None
        grad_norm = gradient_norm(accelerator, run.trainable, options.max_grad_norm)
        finite = run.pending_finite & torch.isfinite(grad_norm)
        run.pending_finite = None
        block_norms = grad_norms_by_block(run.model) if logging_step else {}
        optimizer_step(run.optimizer, finite)
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(finite)
    if run.router.chain is not None:
        run.router.update_chain(losses.detach(), counted=finite)
    run.window.add(losses, noise.timesteps, finite)  # summed over processes when read
    return StepDone(grad_norm.detach(), block_norms, finite)


def _log(run: Run, done: StepDone, epoch: int, seconds: float, progress) -> None:
    """Read the window's bookkeeping (the one host read), write its records, stop on too many non-finite steps."""
    window = run.window.read(run.accelerator)
    steps = max(window["finite_steps"] + window["nonfinite_window"], 1)
    run.nonfinite_total = window["nonfinite_total"]
    if window["nonfinite_window"]:
        run.stats.write(
            {"event": "nonfinite", "nonfinite_total": window["nonfinite_total"], "in_row": window["in_row"]}, run.step
        )
    if window["longest_in_row"] >= run.options.max_nonfinite_in_row:
        last = checkpoints.list_checkpoints(run.output_dir)
        raise TrainingStopped(
            f"stopping at step {run.step}: {window['longest_in_row']} non-finite losses or gradients in a row "
            f"(last good checkpoint: {last[-1] if last else 'none'})"
        )
    if window["loss"] is None:  # no finite step since the last record
        return
    record = {
        "loss": window["loss"],
        "loss_by_timestep": window["loss_by_timestep"],
        "step_losses": window["step_losses"],
        "grad_norm": float(done.grad_norm),
        "grad_norm_by_block": done.block_norms,
        "lr": run.lr_scheduler.get_last_lr()[0],
        "seconds_per_step": seconds / steps,
        "nonfinite_total": window["nonfinite_total"],
        "epoch": epoch,
        "gates": run.router.telemetry(),
        "skip_vs_backbone_norm": run.router.norm_ratios(),
    }
    if run.router.chain is not None:
        record["markov"] = run.router.markov_summary()
    run.stats.write(record, run.step)
    progress.set_postfix(loss=f"{record['loss']:.4f}", s_per_step=f"{record['seconds_per_step']:.3f}")


# --------------------------------------------------------------------------------------------------
# Checkpoints, validation grids, export
# --------------------------------------------------------------------------------------------------


def _checkpoint(run: Run, epoch: int, repo_id: str | None) -> None:
    state = {
        "epoch": epoch,
        "unet_config": dict(run.model.config),
        "training_options": dataclasses.asdict(redact(run.options)),
    }
    path = checkpoints.save_checkpoint(
        run.accelerator, run.output_dir, run.step, state, run.options.checkpoints_total_limit
    )
    if repo_id:
        metrics = {"steps": run.step, "nonfinite_total": run.nonfinite_total}
        _export(run, _card(run, metrics, None))
        hub.upload(run.output_dir, repo_id, run.options.hub_token, f"checkpoint at step {run.step}")
    run.accelerator.print(f"saved {path}")


def _with_ema_weights(model, ema):
    """Context: the plain UNet with the EMA weights in place (restored afterwards)."""

    @contextmanager
    def swap():
        if ema is None:
            yield model
            return
        saved = [p.detach().clone() for p in trainable_parameters(model)]
        ema.copy_to(model.parameters())
        try:
            yield model
        finally:
            with torch.no_grad():
                for param, value in zip(trainable_parameters(model), saved, strict=True):
                    param.copy_(value)

    return swap()


def _validate(run: Run):
    """Save a sample grid (EMA weights) as PNG and to tensorboard; main process only."""
    if not run.accelerator.is_main_process:
        return None
    with _with_ema_weights(run.model, run.ema):
        if run.conditioning.kind == "text":
            grid = text_sample_grid(run.target, run.options, run.data, step=run.step)
        else:
            grid = sample_grid(
                make_pipeline(run.model, run.noise_scheduler, run.encoder), run.options, run.data, step=run.step
            )
    path = run.output_dir / "samples" / f"step-{run.step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("samples", np.asarray(grid.convert("RGB"))[None], run.step, dataformats="NHWC")
    return path


def _card(run: Run, metrics: dict, grid_path):
    """The run's model card (README.md): loading, skip table, settings, metrics, sample grid."""
    options = run.options
    return hub.model_card(
        options.hub_model_id or run.output_dir.name,
        vars(options),
        run.router.describe(),
        metrics,
        sample_grid=grid_path.relative_to(run.output_dir).as_posix() if grid_path else None,
        dataset=options.dataset_name or options.dataset,
    )


def _export(run: Run, card) -> None:
    """Write the loadable run folder and its model card (main process; all ranks wait). A gate-only run
    also writes its gates as a small artefact (``skip_gates/``, the EMA's values when there is one); for a
    Stable Diffusion base that artefact is the whole output (no copy of the 3.4 GB UNet)."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        if run.options.train_only == "gates":
            with _with_ema_weights(run.model, run.ema):
                save_skip_gates(run.model, run.output_dir / ARTEFACT_FOLDER, run.options.pretrained_model_name_or_path)
        if isinstance(run.model, SkipUNet2DModel):
            save_outputs(run.output_dir, run.model, run.ema, run.noise_scheduler, run.encoder, run.options_json)
            card.save(run.output_dir / "README.md")
        else:
            (run.output_dir / "training_options.json").write_text(run.options_json)
    run.accelerator.wait_for_everyone()


def peak_memory(device: torch.device) -> dict:
    """The process's peak memory so far: CUDA's allocator peak on a GPU, else the resident set size
    (``getrusage``; a process-wide maximum, so compare runs made in separate processes)."""
    if device.type == "cuda":
        return {"peak_cuda_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # Unix only: Windows has no resource module
    import resource

    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _last_loss(output_dir: Path) -> float | None:
    path = output_dir / "stats.jsonl"
    losses = [r["loss"] for r in read_stats(path) if "loss" in r] if path.exists() else []
    return losses[-1] if losses else None
