"""Held-out denoising loss per timestep bucket, deterministic from run to run.

Every held-out image is noised once in every bucket. Its timestep inside the bucket and its Gaussian
noise come from a generator of its own, seeded with ``derived_seed(seed, image index, bucket)``: two
evaluations of the same model give the same numbers bit for bit, two models (or skip variants) are
compared on identical noise, and the numbers do not depend on the batch size.

Images are encoded once per batch (the target's encoder: pixels, a VAE, a VQ model) and conditioned
once per batch (class labels, or captions through the pipeline's own text encoder); see
:func:`prepared_batches`. :mod:`.importance` reuses the same noised batches for every ablation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..diffusion import training_target
from ..encoders import batch_latents
from ..seeding import derived_seed

UnetKwargs = Callable[[dict], dict]  # data batch -> the UNet's conditioning keyword arguments


def bucket_edges(num_train_timesteps: int, buckets: int) -> torch.Tensor:
    """``buckets + 1`` integer edges splitting [0, num_train_timesteps) evenly."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return torch.linspace(0, num_train_timesteps, buckets + 1).round().long()


def bucket_draws(
    indices: list[int], bucket: int, low: int, high: int, shape: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (B,) in [low, high) and noise (B, *shape) of images ``indices`` in ``bucket``."""
    timesteps, noise = [], []
    for index in indices:
        generator = torch.Generator().manual_seed(derived_seed(seed, index, bucket))
        timesteps.append(torch.randint(low, high, (1,), generator=generator))
        noise.append(torch.randn((1, *shape), generator=generator))
    return torch.cat(timesteps), torch.cat(noise)


@torch.no_grad()
def prepared_batches(
    encoder, batches, unet_kwargs: UnetKwargs | None, device, seed: int = 0
) -> Iterator[tuple[list[int], torch.Tensor, dict]]:
    """``(image indices, latents (B, C, h, w), UNet kwargs)`` per data batch: encoded and conditioned once."""
    start = 0
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        generator = torch.Generator().manual_seed(derived_seed(seed, start, 1 << 20))  # a sampled posterior only
        latents = batch_latents(encoder, batch, generator=generator)
        indices = list(range(start, start + latents.shape[0]))
        start += latents.shape[0]
        yield indices, latents, (unet_kwargs(batch) if unet_kwargs else {})


def predict(unet, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The UNet's output for ``noisy`` (B, C, h, w) in float32 (the UNet runs in its own dtype)."""
    return unet(noisy.to(unet.dtype), timesteps, **kwargs).sample.float()


def per_example_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error per example."""
    return (prediction - target).square().mean(dim=tuple(range(1, prediction.ndim)))


def noised_buckets(scheduler, prepared, buckets: int, seed: int):
    """For every prepared batch and bucket: ``(bucket, noisy (B, C, h, w), timesteps (B,), target, kwargs)``.

    The target is what the UNet should predict for the scheduler's ``prediction_type``."""
    edges = bucket_edges(scheduler.config.num_train_timesteps, buckets)
    for indices, latents, kwargs in prepared:
        for b in range(buckets):
            low, high = int(edges[b]), max(int(edges[b + 1]), int(edges[b]) + 1)
            timesteps, noise = bucket_draws(indices, b, low, high, tuple(latents.shape[1:]), seed)
            timesteps, noise = timesteps.to(latents.device), noise.to(latents.device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            yield b, noisy, timesteps, training_target(scheduler, latents, noise, timesteps).float(), kwargs


def bucket_summary(per_example: torch.Tensor, edges: torch.Tensor, seed: int) -> dict:
    """``{"buckets": [{"t_min", "t_max", "loss"}], "mean", "per_example", "settings"}`` of (N, buckets) losses."""
    means = per_example.mean(dim=0)
    buckets = per_example.shape[1]
    return {
        "buckets": [
            {"t_min": int(edges[b]), "t_max": int(edges[b + 1]) - 1, "loss": float(means[b])} for b in range(buckets)
        ],
        "mean": float(means.mean()),
        "per_example": per_example,
        "settings": {
            "buckets": buckets,
            "seed": seed,
            "num_images": int(per_example.shape[0]),
            "noise": "derived_seed(seed, image index, bucket) per image",
        },
    }


@torch.no_grad()
def denoising_loss_by_bucket(
    unet,
    scheduler,
    encoder,
    batches,
    buckets: int = 10,
    seed: int = 0,
    conditional: bool = False,
    unet_kwargs: UnetKwargs | None = None,
) -> dict:
    """Mean denoising MSE on ``batches`` (dicts with ``pixel_values``[, ``labels``, ``captions``]) per bucket.

    ``unet_kwargs(batch)`` gives the UNet's conditioning (``conditional=True`` is a shortcut for class
    labels). Returns ``{"buckets": [{"t_min", "t_max", "loss"}], "mean": float, "per_example": (N, buckets)
    tensor, "settings": {...}}``; ``mean`` averages the buckets with equal weight (uniform t).
    """
    edges = bucket_edges(scheduler.config.num_train_timesteps, buckets)
    if unet_kwargs is None and conditional:
        unet_kwargs = _class_labels
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    rows, columns = [], []
    try:
        prepared = prepared_batches(encoder, batches, unet_kwargs, device, seed)
        for b, noisy, timesteps, target, kwargs in noised_buckets(scheduler, prepared, buckets, seed):
            columns.append(per_example_mse(predict(unet, noisy, timesteps, kwargs), target).cpu())
            if b == buckets - 1:
                rows.append(torch.stack(columns, dim=1))
                columns = []
    finally:
        unet.train(was_training)
    return bucket_summary(torch.cat(rows).double(), edges, seed)  # per_example: (N, buckets)


def _class_labels(batch: dict) -> dict:
    return {"class_labels": batch["labels"]}
