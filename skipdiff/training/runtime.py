"""Pieces of ``train_unet.py`` that are not the loop itself: the accelerator, the VAE stage, the data
loader, validation grids and the saved outputs."""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers import DDIMScheduler
from torch.utils.data import DataLoader, Dataset

from ..data import collate_images, image_transform, with_pixel_values
from ..encoders import Encoder, VaeEncoder, cache_encoded, load_encoder
from ..pipeline import SkipDiffPipeline, image_grid
from .options import TrainOptions
from .vae import VaeOptions, train_vae

logger = logging.getLogger(__name__)


def resolve_mixed_precision(requested: str | None) -> str | None:
    """fp16 needs a GPU: on a CPU-only machine it falls back to fp32 with a warning.

    (Accelerate accepts fp16 on a CPU but silently runs fp32 while reporting "fp16"; see
    stack-facts.) ``None`` keeps the accelerate config's choice.
    """
    if requested == "fp16" and not torch.cuda.is_available():
        warnings.warn("--mixed_precision fp16 needs a CUDA GPU; training in fp32 on this CPU instead "
                      "(bf16 works on CPUs)", stacklevel=2)  # fmt: skip
        return "no"
    return requested


def make_accelerator(options: TrainOptions) -> Accelerator:
    """The run's Accelerator: mixed precision, accumulation, tensorboard, seedable data order."""
    import os

    requested = options.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    project = ProjectConfiguration(project_dir=options.output_dir, logging_dir=str(Path(options.output_dir) / "logs"))
    # `accelerate launch --multi_gpu --num_processes N` on a machine without an accelerator starts N
    # processes, but Accelerate then runs each alone (DistributedType.NO, every one "main") unless
    # asked for CPU processes: with cpu=True they train together over gloo (MULTI_CPU).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(
        cpu=launched and not has_accelerator,
        mixed_precision=resolve_mixed_precision(requested),
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        log_with=None if options.report_to == "none" else options.report_to,
        project_config=project,
        # A seedable sampler makes each epoch's order a function of (seed, epoch), so a resumed
        # run sees exactly the batches an uninterrupted one would.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def auto_vae_dir(options: TrainOptions) -> Path:
    """Where ``--vae auto`` keeps the VAE it trains: ``runs/vae-<dataset>-<resolution>``."""
    source = options.train_data_dir or options.dataset_name or options.dataset
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(source)).strip("_")
    return Path("runs") / f"vae-{name}-{options.resolution}"


def prepare_encoder(options: TrainOptions, accelerator: Accelerator, image_channels: int) -> tuple[Encoder, str]:
    """Load the encoder; with ``--vae auto`` train the VAE stage first unless it exists."""
    vae = options.vae
    if vae == "auto":
        folder = auto_vae_dir(options)
        if not (folder / "config.json").exists():
            accelerator.print(f"--vae auto: training the VAE stage into {folder} (reused by later runs)")
            train_vae(VaeOptions(dataset=options.dataset, dataset_name=options.dataset_name,
                                 train_data_dir=options.train_data_dir, image_column=options.image_column,
                                 resolution=options.resolution, split_seed=options.split_seed,
                                 preset=options.vae_preset, seed=options.seed, output_dir=str(folder)))
            # train_vae makes its own Accelerator object (sharing the process state), so the VAE never
            # joins this run's checkpoints.
        vae = str(folder)
    return load_encoder(vae, image_channels, options.cache_dir, options.sample_latents), vae


class CachedLatents(Dataset):
    """Rows of pre-encoded latent distributions (see :func:`skipdiff.encoders.cache_encoded`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["latent_mean"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def train_loader(options: TrainOptions, split, encoder: Encoder, channels: int) -> DataLoader:
    """The training DataLoader: images transformed on access, or latents encoded once."""
    transform = image_transform(options.resolution, channels, center_crop=options.center_crop,
                                random_flip=options.random_flip)  # fmt: skip
    images = with_pixel_values(split, transform)
    if options.cache_latents:
        if options.random_flip:
            raise ValueError("--cache_latents encodes each image once, so it cannot be combined with --random_flip")
        encode_loader = DataLoader(images, batch_size=256, collate_fn=collate_images)
        dataset = CachedLatents(cache_encoded(encoder, encode_loader))
        collate = None
    else:
        dataset, collate = images, collate_images
    if len(dataset) < options.train_batch_size:
        raise ValueError(f"the train split has {len(dataset)} images, fewer than --train_batch_size {options.train_batch_size}")
    # Its own generator: creating an iterator draws a base seed from it, not from the global RNG that
    # the noise comes from (else a resumed run, which creates one more iterator, draws other noise).
    return DataLoader(dataset, batch_size=options.train_batch_size, shuffle=True, drop_last=True,
                      collate_fn=collate, num_workers=options.dataloader_num_workers,
                      generator=torch.Generator().manual_seed(options.seed))  # fmt: skip


def make_pipeline(unet, scheduler, encoder: Encoder) -> SkipDiffPipeline:
    """The run's sampling pipeline (DDIM for sampling, built from the training scheduler's config)."""
    vae = encoder.vae if isinstance(encoder, VaeEncoder) else None
    return SkipDiffPipeline(unet=unet, scheduler=scheduler, vae=vae)


@torch.no_grad()
def sample_grid(pipeline: SkipDiffPipeline, options: TrainOptions, num_classes: int | None, seed: int = 0):
    """A grid of validation samples (one row per class when class-conditional), seeded."""
    count = options.num_validation_images
    labels = [i % num_classes for i in range(count)] if num_classes else None
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    images = pipeline(batch_size=count, num_inference_steps=options.validation_inference_steps, class_labels=labels,
                      generator=torch.Generator().manual_seed(seed), sampler="ddim",
                      show_progress=False).images  # fmt: skip
    pipeline.unet.train(was_training)
    columns = num_classes if num_classes and num_classes <= 16 else 8
    return image_grid(images, columns=columns, scale=max(1, 128 // images[0].width))


def save_outputs(output_dir: Path, pipeline: SkipDiffPipeline, ema, options_json: str) -> None:
    """The run folder: ``SkipDiffPipeline`` (unet/, vae/, scheduler/), ``unet_ema/``, options."""
    pipeline.save_pretrained(output_dir)
    if ema is not None:
        # A copy of the model holding the EMA weights, so unet_ema/config.json is a plain model config
        # (EMAModel.save_pretrained would add its own keys, which from_pretrained warns about).
        ema_unet = copy.deepcopy(pipeline.unet)
        ema.copy_to(ema_unet.parameters())
        ema_unet.save_pretrained(output_dir / "unet_ema")
    DDIMScheduler.from_config(pipeline.scheduler.config)  # validates that DDIM sampling will load
    (output_dir / "training_options.json").write_text(options_json)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
