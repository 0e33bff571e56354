"""Options of ``train_scripts/train_unet.py``: the defaults are the README's default job.

The default job trains a latent diffusion model on scikit-learn's digits (16x16, grey) with a
small AutoencoderKL (trained first, or reused when its folder under ``runs/`` exists) on a 2-core
CPU in under 10 minutes. Flags follow diffusers' ``train_unconditional.py`` /
``train_text_to_image.py`` where those scripts have the same option.

No heavy imports here: ``--help`` and option errors answer without importing torch.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import (
    LR_SCHEDULERS,
    MIXED_PRECISION,
    SHORTCUT_PARTS,
    OptionGroup,
    check_choice,
    check_finite,
    check_positive,
    option,
    parse_key_values,
)
from ..data_options import DataOptions
from ..presets import UNET_PRESETS

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TRACKERS = ("tensorboard", "wandb", "all", "none")
TRAIN_ONLY = ("all", "gates", "lora")
DEFAULT_STEPS = 1200  # the default job, when neither --max_train_steps nor --num_epochs is given
# Options a resumed run may change without changing what is trained (everything else must match the
# checkpoint's run; --allow_changed names more).
RESUME_FREE = (
    "resume_from_checkpoint",
    "num_threads",
    "dataloader_num_workers",
    "report_to",
    "tracker_project_name",
    "log_every",
    "validation_every",
    "num_validation_images",
    "validation_inference_steps",
    "validation_prompts",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "hub_token",
    "dry_run",
    "allow_changed",
    "overwrite_output_dir",
    "cache_dir",
    "inject_nonfinite_steps",
    "max_nonfinite_in_row",
    "output_dir",
)


# ---------------------------------------------------------------------------------------------------
# The option groups. Each builder of the training run takes the one group it needs (``options.optim`` for the
# optimizer, ``options.ema`` for the EMA, ...), as EDM2's training takes network_kwargs / loss_kwargs, so
# that what a builder may read is its signature. The command line and ``training_options.json`` stay flat:
# TrainOptions is every group's fields, one flag each, as diffusers' training scripts have them.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncoderOptions:
    """What the UNet denoises: pixels, or the latents of a VAE (trained once, or loaded)."""

    vae: str = option(
        "auto",
        "AutoencoderKL: a folder, a Hub id, 'none' (pixel space) or 'auto' (train once, then reuse, "
        "runs/vae-<dataset>-<resolution>-<split key>)",
    )
    vae_preset: str = option("digits", "VAE architecture for --vae auto (see skipdiff.presets.VAE_PRESETS)")
    sample_latents: bool = option(
        False,
        "train on latent_dist.sample() as diffusers' examples do (default: the posterior mean; see skipdiff/encoders.py)",
    )
    cache_latents: bool = option(
        True,
        "encode the train split once (VAE latents, or pixel tensors in pixel space; both flips with "
        "--random_flip) instead of every step",
    )


@dataclasses.dataclass
class UNetOptions:
    """Which UNet trains (a preset, a config or pretrained weights), its skips and how it runs."""

    model: str = option("digits", f"UNet preset ({', '.join(UNET_PRESETS)}) or a config.json path")
    pretrained_model_name_or_path: str | None = option(
        None,
        "start from these weights: a UNet or pipeline folder or Hub id (e.g. google/ddpm-cifar10-32); replaces --model",
    )
    revision: str | None = option(None, "Hub revision of --pretrained_model_name_or_path")
    variant: str | None = option(None, "weights variant of --pretrained_model_name_or_path (e.g. fp16)")
    skips: str = option("full", "skip specification: preset, one mode, or comma-separated per-skip modes")
    disable_shortcuts: list[str] = option([], "turn off the residual shortcut of resnets in: down mid up")
    markov: str = option("", "Markov chain options for markov gates, e.g. 'p_init=0.8,cost=0.1,temperature=0.1'")
    class_conditional: bool = option(False, "condition on the dataset's labels (class embedding)")
    train_only: str = option(
        "all",
        "train every weight, only the skip gates, or LoRA adapters (peft) on the resnets' convolutions and "
        "the attention projections (the base model frozen)",
        choices=TRAIN_ONLY,
    )
    lora_rank: int = option(4, "--train_only lora: the adapters' rank")
    lora_alpha: float | None = option(None, "--train_only lora: the adapters' alpha (default: the rank)")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass (less memory, same gradients)"
    )
    channels_last: bool = option(False, "channels-last memory format for the UNet and its inputs (GPUs)")
    torch_compile: bool = option(False, "torch.compile the UNet (the router's hooks compile with it)")

    def markov_options(self) -> dict:
        """``--markov`` parsed to keyword arguments of the chain."""
        return parse_key_values(self.markov, "--markov")


@dataclasses.dataclass
class NoiseOptions:
    """The noise schedule, the prediction target and the loss weighting."""

    num_train_timesteps: int = option(1000, "diffusion steps of the DDPM scheduler")
    beta_schedule: str = option("squaredcos_cap_v2", "beta schedule", choices=BETA_SCHEDULES)
    # v_prediction: on the default job it reached FID 0.54 where epsilon reached 0.95 (floor 0.30, training seed 0;
    # eval/results/default_recipe), at the same cost.
    prediction_type: str = option("v_prediction", "what the UNet predicts", choices=PREDICTION_TYPES)
    snr_gamma: float | None = option(None, "Min-SNR weighting gamma (Hang et al., 2023); 5.0 is usual")
    noise_offset: float = option(0.0, "add this times per-channel Gaussian offsets to the noise (0.1 is usual)")
    input_perturbation: float = option(0.0, "perturb the noisy input with this times extra noise (0.1 is usual)")


@dataclasses.dataclass
class OptimOptions:
    """The optimizer (AdamW) and its learning-rate schedule."""

    learning_rate: float = option(2e-3, "peak AdamW learning rate")
    scale_lr: bool = option(False, "multiply the learning rate by batch size x accumulation x processes")
    lr_scheduler: str = option("cosine", "learning-rate schedule after warm-up", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(50, "linear warm-up steps")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes installed)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")


@dataclasses.dataclass
class EmaOptions:
    """The EMA of the weights that samples and is saved."""

    use_ema: bool = option(
        True, "keep an EMA of the weights (saved as unet/, used for sampling; raw weights in unet_raw/)"
    )
    ema_max_decay: float = option(0.999, "EMA decay ceiling")
    ema_min_decay: float = option(0.0, "EMA decay floor")
    ema_inv_gamma: float = option(1.0, "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power")
    ema_power: float = option(0.75, "EMA warm-up power (3/4 as diffusers' examples; 2/3 for long runs)")


@dataclasses.dataclass
class LoopOptions:
    """Batches, steps, seed, precision, threads and the loop's fault limits."""

    train_batch_size: int = option(128, "batch size per process")
    gradient_accumulation_steps: int = option(1, "batches per optimizer step")
    max_train_steps: int | None = option(
        None, f"optimizer steps; wins over --num_epochs (default: {DEFAULT_STEPS} unless --num_epochs is given)"
    )
    num_epochs: int | None = option(None, "epochs, when --max_train_steps is not given")
    seed: int = option(0, "seed of weights, noise and data order: the same seed gives the same loss curve")
    mixed_precision: str | None = option(None, "no, fp16 or bf16 (default: the accelerate config's)")
    allow_tf32: bool = option(False, "TF32 matmuls and convolutions on Ampere+ GPUs (faster, less exact)")
    num_threads: int | None = option(None, "torch CPU threads per process (default: torch's choice)")
    dataloader_num_workers: int = option(0, "data-loading worker processes (pinned memory on a GPU)")
    max_nonfinite_in_row: int = option(10, "stop after this many non-finite losses/gradients in a row")
    inject_nonfinite_steps: list[int] = option([], "testing: make the loss NaN at these steps")

    def total_steps(self, steps_per_epoch: int) -> int:
        """The optimizer steps this run takes: --max_train_steps, else --num_epochs, else the default."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        if self.num_epochs is not None:
            return self.num_epochs * steps_per_epoch
        return DEFAULT_STEPS


@dataclasses.dataclass
class RunOptions:
    """The run's folder: outputs, logging, validation grids, checkpoints and resuming."""

    output_dir: str = option("runs/digits-latent", "the run's folder: pipeline, checkpoints, logs, samples")
    overwrite_output_dir: bool = option(False, "delete what --output_dir holds (another run) and start afresh")
    log_every: int = option(10, "steps between stats.jsonl/tracker records (host reads happen only then)")
    timestep_buckets: int = option(4, "equal-width timestep buckets for the per-bucket loss")
    validation_every: int = option(400, "steps between validation sample grids (0: only at the end)")
    num_validation_images: int | None = option(
        None,
        "images per validation grid (default: sized to the run: 4 for a text-conditioned UNet, else as many "
        "as fill a 1024 px grid, at most 64); the run prints what validation costs against the training",
    )
    validation_inference_steps: int = option(50, "DDIM steps for validation samples")
    validation_prompts: list[str] = option([], "prompts for validation grids of text-conditioned UNets")
    checkpointing_steps: int = option(400, "steps between checkpoints (0: none)")
    checkpoints_total_limit: int | None = option(2, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from")
    allow_changed: list[str] = option(
        [], "options a resumed run may change from the checkpoint's run (e.g. learning_rate); others must match"
    )
    report_to: str = option("tensorboard", "tracker: tensorboard, wandb, all or none", choices=TRACKERS)
    tracker_project_name: str = option("skipdiff", "the tracker's project (wandb) or run name (tensorboard)")
    dry_run: bool = option(False, "print the resolved options and exit")


@dataclasses.dataclass
class HubOptions:
    """Pushing checkpoints and the final model to the Hugging Face Hub."""

    push_to_hub: bool = option(False, "upload checkpoints and the final model to the Hub")
    hub_model_id: str | None = option(None, "the Hub repository, e.g. user/skipdiff-digits")
    hub_private_repo: bool = option(False, "create the Hub repository as private")
    hub_token: str | None = option(None, "Hub token (default: the logged-in one)")


@dataclasses.dataclass
class TrainOptions(
    HubOptions,
    RunOptions,
    LoopOptions,
    EmaOptions,
    OptimOptions,
    NoiseOptions,
    UNetOptions,
    EncoderOptions,
    DataOptions,
):
    """Every option of a training run (the fields of its groups, :data:`GROUPS`, data first), validated
    together; ``options.<group>`` is one group on its own (a copy: changing it changes nothing here)."""

    data = OptionGroup(DataOptions)
    encoder = OptionGroup(EncoderOptions)
    unet = OptionGroup(UNetOptions)
    noise = OptionGroup(NoiseOptions)
    optim = OptionGroup(OptimOptions)
    ema = OptionGroup(EmaOptions)
    loop = OptionGroup(LoopOptions)
    run = OptionGroup(RunOptions)
    hub = OptionGroup(HubOptions)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value (called before any work starts)."""
        super().validate()
        check_positive(
            self,
            (
                "train_batch_size",
                "gradient_accumulation_steps",
                "lora_rank",
                "num_train_timesteps",
                "log_every",
                "timestep_buckets",
                "validation_inference_steps",
                "max_nonfinite_in_row",
            ),
        )
        check_positive(
            self,
            ("max_train_steps", "num_epochs", "num_threads", "checkpoints_total_limit", "num_validation_images"),
            optional=True,
        )
        check_positive(
            self, ("checkpointing_steps", "validation_every", "lr_warmup_steps", "dataloader_num_workers"), minimum=0
        )
        check_finite(
            self,
            (
                "learning_rate",
                "max_grad_norm",
                "adam_weight_decay",
                "adam_epsilon",
                "noise_offset",
                "input_perturbation",
                "snr_gamma",
                "ema_inv_gamma",
                "ema_power",
            ),
            positive=("learning_rate", "snr_gamma", "ema_inv_gamma", "ema_power"),
        )
        for name in ("adam_beta1", "adam_beta2", "ema_max_decay", "ema_min_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.ema_min_decay > self.ema_max_decay:
            raise ValueError(f"--ema_min_decay {self.ema_min_decay} exceeds --ema_max_decay {self.ema_max_decay}")
        if self.mixed_precision is not None:
            check_choice(self, "mixed_precision", MIXED_PRECISION)
        for name, allowed in (
            ("prediction_type", PREDICTION_TYPES),
            ("beta_schedule", BETA_SCHEDULES),
            ("lr_scheduler", LR_SCHEDULERS),
            ("report_to", TRACKERS),
            ("train_only", TRAIN_ONLY),
        ):
            check_choice(self, name, allowed)
        bad_parts = sorted(set(self.disable_shortcuts) - set(SHORTCUT_PARTS))
        if bad_parts:
            raise ValueError(f"--disable_shortcuts takes {SHORTCUT_PARTS}, got {bad_parts}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ValueError("--resume_from_checkpoint and --overwrite_output_dir contradict each other: choose one")
        unknown = sorted(set(self.allow_changed) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"--allow_changed names unknown option(s) {unknown}")
        self._validate_model_source()
        self._validate_markov()

    def _validate_model_source(self) -> None:
        if self.train_only != "all" and not self.pretrained_model_name_or_path:
            raise ValueError(
                f"--train_only {self.train_only} tunes a pretrained UNet: give --pretrained_model_name_or_path"
            )
        if self.pretrained_model_name_or_path and self.model != "digits":
            raise ValueError("--pretrained_model_name_or_path sets the architecture: leave --model at its default")
        if (self.revision or self.variant) and not self.pretrained_model_name_or_path:
            raise ValueError("--revision and --variant apply to --pretrained_model_name_or_path, which is not given")

    def _validate_markov(self) -> None:
        options = self.markov_options()  # parses: a malformed value is named now
        if options and "markov" not in self.skips:
            raise ValueError(f"--markov {self.markov!r} is only used by markov skips, but --skips is {self.skips!r}")

    def effective_learning_rate(self, num_processes: int) -> float:
        """--learning_rate, times the global batch with --scale_lr (as diffusers' examples do)."""
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.train_batch_size * self.gradient_accumulation_steps * num_processes


# group name -> class, in the order of ``--help``: TrainOptions' groups, each ``options.<name>``
GROUPS = {name: group.cls for name, group in vars(TrainOptions).items() if isinstance(group, OptionGroup)}


def resume_differences(saved: dict, now: dict, allowed: list[str]) -> list[str]:
    """Names of options whose value differs between a checkpoint's run (``saved``) and this one, except the
    options a resume may change (:data:`RESUME_FREE`) and those in ``allowed``; a missing key counts as
    the current default only when the saved run predates that option."""
    defaults = dataclasses.asdict(TrainOptions())
    free = set(RESUME_FREE) | set(allowed)
    differing = []
    for name, value in now.items():
        if name in free:
            continue
        before = saved.get(name, defaults.get(name))
        if before != value and not (_is_number(before) and _is_number(value) and math.isclose(before, value)):
            differing.append(name)
    return sorted(differing)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
