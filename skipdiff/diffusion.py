"""The denoising objective shared by training and evaluation."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def make_scheduler(
    num_train_timesteps: int, beta_schedule: str, prediction_type: str, sample_range: float | None = 1.0
) -> DDPMScheduler:
    """The DDPM noise scheduler that drives training (and, converted to DDIM, sampling).

    ``sample_range`` is the encoder's: predicted x0 is clipped to [-range, range] while sampling,
    or not at all for ``None`` (latents).
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=sample_range is not None,
        clip_sample_range=sample_range or 1.0,
    )


def training_target(scheduler: DDPMScheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet should output for the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), as diffusers' training examples compute them."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # x0-prediction: weight min(SNR, gamma)


def per_example_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    input_noise: torch.Tensor | None = None,
    unet_kwargs: dict | None = None,
) -> torch.Tensor:
    """MSE between the UNet's output and its target, one value per example (B,).

    ``input_noise`` (default ``noise``) is what noises the UNet's input; the target is built from ``noise``
    (they differ under input perturbation). ``unet_kwargs`` holds the conditioning (``class_labels``,
    ``encoder_hidden_states``, ...); ``class_labels`` is a shortcut for it."""
    noisy = scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    kwargs = dict(unet_kwargs or {})
    if class_labels is not None:
        kwargs["class_labels"] = class_labels
    prediction = unet(noisy, timesteps, **kwargs).sample
    target = training_target(scheduler, latents, noise, timesteps)
    loss = (prediction.float() - target.float()).square().mean(dim=tuple(range(1, prediction.ndim)))
    if snr_gamma is not None:
        loss = loss * snr_weights(scheduler, timesteps, snr_gamma)
    return loss
