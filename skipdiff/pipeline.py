"""``SkipDiffPipeline``: sample from a skipdiff UNet, in pixel space or through a VAE.

A ``DiffusionPipeline`` with components ``unet`` (any diffusers UNet2DModel, e.g.
:class:`~skipdiff.SkipUNet2DModel`), ``scheduler`` and an optional ``vae``; it saves and loads with
``save_pretrained`` / ``SkipDiffPipeline.from_pretrained(folder)`` like any diffusers pipeline. A
training run's output folder is such a pipeline, written by :func:`skipdiff.export.export_pipeline`
with this module's code bundled in it, so that diffusers alone loads it with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.

A run folder's weights (:func:`weights_layout`): ``unet/`` holds the weights to sample from (the EMA
weights when the run kept an EMA), ``unet_raw/`` the raw ones; folders saved before that layout hold
the raw weights in ``unet/`` and the EMA weights in ``unet_ema/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import numpy_to_pil
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from .encoders import PixelEncoder, VaeEncoder
from .skips.caching import skip_cache
from .skips.unet import SkipUNet2DModel

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
# Present in a folder while an export moves its files in (skipdiff.export.export_pipeline): a folder that still
# holds it was stopped mid-way (a full disk, a kill), its weights possibly missing (no unet_raw/) or mixed.
UNFINISHED_EXPORT = ".export-unfinished"


def check_export_finished(folder: str | os.PathLike) -> None:
    """Refuse a folder whose export did not finish (:data:`UNFINISHED_EXPORT`): a ``ValueError`` naming it
    and what to do, instead of loading weights that may be missing or from two exports."""
    if (Path(folder) / UNFINISHED_EXPORT).exists():
        raise ValueError(
            f"{str(folder)!r} holds an unfinished export ({UNFINISHED_EXPORT}: it was stopped while "
            "writing, by a full disk or a kill), so its weights may be missing or mixed: write it again "
            "(a training run: its command with --resume_from_checkpoint latest)"
        )


def weights_layout(folder: str | os.PathLike) -> dict[str, str | None]:
    """``{"ema": subfolder or None, "raw": subfolder}``: where a run folder keeps its EMA and raw weights."""
    folder = Path(folder)
    if (folder / "unet_ema").is_dir():  # saved before unet/ held the EMA weights
        return {"ema": "unet_ema", "raw": "unet"}
    if (folder / "unet_raw").is_dir():
        return {"ema": "unet", "raw": "unet_raw"}
    return {"ema": None, "raw": "unet"}  # no EMA: unet/ holds the raw weights


def weights_subfolder(folder: str | os.PathLike, use_ema: bool = True) -> str:
    """The subfolder to sample from: the EMA weights when asked for and saved, else the raw ones."""
    layout = weights_layout(folder)
    return layout["ema"] if use_ema and layout["ema"] else layout["raw"]


class SkipDiffPipeline(DiffusionPipeline):
    """Unconditional or class-conditional sampling; latents are decoded by the VAE when present."""

    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae: AutoencoderKL | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``, reading the classes a run folder bundles as this installed code.

        An exported folder's ``model_index.json`` names the code it carries
        (``["skipdiff_pipeline", "SkipDiffPipeline"]``, ``["skipdiff_unet", "SkipUNet2DModel"]``), which
        diffusers would import from the folder, and only with ``trust_remote_code=True``. This class is
        that code, so it loads the folder with its own classes and runs nothing from the folder."""
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        name = config.get("_class_name")
        if isinstance(name, list) and len(name) == 2 and name[1] == SkipDiffPipeline.__name__:
            config["_class_name"] = cls.__name__
        for key, value in config.items():
            if isinstance(value, list) and len(value) == 2 and value[1] == SkipUNet2DModel.__name__:
                config[key] = [SkipUNet2DModel.__module__, SkipUNet2DModel.__name__]
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, use_ema: bool = True, **kwargs):
        """Load a run folder or Hub repo: with its EMA weights by default, ``use_ema=False`` for the raw
        ones (see :func:`weights_layout`); other arguments as diffusers' ``from_pretrained``.

        A Hub repo is downloaded first (only the files this needs): diffusers' own download would
        resolve, and so need to trust, the code the repo bundles, which this class replaces."""
        source = str(pretrained_model_name_or_path)
        folder = Path(source) if Path(source).is_dir() else _download(source, use_ema, kwargs)
        check_export_finished(folder)
        subfolder = weights_subfolder(folder, use_ema)
        if subfolder != "unet" and "unet" not in kwargs:
            dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
            kwargs["unet"] = SkipUNet2DModel.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype)
        pipeline = super().from_pretrained(folder, **kwargs)
        pipeline.register_to_config(_name_or_path=source)
        return pipeline

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
        cache=None,
    ):
        """Draw ``batch_size`` samples.

        Args:
            class_labels: one label per sample for class-conditional UNets (``num_class_embeds``).
            sampler: ``"ddpm"`` or ``"ddim"`` to sample with that scheduler built from the
                pipeline's scheduler config; ``None`` uses the pipeline's scheduler as it is.
            output_type: ``"pil"``, ``"np"`` (B, H, W, C) in [0, 1], or ``"pt"`` (B, C, H, W) in [-1, 1].
            cache: a :class:`~skipdiff.skips.cache_options.SkipCacheOptions` to sample with skip-branch caching or
                encoder propagation for this call (``skipdiff.skips.caching``); None samples as the UNet is (a
                cache put on it with ``enable_skip_cache`` follows this call's scheduler).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        scheduler = self._scheduler_for(sampler)
        labels = self._class_labels(class_labels, batch_size)
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, list | tuple) else (config.sample_size,) * 2
        latents = randn_tensor(
            (batch_size, config.in_channels, *size), generator=generator, device=self.device, dtype=self.unet.dtype
        )
        latents = latents * scheduler.init_noise_sigma
        with skip_cache(self.unet, cache, scheduler):
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


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def _download(repo_id: str, use_ema: bool, kwargs: dict) -> Path:
    """Fetch what :meth:`SkipDiffPipeline.from_pretrained` needs from a Hub repo (Hub arguments are
    taken out of ``kwargs``); returns the local snapshot folder."""
    hub = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
    weights = ["unet_ema/*"] if use_ema else ["unet_raw/*"]  # unet_ema/: repos saved before unet/ held the EMA
    patterns = ["model_index.json", "scheduler/*", "vae/*", "unet/*", *weights]
    return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["*.py"], **hub))
