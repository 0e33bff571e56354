"""Pixel space vs latent space behind one interface (the training loop never asks which).

``PixelEncoder`` is the identity; ``VaeEncoder`` wraps a frozen diffusers ``AutoencoderKL`` and
owns the latent scaling (the only place in skipdiff that knows about it)::

    z = (vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor
    x = vae.decode(z / scaling_factor + shift_factor)

``VqEncoder`` wraps the ``VQModel`` of a latent diffusion (LDM) pipeline: its latents are the
encoder's pre-quantisation output, quantised again by the decoder (as ``LDMPipeline`` decodes them)::

    z = vqvae.encode(x).latents * scaling_factor
    x = vqvae.decode(z / scaling_factor)

The scaling factor of a VAE trained here is derived from the data (1 / std of the unscaled
latents of the train split, :func:`data_scaling_factor`) and stored in the VAE's config.

Both encoders read a batch either as pixels (``batch["pixel_values"]``) or, when latents were
cached (:func:`cache_encoded`), as the latent distribution's parameters (``batch["latent_mean"]``,
``batch["latent_std"]``), exactly as encoding every step would.

Which latent: by default the posterior's mean. diffusers' training examples draw
``latent_dist.sample()`` instead (``sample_posterior=True``, ``--sample_latents``), which suits
Stable Diffusion's VAE, whose posterior std is tiny. A small VAE trained here can end with a
posterior std as large as the spread of its means (measured on digits: 0.97 vs 1.0 after scaling)
while its decoder still reconstructs from the mean (MSE 9.5e-4): sampled latents then carry noise
the UNet cannot learn, and a diffusion model trained on them produced no recognisable digits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn
from torch.utils.data import Dataset

from .seeding import rank_share


class PixelEncoder(nn.Module):
    """Train in pixel space: latents are the images in [-1, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.downscale = 1
        self.sample_range: float | None = 1.0  # images live in [-1, 1]: samplers may clip x0 to it

    def latent_params(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels, torch.zeros_like(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def describe(self) -> dict:
        return {"kind": "pixel", "channels": self.channels}


class VaeEncoder(nn.Module):
    """A frozen ``AutoencoderKL``; latents are scaled by the VAE config's ``scaling_factor``."""

    def __init__(self, vae: AutoencoderKL, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        # Scaled latents are unbounded (unit variance): clipping x0 to [-1, 1], diffusers' scheduler
        # default, would destroy them (Stable Diffusion's schedulers set clip_sample=False too).
        self.sample_range: float | None = None
        self.channels = vae.config.latent_channels
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def latent_params(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the scaled latent distribution of ``pixels`` (B, C, H, W) in [-1, 1]."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        mean = (dist.mean - self.shift_factor) * self.scaling_factor
        # On a CPU the posterior leaves the VAE's 1x1 quant_conv channels-last (a 1x1 kernel's strides read as
        # channels-last), and a channels-last input switches the UNet's convolutions to that layout without
        # --channels_last asking (4.6% slower per step, bench/step_components.py). The standard layout:
        return mean.float().contiguous(), (dist.std * self.scaling_factor).float().contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    def describe(self) -> dict:
        return {
            "kind": "vae",
            "sample_posterior": self.sample_posterior,
            "channels": self.channels,
            "downscale": self.downscale,
            "scaling_factor": self.scaling_factor,
        }


class VqEncoder(nn.Module):
    """A frozen ``VQModel`` (the first stage of CompVis' latent diffusion models, ``LDMPipeline``).

    A VQ model has no posterior: the latent of an image is the encoder's output before quantisation
    (``latent_params`` returns a zero std), and decoding quantises it. ``scaling_factor`` defaults to
    the VQ config's; the LDM paper trains on unscaled VQ latents ("the VQ-regularized space has a
    variance close to 1"), so a loader passes 1.0 for VQ models whose saved config declares no
    scaling factor (see :func:`skipdiff.targets.load_target`).
    """

    def __init__(self, vqvae: VQModel, scaling_factor: float | None = None):
        super().__init__()
        self.vae = vqvae.eval().requires_grad_(False)
        self.sample_posterior = False
        self.sample_range: float | None = None
        self.channels = vqvae.config.latent_channels
        self.downscale = 2 ** (len(vqvae.config.block_out_channels) - 1)
        self.scaling_factor = float(vqvae.config.scaling_factor if scaling_factor is None else scaling_factor)

    @torch.no_grad()
    def latent_params(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled pre-quantisation latents of ``pixels`` (B, C, H, W) in [-1, 1], and a zero std."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latents.float() * self.scaling_factor
        return latents, torch.zeros_like(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample.float()

    def describe(self) -> dict:
        return {
            "kind": "vq",
            "channels": self.channels,
            "downscale": self.downscale,
            "scaling_factor": self.scaling_factor,
        }


Encoder = PixelEncoder | VaeEncoder | VqEncoder


def batch_latents(
    encoder: Encoder, batch: dict, generator: torch.Generator | None = None, random_flip: bool = False
) -> torch.Tensor:
    """The latent of every image of a batch (pixels or cached latent parameters): the posterior's mean,
    or a sample from it when the encoder's ``sample_posterior`` is set.

    ``random_flip`` mirrors each example with probability 1/2, drawn here from the global RNG for the whole
    data-parallel batch (:func:`skipdiff.seeding.rank_share`), so that the flips are part of the run's
    checkpointed random stream: pixels are flipped before encoding; cached latents carry both orientations
    (:func:`cache_encoded` with ``flips=True``) and the flipped one is picked."""
    flip = None
    if random_flip:
        reference = batch["latent_mean"] if "latent_mean" in batch else batch["pixel_values"]
        flip = rank_share(lambda n: torch.rand(n, device=reference.device) < 0.5, reference.shape[0])
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch.get("latent_std")  # no std for cached pixels
        if flip is not None:
            if "latent_mean_flipped" not in batch:
                raise ValueError("random_flip with cached latents needs both orientations (cache_encoded(flips=True))")
            pick = flip[:, None, None, None]
            mean = torch.where(pick, batch["latent_mean_flipped"], mean)
            std = None if std is None else torch.where(pick, batch["latent_std_flipped"], std)
    else:
        pixels = batch["pixel_values"]
        if flip is not None:
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        mean, std = encoder.latent_params(pixels)
    if not getattr(encoder, "sample_posterior", False) or isinstance(encoder, PixelEncoder):
        return mean  # pixels, or the posterior's mean (see the module docstring)
    noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
    return mean + std * noise


def load_encoder(
    vae: str | None, image_channels: int, cache_dir: str | None = None, sample_posterior: bool = False
) -> Encoder:
    """``None``/``"none"``: pixel space; otherwise a local folder or Hub id of an AutoencoderKL.

    A folder may be a VAE itself or hold one in ``vae/`` (a skipdiff output or a Stable Diffusion
    repository); the same goes for Hub ids (``subfolder="vae"`` is tried second).
    """
    if vae is None or str(vae).lower() == "none":
        return PixelEncoder(image_channels)
    model = _load_vae(str(vae), cache_dir)
    if model.config.in_channels != image_channels:
        raise ValueError(
            f"the VAE {vae!r} takes {model.config.in_channels}-channel images but the dataset has "
            f"{image_channels} channels"
        )
    return VaeEncoder(model, sample_posterior)


def _load_vae(path: str, cache_dir: str | None) -> AutoencoderKL:
    local = Path(path)
    if local.exists():
        subfolder = None if (local / "config.json").exists() else "vae"
        if subfolder and not (local / "vae" / "config.json").exists():
            raise ValueError(f"--vae {path!r} is a folder without an AutoencoderKL (no config.json or vae/config.json)")
        try:
            return AutoencoderKL.from_pretrained(local, subfolder=subfolder)
        except (OSError, ValueError) as err:  # diffusers' "Unable to load weights ..." names no remedy
            where = local / (subfolder or "")
            raise ValueError(
                f"--vae {path!r}: the AutoencoderKL in {str(where)!r} cannot be loaded (missing, "
                f"truncated or half-written weights?): {str(err).splitlines()[0]}; train or "
                "download it again"
            ) from err
    errors = []
    for subfolder in (None, "vae"):
        try:
            return AutoencoderKL.from_pretrained(path, subfolder=subfolder, cache_dir=cache_dir)
        except (OSError, ValueError) as err:
            errors.append(str(err).splitlines()[0])
    raise ValueError(
        f"could not load the VAE {path!r}: not a local folder, and the Hub could not serve it "
        f"(offline, a typo, or a private repo?): {errors[-1]}"
    )


@torch.no_grad()
def data_scaling_factor(vae: AutoencoderKL, loader) -> float:
    """1 / std of the VAE's (unscaled) latent means over a data loader: unit-variance latents."""
    values = [vae.encode(batch["pixel_values"]).latent_dist.mean.flatten() for batch in loader]
    return float(1.0 / torch.cat(values).std())


@torch.no_grad()
def cache_encoded(encoder: Encoder, loader, flips: bool = False) -> dict[str, torch.Tensor]:
    """Encode a whole split once: ``{"latent_mean", "latent_std"[, "labels"]}`` stacked tensors (and
    ``captions``, a list of strings, for captioned data); with ``flips`` also ``latent_mean_flipped`` /
    ``latent_std_flipped``, the latents of the mirrored images."""
    parts: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    for batch in loader:
        pixels = batch["pixel_values"]
        views = {"": pixels, "_flipped": pixels.flip(-1)} if flips else {"": pixels}
        for suffix, view in views.items():
            mean, std = encoder.latent_params(view)
            parts.setdefault(f"latent_mean{suffix}", []).append(mean)
            if not isinstance(encoder, PixelEncoder):  # pixels have no spread: keep half the memory
                parts.setdefault(f"latent_std{suffix}", []).append(std)
        if "labels" in batch:
            parts.setdefault("labels", []).append(batch["labels"])
        captions += list(batch.get("captions", []))
    cached = {key: torch.cat(values) for key, values in parts.items()}
    return {**cached, "captions": captions} if captions else cached


class CachedLatents(Dataset):
    """Rows of pre-encoded latent distributions (see :func:`cache_encoded`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["latent_mean"])

    @staticmethod
    def collate(rows: list[dict] | dict) -> dict:
        """Stack tensors; captions stay a list of strings. A batch from :meth:`__getitems__` is one already."""
        if isinstance(rows, dict):
            return rows
        return {
            key: [r[key] for r in rows] if key == "captions" else torch.stack([r[key] for r in rows]) for key in rows[0]
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch (the DataLoader's batched fetch): one indexing per tensor rather than a dict per row
        and a stack, the same values as :meth:`collate` of the rows."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {
            key: [value[i] for i in indices] if key == "captions" else value[index]
            for key, value in self.tensors.items()
        }
