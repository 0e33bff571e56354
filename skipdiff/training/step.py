"""One optimizer step of the diffusion loop, without a single host synchronisation.

A training step is: draw noise and timesteps (for the whole data-parallel batch, each process keeping
its slice, :func:`skipdiff.seeding.rank_share`), compute per-example losses, backward, clip, and step
the optimizer, unless the loss or the gradient is not finite. That "unless" is decided on the device:

    finite = isfinite(loss on every process) & isfinite(gradient norm)      (a 0-d bool tensor)

and handed to the fused AdamW kernel as its ``found_inf`` flag (the mechanism ``torch.amp.GradScaler``
uses), which skips the update and its step count on the device; the EMA takes the same flag
(:class:`~skipdiff.training.ema.WeightEMA`). Nothing in a step reads a tensor's value on the host,
so on a GPU the host queues step after step while the device works; the loop reads its
bookkeeping once per logging step (:class:`~skipdiff.training.telemetry.WindowStats`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..diffusion import per_example_loss
from ..seeding import rank_share


@dataclasses.dataclass
class Noise:
    """What one batch is noised with: ``noise`` is the target's noise, ``input_noise`` the noise mixed into
    the UNet's input (they differ under input perturbation), ``timesteps`` one per example."""

    noise: torch.Tensor  # (B, C, H, W)
    input_noise: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,)


def draw_noise(
    latents: torch.Tensor, num_train_timesteps: int, noise_offset: float = 0.0, input_perturbation: float = 0.0
) -> Noise:
    """Noise and timesteps for a batch of latents, drawn on their device for the global batch.

    ``noise_offset`` adds ``noise_offset * N(0, 1)`` per example and channel (constant over pixels), so
    the model learns to change an image's mean brightness (Guttenberg, 2023; diffusers' examples).
    ``input_perturbation`` feeds the UNet ``noise + input_perturbation * N(0, 1)`` while the target keeps
    ``noise`` (Ning et al., 2023)."""
    size, shape, device = latents.shape[0], tuple(latents.shape[1:]), latents.device
    noise = rank_share(lambda n: torch.randn(n, *shape, device=device), size).to(latents.dtype)
    if noise_offset:
        offsets = rank_share(lambda n: torch.randn(n, shape[0], 1, 1, device=device), size)
        noise = noise + noise_offset * offsets.to(latents.dtype)
    input_noise = noise
    if input_perturbation:
        extra = rank_share(lambda n: torch.randn(n, *shape, device=device), size).to(latents.dtype)
        input_noise = noise + input_perturbation * extra
    timesteps = rank_share(lambda n: torch.randint(0, num_train_timesteps, (n,), device=device), size)
    return Noise(noise, input_noise, timesteps)


def batch_loss(
    unet, scheduler, latents: torch.Tensor, noise: Noise, unet_kwargs: dict, snr_gamma: float | None
) -> torch.Tensor:
    """Per-example denoising losses (B,) of one batch (see :func:`skipdiff.diffusion.per_example_loss`)."""
    return per_example_loss(
        unet,
        scheduler,
        latents,
        noise.noise,
        noise.timesteps,
        snr_gamma=snr_gamma,
        input_noise=noise.input_noise,
        unet_kwargs=unet_kwargs,
    )


def all_finite(accelerator, loss: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: ``loss`` is finite on every process (one device all-reduce with several)."""
    finite = torch.isfinite(loss.detach())
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.float().reshape(1), "sum")[0] == accelerator.num_processes
    return finite


def gradient_norm(accelerator, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping (a device tensor), clipping to ``max_norm`` when > 0."""
    if max_norm > 0:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=accelerator.device)
    return torch.nn.utils.get_total_norm(grads)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def supports_skip_on_device(optimizer) -> bool:
    """Whether the optimizer takes a ``found_inf`` flag (fused Adam/AdamW/SGD); others need a host read."""
    inner = inner_optimizer(optimizer)
    return bool(getattr(inner, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in inner.param_groups
    )


def optimizer_step(optimizer, finite: torch.Tensor) -> None:
    """Step ``optimizer`` unless ``finite`` is False, decided on the device when the optimizer allows.

    Fused optimizers skip on their ``found_inf`` flag (no host read; their step count stays put); any
    other optimizer (bitsandbytes' 8-bit AdamW) reads the flag once, a host synchronisation per step."""
    inner = inner_optimizer(optimizer)
    if supports_skip_on_device(optimizer):
        inner.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif bool(finite):
        optimizer.step()
