"""``SkipDiffPipeline``: sample from a skipdiff UNet, in pixel space or through a VAE.

A ``DiffusionPipeline`` with components ``unet`` (any diffusers UNet2DModel, e.g.
:class:`~skipdiff.SkipUNet2DModel`), ``scheduler`` and an optional ``vae``; it saves and loads with
``save_pretrained`` / ``SkipDiffPipeline.from_pretrained(folder)`` like any diffusers pipeline. A
training run's output folder is such a pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .encoders import PixelEncoder, VaeEncoder

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


class SkipDiffPipeline(DiffusionPipeline):
    """Unconditional or class-conditional sampling; latents are decoded by the VAE when present."""

    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae: AutoencoderKL | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    def encoder(self):
        """The pipeline's pixel/latent encoder (see :mod:`skipdiff.encoders`)."""
        if self.vae is None:
            return PixelEncoder(self.unet.config.in_channels)
        return VaeEncoder(self.vae)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 16,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        show_progress: bool = True,
    ):
        """Draw ``batch_size`` samples.

        Args:
            class_labels: one label per sample for class-conditional UNets (``num_class_embeds``).
            sampler: ``"ddpm"`` or ``"ddim"`` to sample with that scheduler built from the
                pipeline's scheduler config; ``None`` uses the pipeline's scheduler as it is.
            output_type: ``"pil"``, ``"np"`` (B, H, W, C) in [0, 1], or ``"pt"`` (B, C, H, W) in [-1, 1].
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        scheduler = self._scheduler_for(sampler)
        labels = self._class_labels(class_labels, batch_size)
        config = self.unet.config
        size = (
            config.sample_size if isinstance(config.sample_size, list | tuple) else (config.sample_size,) * 2
        )
        latents = randn_tensor((batch_size, config.in_channels, *size), generator=generator, device=self.device,
                               dtype=self.unet.dtype)  # fmt: skip
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
        timesteps = self.progress_bar(scheduler.timesteps) if show_progress else scheduler.timesteps
        for t in timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            noise_pred = self.unet(model_input, t, class_labels=labels).sample
            latents = scheduler.step(noise_pred, t, latents, generator=generator, **step_kwargs).prev_sample
        images = self.encoder().decode(latents).clamp(-1, 1)
        if output_type == "pt":
            result = images
        else:
            array = ((images + 1) / 2).permute(0, 2, 3, 1).cpu().float().numpy()
            result = array if output_type == "np" else numpy_to_pil(array)
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    def _scheduler_for(self, sampler: str | None):
        if sampler is None:
            return self.scheduler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
        return SAMPLERS[sampler].from_config(self.scheduler.config)

    def _class_labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        conditional = self.unet.config.num_class_embeds is not None
        if class_labels is None:
            if conditional:
                raise ValueError("this UNet is class-conditional: pass class_labels (one per sample)")
            return None
        if not conditional:
            raise ValueError("class_labels given, but this UNet is unconditional")
        labels = torch.as_tensor(class_labels, device=self.device, dtype=torch.long)
        if labels.shape != (batch_size,):
            raise ValueError(f"need {batch_size} class labels, got shape {tuple(labels.shape)}")
        return labels


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> PIL images (grey when C == 1)."""
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def image_grid(images: list[Image.Image], columns: int = 8, scale: int = 1) -> Image.Image:
    """Tile PIL images into one grid (rows filled left to right), optionally upscaled."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid
