"""The VAE stage: train a diffusers ``AutoencoderKL`` (reconstruction + KL) and store the latent
scaling factor derived from the data in its config."""

from __future__ import annotations

import json
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
from .vae_options import VaeOptions


def train_vae(options: VaeOptions, accelerator: Accelerator | None = None) -> dict:
    """Train, derive the scaling factor, save; returns the metrics written to ``vae_metrics.json``.

    The output folder is checked (writable, holding no other VAE unless ``--overwrite_output_dir``) and a
    train split smaller than the batch trains with a batch of the whole split (said once), all before
    the first step."""
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    keep_freed_memory_for_cpu_training()
    out = Path(options.output_dir)
    if (out / "config.json").exists() and not options.overwrite_output_dir:
        raise ValueError(f"output_dir {str(out)!r} already holds a VAE: pass --overwrite_output_dir or another --output_dir")
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
        accelerator.print(f"VAE stage: the train split has {len(train)} images, fewer than the batch of "
                          f"{options.train_batch_size}: training with batches of {batch_size}")  # fmt: skip
    generator = torch.Generator().manual_seed(options.seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate_images, generator=generator)  # fmt: skip
    optimizer = torch.optim.AdamW(vae.parameters(), lr=options.learning_rate)
    schedule = _one_cycle(optimizer, options.learning_rate, options.max_train_steps)
    model, optimizer, loader = accelerator.prepare(_AutoencoderWithKL(vae), optimizer, loader)
    start, step = time.perf_counter(), 0
    progress = tqdm(total=options.max_train_steps, desc="vae", disable=not accelerator.is_main_process)
    while step < options.max_train_steps:
        if len(loader) == 0:  # cannot happen with batch <= split, but a loop must never spin without progress
            raise RuntimeError(f"the VAE's data loader yields no batch (train split {len(train)}, batch {batch_size})")
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
            if step >= options.max_train_steps:
                break
    progress.close()
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
        out = Path(options.output_dir)
        vae.save_pretrained(out)
        (out / "vae_metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "training_options.json").write_text(to_json(options))
        follow_umask(out)  # safetensors writes its files 0600
    accelerator.wait_for_everyone()
    return metrics


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
