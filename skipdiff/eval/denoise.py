"""Held-out denoising loss per timestep bucket, deterministic from run to run.

Every test image is noised once in every bucket: the timestep inside the bucket, the Gaussian noise
and the latent sample all come from one generator seeded with ``seed``, so two evaluations of the
same model give the same numbers bit for bit, and two models are compared on identical noise.
"""

from __future__ import annotations

import torch

from ..diffusion import per_example_loss
from ..encoders import batch_latents


@torch.no_grad()
def denoising_loss_by_bucket(
    unet,
    scheduler,
    encoder,
    batches: list[dict],
    buckets: int = 10,
    seed: int = 0,
    conditional: bool = False,
) -> dict:
    """Mean denoising MSE on ``batches`` (dicts with ``pixel_values``[, ``labels``]) per bucket.

    Returns ``{"buckets": [{"t_min", "t_max", "loss"}], "mean": float, "per_example": (N, buckets)
    tensor, "settings": {...}}``. ``mean`` averages the buckets with equal weight (uniform t).
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    num_train = scheduler.config.num_train_timesteps
    edges = torch.linspace(0, num_train, buckets + 1).round().long()
    generator = torch.Generator().manual_seed(seed)
    was_training = unet.training
    unet.eval()
    rows = []
    device = next(unet.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        latents = batch_latents(encoder, batch, generator=generator)
        labels = batch.get("labels") if conditional else None
        columns = []
        for b in range(buckets):
            low, high = int(edges[b]), max(int(edges[b + 1]), int(edges[b]) + 1)
            timesteps = torch.randint(low, high, (latents.shape[0],), generator=generator).to(device)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            columns.append(
                per_example_loss(unet, scheduler, latents, noise, timesteps, class_labels=labels).cpu()
            )
        rows.append(torch.stack(columns, dim=1))
    unet.train(was_training)
    per_example = torch.cat(rows).double()  # (N, buckets)
    means = per_example.mean(dim=0)
    return {
        "buckets": [
            {"t_min": int(edges[b]), "t_max": int(edges[b + 1]) - 1, "loss": float(means[b])}
            for b in range(buckets)
        ],
        "mean": float(means.mean()),
        "per_example": per_example,
        "settings": {"buckets": buckets, "seed": seed, "num_images": int(per_example.shape[0])},
    }
