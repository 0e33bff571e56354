"""Options of ``train_scripts/train_unet.py``: the defaults are the README's default job.

The default job trains a latent diffusion model on scikit-learn's digits (16x16, grey) with a
small AutoencoderKL (trained first, or reused when ``runs/vae-digits-16`` exists) on a 2-core CPU
in under 10 minutes.
"""

from __future__ import annotations

import dataclasses
import math

from ..presets import UNET_PRESETS
from .cli import option

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
SHORTCUT_PARTS = ("down", "mid", "up")


@dataclasses.dataclass
class TrainOptions:
    # ---- data ------------------------------------------------------------------------------------
    dataset: str = option("digits", "built-in dataset (used unless --dataset_name or --train_data_dir)")
    dataset_name: str | None = option(None, "a Hub dataset id, e.g. cifar10 (needs internet)")
    dataset_config_name: str | None = option(None, "the Hub dataset's configuration name")
    train_data_dir: str | None = option(None, "a local folder of images (loaded with imagefolder)")
    image_column: str = option("image", "column holding the images")
    label_column: str = option("label", "column holding class labels (for --class_conditional)")
    skip_corrupt_images: bool = option(
        False, "skip unreadable images in --train_data_dir (counted) instead of failing"
    )
    resolution: int = option(16, "image size the data is resized to")
    center_crop: bool = option(True, "center-crop (else random-crop) to --resolution")
    random_flip: bool = option(False, "random horizontal flips (off for digits: a flipped 3 is no digit)")
    test_fraction: float = option(0.2, "held-out fraction when the source has no test split")
    split_seed: int = option(0, "seed of the deterministic train/test split")
    cache_dir: str | None = option(None, "🤗 cache folder for Hub datasets and models")
    # ---- encoder ---------------------------------------------------------------------------------
    vae: str = option(
        "auto",
        "AutoencoderKL: a folder, a Hub id, 'none' (pixel space) or 'auto' (train/reuse runs/vae-<dataset>-<resolution>)",
    )
    vae_preset: str = option("digits", "VAE architecture for --vae auto (see skipdiff.presets.VAE_PRESETS)")
    sample_latents: bool = option(
        False, "train on latent_dist.sample() as diffusers' examples do (default: the posterior mean; see skipdiff/encoders.py)"
    )
    cache_latents: bool = option(
        True, "encode the train split once and sample latents from the cached distribution"
    )
    # ---- model -----------------------------------------------------------------------------------
    model: str = option("digits", f"UNet preset ({', '.join(UNET_PRESETS)}) or a config.json path")
    skips: str = option("full", "skip specification: preset, one mode, or comma-separated per-skip modes")
    disable_shortcuts: list[str] = option([], "turn off the residual shortcut of resnets in: down mid up")
    markov: str = option(
        "", "Markov chain options for markov gates, e.g. 'p_init=0.8,cost=0.1,temperature=0.1'"
    )
    class_conditional: bool = option(False, "condition on the dataset's labels (class embedding)")
    # ---- noise scheduler -------------------------------------------------------------------------
    num_train_timesteps: int = option(1000, "diffusion steps of the DDPM scheduler")
    beta_schedule: str = option("squaredcos_cap_v2", "beta schedule", choices=BETA_SCHEDULES)
    prediction_type: str = option("epsilon", "what the UNet predicts", choices=PREDICTION_TYPES)
    snr_gamma: float | None = option(None, "Min-SNR weighting gamma (Hang et al., 2023); 5.0 is usual")
    # ---- optimisation ----------------------------------------------------------------------------
    learning_rate: float = option(2e-3, "peak AdamW learning rate")
    lr_scheduler: str = option("cosine", "learning-rate schedule after warm-up", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(50, "linear warm-up steps")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    gradient_accumulation_steps: int = option(1, "batches per optimizer step")
    use_ema: bool = option(True, "keep an EMA of the weights (saved as unet_ema/, used for sampling)")
    ema_max_decay: float = option(0.999, "EMA decay ceiling (with diffusers' EMA warm-up)")
    # ---- loop ------------------------------------------------------------------------------------
    train_batch_size: int = option(128, "batch size per process")
    max_train_steps: int | None = option(1200, "optimizer steps (overrides --num_epochs)")
    num_epochs: int | None = option(None, "epochs, when --max_train_steps is not given")
    seed: int = option(0, "seed of weights, noise and data order: the same seed gives the same loss curve")
    mixed_precision: str | None = option(None, "no, fp16 or bf16 (default: the accelerate config's)")
    num_threads: int | None = option(None, "torch CPU threads per process (default: torch's choice)")
    dataloader_num_workers: int = option(0, "data-loading worker processes")
    max_nonfinite_in_row: int = option(10, "stop after this many non-finite losses/gradients in a row")
    # ---- outputs, logging, checkpoints -----------------------------------------------------------
    output_dir: str = option("runs/digits-latent", "the run's folder: pipeline, checkpoints, logs, samples")
    log_every: int = option(10, "steps between stats.jsonl/tensorboard records")
    timestep_buckets: int = option(4, "equal-width timestep buckets for the per-bucket loss")
    validation_every: int = option(400, "steps between validation sample grids (0: only at the end)")
    num_validation_images: int = option(64, "images per validation grid")
    validation_inference_steps: int = option(50, "DDIM steps for validation samples")
    checkpointing_steps: int = option(400, "steps between checkpoints (0: none)")
    checkpoints_total_limit: int | None = option(2, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from")
    report_to: str = option("tensorboard", "accelerate tracker ('tensorboard' or 'none')")
    dry_run: bool = option(False, "print the resolved options and exit")
    # ---- the Hub ---------------------------------------------------------------------------------
    push_to_hub: bool = option(False, "upload checkpoints and the final model to the Hub")
    hub_model_id: str | None = option(None, "the Hub repository, e.g. user/skipdiff-digits")
    hub_private_repo: bool = option(False, "create the Hub repository as private")
    hub_token: str | None = option(None, "Hub token (default: the logged-in one)")
    # ---- testing faults --------------------------------------------------------------------------
    inject_nonfinite_steps: list[int] = option([], "testing: make the loss NaN at these steps")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value (called before any work starts)."""
        positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_timesteps",
                    "log_every", "timestep_buckets", "num_validation_images", "validation_inference_steps",
                    "max_nonfinite_in_row")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "num_epochs", "num_threads", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        for name in ("checkpointing_steps", "validation_every", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "max_grad_norm", "adam_weight_decay", "adam_epsilon"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
                raise ValueError(f"--{name} must be a positive finite number, got {value}")
        if self.snr_gamma is not None and not (math.isfinite(self.snr_gamma) and self.snr_gamma > 0):
            raise ValueError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if not 0.0 <= self.ema_max_decay < 1.0:
            raise ValueError(f"--ema_max_decay must lie in [0, 1), got {self.ema_max_decay}")
        if self.max_train_steps is None and self.num_epochs is None:
            raise ValueError("give --max_train_steps or --num_epochs")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"--mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        for choice, allowed in (("prediction_type", PREDICTION_TYPES), ("beta_schedule", BETA_SCHEDULES),
                                ("lr_scheduler", LR_SCHEDULERS)):  # fmt: skip
            if getattr(self, choice) not in allowed:
                raise ValueError(f"--{choice} must be one of {allowed}, got {getattr(self, choice)!r}")
        bad_parts = sorted(set(self.disable_shortcuts) - set(SHORTCUT_PARTS))
        if bad_parts:
            raise ValueError(f"--disable_shortcuts takes {SHORTCUT_PARTS}, got {bad_parts}")
        if self.cache_latents and self.random_flip:
            raise ValueError("--cache_latents encodes each image once, so it cannot be combined with --random_flip")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"--report_to must be 'tensorboard' or 'none', got {self.report_to!r}")
