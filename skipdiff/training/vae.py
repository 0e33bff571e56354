"""The VAE stage: train a diffusers ``AutoencoderKL`` (reconstruction + KL) and store the latent
scaling factor derived from the data in its config.

Saving never leaves a folder that looks finished but is not: everything goes to a temporary sibling
(``.<name>.tmp<pid>``), renamed to the folder once complete, as checkpoints are (:func:`_save_whole`). A
folder that holds part of a VAE stage (written in place by earlier versions, then killed) is refused by
name (:func:`vae_folder_state`), never loaded as a VAE. Ctrl-C, SIGTERM or SIGUSR1 stop the stage after the
current step (:class:`~skipdiff.training.startup.TrainingInterrupted`; it has no checkpoints, so a
relaunch trains it again)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import subset, to_json
from ..cpu_memory import keep_freed_memory_for_cpu_training
from ..data import collate_images, dataset_channels, image_transform, load_image_splits, with_pixel_values
from ..data_options import DataOptions
from ..encoders import data_scaling_factor
from ..presets import vae_config
from ..runfolder import follow_umask
from .checkpoints import check_writable
from .startup import StopRequest, TrainingInterrupted
from .vae_options import VaeOptions

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
METRICS_FILE = "vae_metrics.json"
# A finished VAE stage holds these (the metrics were written after the weights when folders were written
# in place, so they mark a folder whose save completed); training_options.json is written last.
FINISHED_FILES = ("config.json", VAE_WEIGHTS, METRICS_FILE)

logger = logging.getLogger(__name__)


def vae_folder_state(folder: str | os.PathLike) -> tuple[str, list[str]]:
    """``("finished", [])``, ``("none", [])`` (no part of a VAE stage: absent or empty of its files) or
    ``("unfinished", missing)``: some of :data:`FINISHED_FILES` without the others, a stage stopped while
    saving in place; loading it fails ("Unable to load weights"), so it is refused instead."""
    folder = Path(folder)
    present = [name for name in FINISHED_FILES if (folder / name).is_file()]
    if not present:
        return "none", []
    missing = [name for name in FINISHED_FILES if name not in present]
    return ("unfinished", missing) if missing else ("finished", [])


def unfinished_vae_error(folder: str | os.PathLike, missing: list[str], remedy: str) -> ValueError:
    """The one-line refusal of a half-written VAE folder, naming it, what it lacks and ``remedy``."""
    return ValueError(
        f"{str(folder)!r} holds an unfinished VAE stage (no {', '.join(missing)}: stopped while "
        f"saving), which cannot be loaded; {remedy}"
    )


def train_vae(options: VaeOptions, accelerator: Accelerator | None = None) -> dict:
    """Train, derive the scaling factor, save; returns the metrics written to ``vae_metrics.json``.

    The output folder is checked (writable, holding no other VAE unless ``--overwrite_output_dir``) and a
    train split smaller than the batch trains with a batch of the whole split (said once), all before
    the first step."""
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    keep_freed_memory_for_cpu_training()
    out = Path(options.output_dir)
    _check_output_dir(out, options.overwrite_output_dir)
    check_writable(out)
    accelerator = accelerator or Accelerator()
    set_seed(options.seed)
    splits = load_image_splits(subset(DataOptions, options))
    channels = dataset_channels(splits, options.image_channels)
    vae = AutoencoderKL(**vae_config(options.preset, channels))
    transform = image_transform(options.resolution, channels)
    train = with_pixel_values(splits["train"], transform)
    test = with_pixel_values(splits["test"], transform)
    batch_size = min(options.train_batch_size, len(train))
    if batch_size < options.train_batch_size:
        accelerator.print(
            f"VAE stage: the train split has {len(train)} images, fewer than the batch of "
            f"{options.train_batch_size}: training with batches of {batch_size}"
        )
    generator = torch.Generator().manual_seed(options.seed)
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_images, generator=generator
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=options.learning_rate)
    schedule = _one_cycle(optimizer, options.learning_rate, options.max_train_steps)
    model, optimizer, loader = accelerator.prepare(_AutoencoderWithKL(vae), optimizer, loader)
    start = time.perf_counter()
    with StopRequest() as stop:  # inside a diffusion run's own (--vae auto): its handlers are back afterwards
        _train_steps(model, optimizer, schedule, loader, options, accelerator, stop)
    vae = accelerator.unwrap_model(model).vae.eval()
    eval_loader = DataLoader(test, batch_size=256, collate_fn=collate_images)
    metrics = {
        "test_mse": _reconstruction_mse(vae, eval_loader),
        "train_seconds": time.perf_counter() - start,
    }
    scaling = data_scaling_factor(vae, DataLoader(train, batch_size=256, collate_fn=collate_images))
    vae.register_to_config(scaling_factor=scaling)
    metrics["scaling_factor"] = scaling
    if accelerator.is_main_process:
        metrics = _save_whole(vae, out, metrics, to_json(options), options.overwrite_output_dir)
    accelerator.wait_for_everyone()
    return metrics


def _train_steps(model, optimizer, schedule, loader, options: VaeOptions, accelerator, stop: StopRequest) -> None:
    """``--max_train_steps`` optimizer steps; a stop signal ends the stage after the current step."""
    step = 0
    progress = tqdm(total=options.max_train_steps, desc="vae", disable=not accelerator.is_main_process)
    while step < options.max_train_steps:
        if len(loader) == 0:  # cannot happen with batch <= split, but a loop must never spin without progress
            raise RuntimeError("the VAE's data loader yields no batch")
        for batch in loader:
            pixels = batch["pixel_values"]
            reconstruction, kl = model(pixels)
            mse = torch.nn.functional.mse_loss(reconstruction, pixels)
            loss = mse + options.kl_weight * kl
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            progress.update(1)
            if step % 20 == 0:  # a host read, so not every step
                progress.set_postfix(mse=f"{mse.item():.4f}")
            # several processes agree every 20 steps (one all-reduce), so that all of them stop together
            if stop.requested(accelerator, logging_step=step % 20 == 0 or step == options.max_train_steps):
                progress.close()
                how = (
                    "" if (stop.signum or signal.SIGINT) == signal.SIGINT else f" by {signal.Signals(stop.signum).name}"
                )
                raise TrainingInterrupted(
                    f"the VAE stage was interrupted{how} after step {step} of {options.max_train_steps}; it keeps no "
                    f"checkpoints, so nothing of it was saved ({options.output_dir!r} is as it was): run the same "
                    "command again to train it",
                    stop.signum or signal.SIGINT,
                )
            if step >= options.max_train_steps:
                break
    progress.close()


def _check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder holding a VAE (finished or not) unless ``--overwrite_output_dir``."""
    state, missing = vae_folder_state(out)
    if state == "finished" and not overwrite:
        raise ValueError(
            f"output_dir {str(out)!r} already holds a VAE: pass --overwrite_output_dir or another --output_dir"
        )
    if state == "unfinished" and not overwrite:
        raise unfinished_vae_error(out, missing, "delete the folder or pass --overwrite_output_dir to train it again")


