"""Options of the VAE stage (``train_scripts/train_vae.py``; ``--vae auto`` builds them from a diffusion
run's options). No heavy imports: ``--help`` answers without torch."""

from __future__ import annotations

import dataclasses
import math

from ..config import option
from ..data_options import DataOptions
from ..presets import VAE_PRESETS


@dataclasses.dataclass
class VaeOptions(DataOptions):
    # ---- data: every field of skipdiff.data_options.DataOptions ----------------------------------------
    preset: str = option("digits", f"architecture: {', '.join(VAE_PRESETS)}")
    kl_weight: float = option(1e-5, "weight of the KL term against the pixel MSE")
    learning_rate: float = option(2e-3, "AdamW learning rate (cosine decay)")
    train_batch_size: int = option(64, "batch size")
    max_train_steps: int = option(400, "optimizer steps")
    seed: int = option(0, "seed of weights and data order")
    num_threads: int | None = option(None, "torch CPU threads")
    output_dir: str = option("runs/vae-digits-16", "where the AutoencoderKL is saved (save_pretrained)")
    overwrite_output_dir: bool = option(False, "replace a VAE already saved in --output_dir")
    dry_run: bool = option(False, "print the resolved options and exit")

    def validate(self) -> None:
        super().validate()
        for name in ("train_batch_size", "max_train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"--kl_weight must be >= 0, got {self.kl_weight}")
        if self.preset not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {self.preset!r}; presets: {sorted(VAE_PRESETS)}")
        downscale = 2 ** (len(VAE_PRESETS[self.preset]["block_out_channels"]) - 1)
        if self.resolution % downscale:
            raise ValueError(f"--resolution {self.resolution} is not a multiple of the VAE's downscaling {downscale}")
