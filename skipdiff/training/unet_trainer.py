"""The diffusion training loop behind ``train_scripts/train_unet.py`` (``main(argv)`` or ``train_unet(options)``).

Order: accelerator -> inputs (data, encoder) -> model -> scheduler -> optimizer -> loader -> prepare -> loop.
Every option, with its default, is in :mod:`skipdiff.training.options` (``--help``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .. import SkipUNet2DModel
from ..data import image_channels, load_image_splits, num_classes
from ..diffusion import make_scheduler, per_example_loss
from ..encoders import batch_latents
from ..markov import rank_share
from ..presets import unet_config
from . import checkpoints, hub
from .cli import parse_args, parse_key_values, to_json
from .options import TrainOptions
from .runtime import (
    make_accelerator,
    make_pipeline,
    prepare_encoder,
    sample_grid,
    save_outputs,
    train_loader,
    write_json,
)  # fmt: skip
from .telemetry import LossByBucket, StatsWriter, grad_norms_by_block


class TrainingStopped(RuntimeError):
    """Too many non-finite losses or gradients in a row: the run stops, its checkpoints intact."""


def main(argv: list[str] | None = None, description: str = __doc__) -> dict:
    """Parse a command line and train (``--dry_run``: print the resolved options and return)."""
    options = parse_args(TrainOptions, argv, description=description)
    if options.dry_run:
        print(to_json(dataclasses.replace(options, hub_token=None)))
        return {}
    return train_unet(options)


def run_cli(description: str = __doc__) -> int:
    """``main`` for a console script: known failures print ``error: ...`` and exit 1."""
    try:
        main(description=description)
    except (TrainingStopped, hub.HubAccessError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def train_unet(options: TrainOptions) -> dict:
    """Train a ``SkipUNet2DModel`` as the options say; returns the final metrics."""
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    check_model_options(options)  # a bad --skips or --markov fails now, not after the VAE stage
    output_dir = Path(options.output_dir)
    checkpoints.check_writable(output_dir)
    resume_from = checkpoints.resolve_checkpoint(output_dir, options.resume_from_checkpoint)

    # ---- accelerator -------------------------------------------------------------------------------
    accelerator = make_accelerator(options)
    set_seed(options.seed)
    repo_id = None
    if options.push_to_hub and accelerator.is_main_process:  # fail now, not after hours of training
        repo_id = hub.prepare_repo(options.hub_model_id, options.hub_token, options.hub_private_repo)

    # ---- inputs: data and the pixel/latent encoder -------------------------------------------------
    splits = load_image_splits(options.dataset, dataset_name=options.dataset_name,
                               dataset_config_name=options.dataset_config_name,
                               train_data_dir=options.train_data_dir, image_column=options.image_column,
                               label_column=options.label_column, test_fraction=options.test_fraction,
                               split_seed=options.split_seed, cache_dir=options.cache_dir,
                               skip_corrupt=options.skip_corrupt_images)  # fmt: skip
    classes = num_classes(splits) if options.class_conditional else None
    if options.class_conditional and classes is None:
        raise ValueError(f"--class_conditional needs a label column; {options.label_column!r} is not in the dataset")
    channels = image_channels(splits)
    encoder, vae_source = prepare_encoder(options, accelerator, channels)

    # ---- model -------------------------------------------------------------------------------------
    shortcuts = {part: False for part in options.disable_shortcuts} or None
    config = unet_config(options.model, sample_size=options.resolution // encoder.downscale, channels=encoder.channels,
                         num_classes=classes, skips=options.skips, residual_shortcuts=shortcuts,
                         markov=parse_key_values(options.markov, "--markov"))  # fmt: skip
    unet = SkipUNet2DModel(**config)
    router = unet.skip_router
    ema = None
    if options.use_ema:
        ema = EMAModel(unet.parameters(), decay=options.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                       power=3 / 4, model_cls=SkipUNet2DModel, model_config=unet.config)  # fmt: skip
    if resume_from is not None:
        checkpoints.check_compatible(resume_from, dict(unet.config))

    # ---- noise scheduler and optimizer -------------------------------------------------------------
    noise_scheduler = make_scheduler(options.num_train_timesteps, options.beta_schedule, options.prediction_type,
                                     encoder.sample_range)  # fmt: skip
    optimizer = torch.optim.AdamW(unet.parameters(), lr=options.learning_rate,
                                  betas=(options.adam_beta1, options.adam_beta2),
                                  weight_decay=options.adam_weight_decay, eps=options.adam_epsilon)  # fmt: skip

    # ---- data loader, schedule, prepare ------------------------------------------------------------
    loader = train_loader(options, splits["train"], encoder, channels)
    steps_per_epoch = math.ceil(len(loader) / options.gradient_accumulation_steps)
    max_steps = options.max_train_steps or options.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(options.lr_scheduler, optimizer,
                                 num_warmup_steps=options.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)  # fmt: skip
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    encoder.to(accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    # ---- resume ------------------------------------------------------------------------------------
    step, first_epoch, skip_batches = 0, 0, 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = checkpoints.read_state(resume_from)["step"]
        first_epoch = step // steps_per_epoch
        skip_batches = (step % steps_per_epoch) * options.gradient_accumulation_steps
        accelerator.print(f"resumed from {resume_from} at step {step}")
    elif options.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {output_dir} yet: starting from scratch")

    options_json = to_json(dataclasses.replace(options, hub_token=None))  # the token never reaches a file
    if accelerator.is_main_process:
        (output_dir / "training_options.json").write_text(options_json)
        accelerator.init_trackers("skipdiff", config={k: str(v) for k, v in vars(options).items() if k != "hub_token"})
        accelerator.print(unet.module.skip_table() if hasattr(unet, "module") else unet.skip_table())
    stats = StatsWriter(accelerator, output_dir)
    stats.truncate_after(step)  # a resumed run logs the steps after its checkpoint again
    if step == 0:
        stats.write({"event": "start", "vae": vae_source, "encoder": encoder.describe(),
                     "num_parameters": sum(p.numel() for p in unet.parameters()), "num_processes": accelerator.num_processes,
                     "skipped_images": len(getattr(splits["train"], "skipped_images", [])),
                     "skips": router.describe()}, step=0)  # fmt: skip

    # ---- training loop -----------------------------------------------------------------------------
    by_bucket = LossByBucket(options.timestep_buckets, options.num_train_timesteps)
    window_loss, window_count, nonfinite_total, nonfinite_in_row = 0.0, 0, 0, 0
    progress = tqdm(total=max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    window_start = time.perf_counter()
    unet.train()
    for epoch in range(first_epoch, num_epochs):
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if epoch == first_epoch and skip_batches else loader
        for batch in batches:
            if step >= max_steps:  # resumed from the last checkpoint: nothing left to train
                break
            logging_step = (step + 1) % options.log_every == 0
            router.record_norms = logging_step
            with accelerator.accumulate(unet):
                latents = batch_latents(encoder, batch)
                # Drawn for the global batch on every rank (each keeps its slice): N processes use the
                # noise one process with the global batch would, so the two runs match.
                size = latents.shape[0]
                shape = tuple(latents.shape[1:])
                noise = rank_share(lambda n, shape=shape: torch.randn(n, *shape), size).to(latents)
                timesteps = rank_share(lambda n: torch.randint(0, options.num_train_timesteps, (n,)), size)
                timesteps = timesteps.to(latents.device)
                losses = per_example_loss(unet, noise_scheduler, latents, noise, timesteps,
                                          class_labels=batch.get("labels") if classes else None,
                                          snr_gamma=options.snr_gamma)  # fmt: skip
                loss = losses.mean()
                if step + 1 in options.inject_nonfinite_steps:
                    loss = loss * float("nan")
                # Every rank must take the same branch, or DDP waits for a backward that never comes.
                finite = accelerator.reduce(torch.isfinite(loss).float().reshape(1), "sum").item() == accelerator.num_processes
                grad_norm, block_norms = None, {}
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = _clip(accelerator, unet, options.max_grad_norm)
                        finite = math.isfinite(grad_norm)
                if accelerator.sync_gradients and logging_step and finite:
                    block_norms = grad_norms_by_block(accelerator.unwrap_model(unet))
                if finite:
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step done ----------------------------------------------------------
            step += 1
            progress.update(1)
            if not finite:
                nonfinite_total += 1
                nonfinite_in_row += 1
                stats.write({"event": "nonfinite", "nonfinite_total": nonfinite_total, "in_row": nonfinite_in_row}, step)
                if nonfinite_in_row >= options.max_nonfinite_in_row:
                    last = checkpoints.list_checkpoints(output_dir)
                    raise TrainingStopped(
                        f"stopping at step {step}: {nonfinite_in_row} non-finite losses or gradients in a row "
                        f"(last good checkpoint: {last[-1] if last else 'none'})"
                    )
                if step >= max_steps:  # a skipped last step still ends the run
                    break
                continue
            nonfinite_in_row = 0
            if ema is not None:
                ema.step(unet.parameters())
            if router.chain is not None:
                router.update_chain(losses.detach())
            window_count += 1
            global_losses = accelerator.gather(losses.detach())  # the logged loss is the global batch's
            window_loss += float(global_losses.mean())
            by_bucket.add(global_losses, accelerator.gather(timesteps))

            if logging_step:
                seconds = (time.perf_counter() - window_start) / max(window_count, 1)
                record = {"loss": window_loss / max(window_count, 1), "loss_by_timestep": by_bucket.means(),
                          "grad_norm": grad_norm, "grad_norm_by_block": block_norms, "lr": lr_scheduler.get_last_lr()[0],
                          "seconds_per_step": seconds, "nonfinite_total": nonfinite_total, "epoch": epoch,
                          "gates": router.telemetry(),
                          "skip_vs_backbone_norm": {str(k): float(s / m.clamp_min(1e-12)) for k, (m, s) in router.norms.items()}}  # fmt: skip
                if router.chain is not None:
                    record["markov"] = router.markov_summary()
                stats.write(record, step)
                progress.set_postfix(loss=f"{record['loss']:.4f}", s_per_step=f"{seconds:.3f}")
                window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
                by_bucket.reset()
            if options.validation_every and step % options.validation_every == 0 and step < max_steps:
                _validate(accelerator, unet, ema, noise_scheduler, encoder, options, classes, output_dir, step)
            if options.checkpointing_steps and step % options.checkpointing_steps == 0:
                path = checkpoints.save_checkpoint(accelerator, output_dir, step,
                                                   {"epoch": epoch, "unet_config": dict(accelerator.unwrap_model(unet).config)},
                                                   options.checkpoints_total_limit)  # fmt: skip
                if repo_id:
                    card = _card(options, router, {"steps": step, "nonfinite_total": nonfinite_total}, None, output_dir)
                    _export(accelerator, unet, ema, noise_scheduler, encoder, options_json, output_dir, card)
                    hub.upload(output_dir, repo_id, options.hub_token, f"checkpoint at step {step}")
                accelerator.print(f"saved {path}")
            if step >= max_steps:
                break
        if step >= max_steps:
            break
    progress.close()

    # ---- outputs -----------------------------------------------------------------------------------
    router.record_norms = False
    grid_path = _validate(accelerator, unet, ema, noise_scheduler, encoder, options, classes, output_dir, step)
    metrics = {"final_loss": stats_last_loss(output_dir), "steps": step, "nonfinite_total": nonfinite_total}
    _export(accelerator, unet, ema, noise_scheduler, encoder, options_json, output_dir,
            _card(options, router, metrics, grid_path, output_dir))  # fmt: skip
    if accelerator.is_main_process:
        write_json(output_dir / "train_metrics.json", metrics)
        if repo_id:
            hub.upload(output_dir, repo_id, options.hub_token, f"final model after {step} steps")
    accelerator.end_training()
    return metrics


def check_model_options(options: TrainOptions) -> None:
    """Build the requested UNet once (any channels and size: the skips do not depend on them) so
    that the model preset, skip specification, shortcut switches and chain options are checked."""
    shortcuts = {part: False for part in options.disable_shortcuts} or None
    SkipUNet2DModel(**unet_config(options.model, sample_size=options.resolution, channels=1, skips=options.skips,
                                  residual_shortcuts=shortcuts, markov=parse_key_values(options.markov, "--markov")))  # fmt: skip


def _clip(accelerator, unet, max_norm: float) -> float:
    """Clip (when max_norm > 0) and return the total gradient norm before clipping."""
    parameters = [p for p in unet.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(parameters, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])))


def _with_ema_weights(unet, ema):
    """Context: the unwrapped UNet with EMA weights in place (restored afterwards)."""
    from contextlib import contextmanager

    @contextmanager
    def swap():
        if ema is None:
            yield unet
            return
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        try:
            yield unet
        finally:
            ema.restore(unet.parameters())

    return swap()


def _validate(accelerator, unet, ema, scheduler, encoder, options, classes, output_dir, step):
    """Save a sample grid (EMA weights) as PNG and to tensorboard; main process only."""
    if not accelerator.is_main_process:
        return None
    model = accelerator.unwrap_model(unet)
    with _with_ema_weights(model, ema):
        grid = sample_grid(make_pipeline(model, scheduler, encoder), options, classes)
    path = output_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            array = np.asarray(grid.convert("RGB"))
            tracker.writer.add_images("samples", array[None], step, dataformats="NHWC")
    return path


def _card(options, router, metrics, grid_path, output_dir):
    """The run's model card (README.md): skip table, settings, metrics, sample grid."""
    return hub.model_card(options.hub_model_id or output_dir.name, vars(options), router.describe(), metrics,
                          sample_grid=grid_path.relative_to(output_dir).as_posix() if grid_path else None,
                          dataset=options.dataset_name or options.dataset)  # fmt: skip


def _export(accelerator, unet, ema, scheduler, encoder, options_json, output_dir, card):
    """Write the loadable run folder and its model card (main process; all ranks wait)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(output_dir, make_pipeline(accelerator.unwrap_model(unet), scheduler, encoder), ema, options_json)
        card.save(output_dir / "README.md")
    accelerator.wait_for_everyone()


def stats_last_loss(output_dir: Path) -> float | None:
    from .telemetry import read_stats

    path = output_dir / "stats.jsonl"
    losses = [r["loss"] for r in read_stats(path) if "loss" in r] if path.exists() else []
    return losses[-1] if losses else None