def _save_whole(vae: AutoencoderKL, out: Path, metrics: dict, options_json: str, overwrite: bool) -> dict:
    """Write the stage's files to a temporary sibling, then put them in place; returns the metrics of the VAE
    that ``out`` holds afterwards. A kill or a full disk while saving leaves ``out`` as it was, or (while
    files of a folder that holds others are moved in) detectably unfinished, never a VAE that seems whole:

    * ``out`` empty (the usual case, ``--vae auto`` included): the folder is renamed into place, atomically;
    * ``out`` holding another process's VAE, saved while this one trained (two runs of one split): it is
      kept, so that both runs and every later one encode with the same VAE; this one is dropped;
    * else (``--overwrite_output_dir``, or files of the user's): ``config.json`` is removed first and moved
      in last, so that a folder without it (or without the weights) is refused as unfinished meanwhile;
      files that are not the stage's stay."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        vae.save_pretrained(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        (tmp / "training_options.json").write_text(options_json)
        follow_umask(tmp)  # safetensors writes its files 0600
        if not out.is_dir() or not any(out.iterdir()):
            if out.is_dir():
                out.rmdir()  # the empty folder check_writable made
            os.replace(tmp, out)
            return metrics
        if vae_folder_state(out)[0] == "finished" and not overwrite:
            logger.warning(
                "VAE stage: another process saved a VAE into %s while this one trained: that one is kept and used, "
                "this one dropped",
                out,
            )
            return json.loads((out / METRICS_FILE).read_text())
        (out / "config.json").unlink(missing_ok=True)
        names = sorted(p.name for p in tmp.iterdir() if p.name != "config.json")
        for name in [*names, "config.json"]:
            os.replace(tmp / name, out / name)
        return metrics
    except OSError as err:
        raise OSError(
            f"could not write the VAE stage to {str(out)!r}: {err}; nothing of it was kept; free space "
            "or make the folder writable, then run the command again"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a kill -9 may leave it: a hidden sibling nothing reads


def _one_cycle(optimizer, learning_rate: float, total_steps: int):
    """A 5% warm-up then cosine decay (PyTorch's one-cycle schedule); warm-up at least one step, and a
    constant rate for runs of fewer than 3 steps, where one cycle is undefined."""
    if total_steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    pct_start = max(0.05, 2.0 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=total_steps, pct_start=pct_start)


class _AutoencoderWithKL(torch.nn.Module):
    """One forward for the VAE loss, so that DDP sees (and synchronises) the whole computation."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl().mean()


@torch.no_grad()
def _reconstruction_mse(vae: AutoencoderKL, loader) -> float:
    total, count = 0.0, 0
    for batch in loader:
        pixels = batch["pixel_values"]
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        total += float(torch.nn.functional.mse_loss(reconstruction, pixels, reduction="sum"))
        count += pixels.numel()
    return total / count
