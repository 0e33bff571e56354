"""The pixel/latent encoder interface: which latent is trained on, and how samplers may clip."""

import torch
from diffusers import AutoencoderKL

from skipdiff.diffusion import make_scheduler
from skipdiff.encoders import PixelEncoder, VaeEncoder, batch_latents
from skipdiff.presets import vae_config


def tiny_vae() -> VaeEncoder:
    torch.manual_seed(0)
    return VaeEncoder(AutoencoderKL(**vae_config("tiny", 1)))


def test_pixels_are_clipped_while_sampling_latents_are_not():
    pixel = make_scheduler(1000, "linear", "epsilon", PixelEncoder(1).sample_range)
    latent = make_scheduler(1000, "linear", "epsilon", tiny_vae().sample_range)
    assert pixel.config.clip_sample and pixel.config.clip_sample_range == 1.0
    assert not latent.config.clip_sample  # clipping unit-variance latents to [-1, 1] ruins samples


def test_latents_are_the_posterior_mean_unless_sampling_is_asked_for():
    encoder = tiny_vae()
    pixels = torch.rand(4, 1, 8, 8) * 2 - 1
    mean, std = encoder.latent_params(pixels)
    assert std.min() > 0
    assert torch.equal(batch_latents(encoder, {"pixel_values": pixels}), mean)
    cached = {"latent_mean": mean, "latent_std": std}
    assert torch.equal(batch_latents(encoder, cached), mean)  # cached and uncached give the same latent
    encoder.sample_posterior = True
    first = batch_latents(encoder, cached, generator=torch.Generator().manual_seed(1))
    again = batch_latents(encoder, cached, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, mean)
    assert torch.equal(batch_latents(PixelEncoder(1), {"pixel_values": pixels}), pixels)
