"""Sampling a study target with fixed noise per image, so that two skip variants meet the same noise.

Image ``i`` of sampling seed ``s`` has its own generator, seeded with ``derived_seed(s, i, 0)``: its
starting noise and every stochastic sampler step (DDPM) come from it. An image therefore depends only on
(seed, index, prompt), never on the batch it was drawn in or on the other images, and a skip variant
sampled with the same seed starts from exactly the same noise as the original model.

* Unconditional and class-conditional targets (skipdiff runs, DDPM/DDIM, LDM) run the sampling loop of
  diffusers' ``DDPMPipeline`` / skipdiff's ``SkipDiffPipeline`` (:func:`denoise_latents`; tested equal to
  both) and decode with the target's encoder.
* Text-conditioned targets (Stable Diffusion, SDXL) run their pipeline's own ``__call__`` with the prompt
  embeddings computed once per batch (:meth:`~skipdiff.conditioning.TextConditioning.prompt_embeddings`)
  and the starting latents drawn here.

``sampler`` is ``ddim`` or ``ddpm`` (a scheduler of that class built from the pipeline's scheduler
config) or ``pipeline`` (the scheduler the pipeline was saved with, e.g. PNDM for Stable Diffusion 1.x).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from .seeding import derived_seed
from .skips.caching import skip_cache

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
SAMPLER_CHOICES = ("ddim", "ddpm", "pipeline")


@dataclasses.dataclass
class Samples:
    """Images (N, C, H, W) in [-1, 1] on the CPU, the prompt of each (text targets), and how many images the
    pipeline's safety checker replaced (None when it has none)."""

    images: torch.Tensor
    prompts: list[str] | None = None
    flagged: int | None = None


def image_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per image index: ``derived_seed(seed, index, 0)``."""
    return [torch.Generator().manual_seed(derived_seed(seed, index, 0)) for index in indices]


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, *shape) float32 standard normal noise, row b drawn from ``generators[b]`` (as ``randn_tensor``)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


def sampling_scheduler(scheduler, sampler: str):
    """The scheduler to sample with: ``sampler``'s class from ``scheduler``'s config, or ``scheduler`` itself."""
    if sampler == "pipeline":
        return scheduler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLER_CHOICES}")
    return SAMPLERS[sampler].from_config(scheduler.config)


@torch.no_grad()
def denoise_latents(
    unet,
    scheduler,
    noise: torch.Tensor,
    steps: int,
    generators: list[torch.Generator],
    unet_kwargs: dict | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (B, C, h, w) with ``scheduler`` for ``steps`` steps: diffusers'
    DDPM/DDIM pipeline loop. Stochastic steps draw from the per-image ``generators``."""
    device = next(unet.parameters()).device
    latents = noise.to(device=device, dtype=unet.dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    generator = generators if len(generators) > 1 else generators[0]
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        prediction = unet(model_input, t, **(unet_kwargs or {})).sample
        latents = scheduler.step(prediction, t, latents, generator=generator, **step_kwargs).prev_sample
    return latents


def sample_images(
    target,
    count: int,
    seed: int,
    *,
    steps: int = 50,
    sampler: str = "ddim",
    batch_size: int = 64,
    prompts: list[str] | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    resolution: int | None = None,
    start: int = 0,
    progress: bool = True,
    cache=None,
) -> Samples:
    """``count`` images of ``target`` (images ``start .. start+count-1`` of ``seed``), in batches.

    Text targets need ``prompts`` (image ``i`` gets ``prompts[i % len(prompts)]``); class-conditional ones
    get labels ``i % num_classes``. ``guidance_scale`` None keeps the pipeline's default. ``cache`` (a
    :class:`~skipdiff.skips.cache_options.SkipCacheOptions`) samples with skip-branch caching or encoder propagation.
    """
    if count < 1 or batch_size < 1:
        raise ValueError(f"count and batch_size must be >= 1, got {count} and {batch_size}")
    if target.text_conditioned and not prompts:
        raise ValueError(
            f"{target.source!r} is text-conditioned: sampling needs prompts (--prompts FILE or --caption_column)"
        )
    chunks, used, flagged = [], [], None
    batches = range(start, start + count, batch_size)
    for first in tqdm(batches, desc=f"sampling (seed {seed})", leave=False, disable=not progress):
        indices = list(range(first, min(first + batch_size, start + count)))
        generators = image_generators(seed, indices)
        if target.text_conditioned:
            batch_prompts = [prompts[i % len(prompts)] for i in indices]
            images, batch_flagged = _sample_text(
                target, batch_prompts, generators, steps, sampler, guidance_scale, negative_prompt, resolution, cache
            )
            used += batch_prompts
            if batch_flagged is not None:
                flagged = (flagged or 0) + batch_flagged
        else:
            images = _sample_unconditional(target, indices, generators, steps, sampler, resolution, cache)
        chunks.append(images.float().cpu())
    return Samples(torch.cat(chunks), used or None, flagged)


def _sample_unconditional(target, indices, generators, steps, sampler, resolution, cache=None) -> torch.Tensor:
    scheduler = sampling_scheduler(target.scheduler, sampler)
    noise = initial_noise(target.latent_shape(resolution), generators)  # (B, C, h, w)
    kwargs = {}
    if target.conditioning.kind == "class":
        kwargs["class_labels"] = torch.tensor(target.conditioning.labels_for(indices), device=target.device)
    with skip_cache(target.unet, cache, scheduler):
        latents = denoise_latents(target.unet, scheduler, noise, steps, generators, kwargs)
    return target.encoder.decode(latents).clamp(-1, 1)


def _sample_text(target, prompts, generators, steps, sampler, guidance_scale, negative_prompt, resolution, cache=None):
    """Images (B, 3, H, W) in [-1, 1] from the pipeline's own ``__call__``, and how many it flagged."""
    pipeline = target.pipeline
    guidance = (guidance_scale if guidance_scale is not None else default_guidance_scale(pipeline)) > 1
    embeddings = target.conditioning.prompt_embeddings(prompts, guidance, negative_prompt)
    side = resolution or target.resolution
    noise = initial_noise(target.latent_shape(side), generators).to(target.device, target.unet.dtype)
    original = pipeline.scheduler
    pipeline.scheduler = sampling_scheduler(original, sampler)
    try:
        call = {"guidance_scale": guidance_scale} if guidance_scale is not None else {}
        with skip_cache(target.unet, cache, pipeline.scheduler):
            out = pipeline(
                **embeddings,
                latents=noise,
                generator=generators,
                num_inference_steps=steps,
                height=side,
                width=side,
                output_type="pt",
                **call,
            )
    finally:
        pipeline.scheduler = original
    flags = getattr(out, "nsfw_content_detected", None)
    flagged = None if flags is None else sum(bool(f) for f in flags)
    return out.images.float() * 2 - 1, flagged


def default_guidance_scale(pipeline) -> float:
    """The classifier-free guidance scale a pipeline's ``__call__`` uses when none is given (7.5 for Stable
    Diffusion; above 1, every step runs the UNet on a doubled batch)."""
    return inspect.signature(type(pipeline).__call__).parameters["guidance_scale"].default
