"""Pieces of ``train_unet.py`` that are not the loop itself: backends, the accelerator, the data and the
encoder (with the VAE stage), the optimizer and the EMA, validation grids and the saved outputs."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers import DDIMScheduler
from diffusers.utils import numpy_to_pil
from torch.utils.data import DataLoader

from ..conditioning import ClassLabels, Unconditional
from ..cpu_memory import keep_freed_memory_for_cpu_training
from ..data import (
    collate_images,
    dataset_channels,
    load_image_splits,
    num_classes,
    options_transform,
    with_pixel_values,
)
from ..data_options import DataOptions
from ..encoders import CachedLatents, Encoder, VaeEncoder, cache_encoded, load_encoder
from ..export import export_pipeline
from ..grids import image_grid
from ..pipeline import SkipDiffPipeline
from ..presets import UNET_PRESETS, VAE_PRESETS, unet_config
from ..sampling import sample_images
from ..seeding import rng_untouched
from .ema import WeightEMA
from .model_source import (
    ModelSource,
    build_unet,
    finish_model,
    is_pipeline_source,
    pipeline_source,
    plain_model,
    trainable_parameters,
)
from .options import EmaOptions, EncoderOptions, LoopOptions, OptimOptions, RunOptions, TrainOptions, UNetOptions
from .vae import VaeOptions, train_vae, unfinished_vae_error, vae_folder_state

# ---------------------------------------------------------------------------------------------------
# Backends and the accelerator
# ---------------------------------------------------------------------------------------------------


def setup_backends(options: TrainOptions) -> None:
    """CPU threads, the CPU's allocator, TF32, and the optional packages the options need (wandb, bitsandbytes,
    peft: checked now, not after the VAE stage)."""
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    keep_freed_memory_for_cpu_training()
    if options.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if options.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--report_to {options.report_to} needs wandb: pip install wandb (or --report_to tensorboard)")
    if options.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if options.train_only == "lora" and importlib.util.find_spec("peft") is None:
        raise ValueError('--train_only lora needs peft: pip install "skipdiff[lora]"')


def resolve_mixed_precision(requested: str | None) -> str | None:
    """fp16 needs a GPU: on a CPU-only machine it falls back to fp32 with a warning.

    (Accelerate accepts fp16 on a CPU but silently runs fp32 while reporting "fp16"; see
    stack-facts.) ``None`` keeps the accelerate config's choice.
    """
    if requested == "fp16" and not torch.cuda.is_available():
        warnings.warn(
            "--mixed_precision fp16 needs a CUDA GPU; training in fp32 on this CPU instead (bf16 works on CPUs)",
            stacklevel=2,
        )
        return "no"
    return requested


def make_accelerator(loop: LoopOptions, run: RunOptions) -> Accelerator:
    """The run's Accelerator: mixed precision, accumulation, trackers, seedable data order."""
    requested = loop.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    project = ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "logs"))
    # `accelerate launch --multi_gpu --num_processes N` on a machine without an accelerator starts N
    # processes, but Accelerate then runs each alone (DistributedType.NO, every one "main") unless
    # asked for CPU processes: with cpu=True they train together over gloo (MULTI_CPU).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(
        cpu=launched and not has_accelerator,
        mixed_precision=resolve_mixed_precision(requested),
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        log_with=None if run.report_to == "none" else run.report_to,
        project_config=project,
        # A seedable sampler makes each epoch's order a function of (seed, epoch), so a resumed
        # run sees exactly the batches an uninterrupted one would.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


# ---------------------------------------------------------------------------------------------------
# Geometry, data, encoder
# ---------------------------------------------------------------------------------------------------


def vae_downscale(encoder: EncoderOptions) -> int | None:
    """How much the VAE shrinks images: from the preset (``auto``), a local VAE's config, 1 in pixel
    space; None for a Hub VAE (known once loaded)."""
    if encoder.vae.lower() == "none":
        return 1
    if encoder.vae == "auto":
        return (
            2 ** (len(VAE_PRESETS[encoder.vae_preset]["block_out_channels"]) - 1)
            if encoder.vae_preset in VAE_PRESETS
            else None
        )
    for candidate in (Path(encoder.vae) / "config.json", Path(encoder.vae) / "vae" / "config.json"):
        if candidate.is_file():
            return 2 ** (len(json.loads(candidate.read_text())["block_out_channels"]) - 1)
    return None


def unet_downscale(unet: UNetOptions) -> int | None:
    """How much the UNet shrinks its input (2 per down block but the last); None when not known yet."""
    if unet.pretrained_model_name_or_path:
        return None
    if unet.model in UNET_PRESETS:
        blocks = len(UNET_PRESETS[unet.model]["block_out_channels"])
    elif Path(unet.model).is_file():
        config = unet_config(unet.model, sample_size=1, channels=1)  # names a file that is no config
        if not isinstance(config.get("block_out_channels"), list | tuple):
            raise ValueError(f"model config {unet.model!r} has no block_out_channels list")
        blocks = len(config["block_out_channels"])
    else:
        return None
    return 2 ** (blocks - 1)


def check_geometry(options: TrainOptions) -> None:
    """The resolution must halve evenly through the VAE and then through the UNet: checked before the
    VAE stage (or any training), naming the numbers."""
    vae, unet = vae_downscale(options.encoder), unet_downscale(options.unet)
    if options.vae == "auto" and options.vae_preset not in VAE_PRESETS:
        raise ValueError(f"unknown --vae_preset {options.vae_preset!r}; presets: {sorted(VAE_PRESETS)}")
    if vae is not None and options.resolution % vae:
        raise ValueError(f"--resolution {options.resolution} is not a multiple of the VAE's downscaling {vae}")
    if vae is not None and unet is not None:
        latent = options.resolution // vae
        if latent % unet or latent < unet:
            step = vae * unet
            raise ValueError(
                f"--resolution {options.resolution} gives {latent}x{latent} {'latents' if vae > 1 else 'pixels'}, which "
                f"the UNet's {unet.bit_length() - 1} downsamplings (/{unet}) cannot halve evenly: use a multiple of {step}"
            )


@dataclasses.dataclass
class TrainingData:
    """The run's splits, their channel count and classes, and how a batch conditions the UNet."""

    splits: object  # DatasetDict(train, test)
    channels: int
    classes: int | None  # class count of a class-conditional run
    skipped_images: int = 0


def load_training_data(data: DataOptions, class_conditional: bool) -> TrainingData:
    """The splits (:func:`skipdiff.data.load_image_splits`) with their channels, and their classes when the
    UNet is class-conditional (``--class_conditional``)."""
    splits = load_image_splits(data)
    classes = num_classes(splits) if class_conditional else None
    if class_conditional and classes is None:
        raise ValueError(f"--class_conditional needs a label column; {data.label_column!r} is not in the dataset")
    channels = dataset_channels(splits, data.image_channels)
    return TrainingData(splits, channels, classes, len(getattr(splits["train"], "skipped_images", [])))


def auto_vae_dir(options: TrainOptions) -> Path:
    """Where ``--vae auto`` keeps the VAE it trains: ``runs/vae-<dataset>-<resolution>-<split key>``.

    The split key (:meth:`DataOptions.split_key`) makes the VAE of another train/test split (seed,
    fraction, subset) another folder, so a VAE is never reused for a split whose test images it saw."""
    data = options.data
    preset = "" if options.vae_preset == "digits" else f"-{options.vae_preset}"  # another architecture, another folder
    return Path("runs") / f"vae-{data.source()}-{data.resolution}-{data.split_key()}{preset}"


def auto_vae_options(options: TrainOptions) -> VaeOptions:
    """The VAE stage that ``--vae auto`` trains for this run: its data, VAE preset and seed, saved in
    :func:`auto_vae_dir`. The first run of a split trains it, so its seed is that run's: a study that must
    encode with one field's VAE whatever seed comes first trains it up front from these options."""
    data = dataclasses.asdict(options.data)
    return VaeOptions(**data, preset=options.vae_preset, seed=options.seed, output_dir=str(auto_vae_dir(options)))


def prepare_encoder(options: TrainOptions, accelerator: Accelerator, image_channels: int) -> tuple[Encoder, str]:
    """Load the encoder; with ``--vae auto`` train the VAE stage first unless it exists. A folder holding
    part of one (a stage killed while saving in place, before saves were atomic) is refused, naming it."""
    vae = options.vae
    if vae == "auto":
        folder = auto_vae_dir(options)
        state, missing = vae_folder_state(folder)
        if state == "unfinished":
            raise unfinished_vae_error(folder, missing, "delete the folder; the next run trains it again")
        if state == "none":
            accelerator.print(f"--vae auto: training the VAE stage into {folder} (reused by later runs)")
            with rng_untouched():  # the UNet's initial weights must not depend on which run trained the VAE
                train_vae(auto_vae_options(options))
            # train_vae makes its own Accelerator object (sharing the process state), so the VAE never
            # joins this run's checkpoints.
        vae = str(folder)
    return load_encoder(vae, image_channels, options.cache_dir, options.sample_latents), vae


def load_model_source(options: TrainOptions, accelerator: Accelerator, data: TrainingData) -> ModelSource:
    """The run's model and its surroundings: a preset (or a bare pretrained UNet) with the encoder of
    ``--vae``, or a pretrained pipeline with its own encoder, conditioning and schedule, as diffusers'
    ``train_text_to_image.py`` uses a Stable Diffusion pipeline's. (Here, not in :mod:`.model_source`, which
    builds the model and so sits below the encoder stage of this module.)"""
    if is_pipeline_source(options):
        return pipeline_source(options, data)
    encoder, encoder_source = prepare_encoder(options, accelerator, data.channels)
    unet, scheduler = build_unet(options, encoder, data)
    conditioning = ClassLabels(data.classes) if data.classes else Unconditional()
    return ModelSource(finish_model(unet, options.unet), scheduler, encoder, conditioning, encoder_source)


def train_loader(options: TrainOptions, split, encoder: Encoder, channels: int) -> DataLoader:
    """The training DataLoader: with ``--cache_latents`` the split encoded once (latents through the VAE,
    or the transformed pixels in pixel space; both orientations with ``--random_flip``), else images
    transformed on access. Flips are drawn in the step from the run's RNG, so that a resumed run flips
    exactly as an uninterrupted one."""
    data = options.data
    images = with_pixel_values(split, options_transform(data, channels, train=True))
    if options.cache_latents:  # pixel space too: the decoded, resized tensors (no PNG decoding per step)
        if not options.center_crop:
            raise ValueError("random crops (--no-center_crop) cannot be cached: add --no-cache_latents")
        encode_loader = DataLoader(images, batch_size=256, collate_fn=collate_images)
        dataset = CachedLatents(cache_encoded(encoder, encode_loader, flips=options.random_flip))
        collate = CachedLatents.collate
    else:
        dataset, collate = images, collate_images
    if len(dataset) < options.train_batch_size:
        raise ValueError(
            f"the train split has {len(dataset)} images, fewer than --train_batch_size "
            f"{options.train_batch_size}: lower the batch size"
        )
    # Its own generator: creating an iterator draws a base seed from it, not from the global RNG that
    # the noise comes from (else a resumed run, which creates one more iterator, draws other noise).
    return DataLoader(
        dataset,
        batch_size=options.train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=options.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(options.seed),
    )


# ---------------------------------------------------------------------------------------------------
# Optimizer and EMA
# ---------------------------------------------------------------------------------------------------


def make_optimizer(optim: OptimOptions, unet: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters at ``learning_rate`` (``TrainOptions.effective_learning_rate``:
    it depends on the batch, which is not the optimizer's group): fused (it skips non-finite steps on the
    device), or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``."""
    parameters = trainable_parameters(unet)
    kwargs = dict(
        lr=learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.adam_weight_decay,
        eps=optim.adam_epsilon,
    )
    if optim.use_8bit_adam:
        # optional: bitsandbytes, only for --use_8bit_adam
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, fused=True, **kwargs)


def make_ema(ema: EmaOptions, unet: torch.nn.Module) -> WeightEMA | None:
    """The EMA of ``unet``'s weights (``--use_ema``, on by default), or None."""
    if not ema.use_ema:
        return None
    return WeightEMA(
        unet.parameters(),
        max_decay=ema.ema_max_decay,
        min_decay=ema.ema_min_decay,
        inv_gamma=ema.ema_inv_gamma,
        power=ema.ema_power,
    )


# ---------------------------------------------------------------------------------------------------
# Sampling and outputs
# ---------------------------------------------------------------------------------------------------


def make_pipeline(unet, scheduler, encoder: Encoder) -> SkipDiffPipeline:
    """The run's sampling pipeline (DDIM for sampling, built from the training scheduler's config)."""
    vae = encoder.vae if isinstance(encoder, VaeEncoder) else None
    return SkipDiffPipeline(unet=unet, scheduler=scheduler, vae=vae)


# ---- validation: sized to the run ------------------------------------------------------------------
# A text-conditioned UNet (Stable Diffusion and the like) draws this many images per grid by default: at
# 512 px a 2 x 2 grid, at the README's SD 1.5 settings 1.6 PFLOP over the run against the 19 PFLOP it
# trains (64 images, the old default, were 26 PFLOP: more than the training).
VALIDATION_TEXT_IMAGES = 4
VALIDATION_TEXT_PROMPTS = 2  # test captions drawn when --validation_prompts is not given (a column each)
# Other UNets (small images) fill a square grid of about this many pixels, with 4 to 64 images.
VALIDATION_GRID_PIXELS = 1024
MAX_VALIDATION_IMAGES = 64
TRAINING_FORWARDS_PER_IMAGE = 3  # a training step's forward + backward costs about three forwards


def validation_images(options: TrainOptions, text_conditioned: bool) -> int:
    """Images per validation grid: ``--num_validation_images``, else sized to the run: a few
    (:data:`VALIDATION_TEXT_IMAGES`) for a text-conditioned UNet, else as many as fill a
    :data:`VALIDATION_GRID_PIXELS`-pixel square at the run's resolution (4 to :data:`MAX_VALIDATION_IMAGES`)."""
    if options.num_validation_images is not None:
        return options.num_validation_images
    if text_conditioned:
        return VALIDATION_TEXT_IMAGES
    side = max(2, VALIDATION_GRID_PIXELS // options.resolution)  # images per row and column
    return min(MAX_VALIDATION_IMAGES, side * side)


def validation_cost(options: TrainOptions, max_steps: int, images: int, guidance: bool, num_processes: int = 1) -> dict:
    """What validation costs over a run of ``max_steps``, in UNet forwards, against the training's: a grid
    every ``--validation_every`` steps and one at the end, ``images`` x ``--validation_inference_steps``
    forwards each (twice with classifier-free guidance); the training counts
    :data:`TRAINING_FORWARDS_PER_IMAGE` forwards per image of every optimizer step."""
    every = options.validation_every
    grids = ((max_steps - 1) // every if every else 0) + 1  # steps every, 2 every, ... below max_steps; the end
    forwards = grids * images * options.validation_inference_steps * (2 if guidance else 1)
    batch = options.train_batch_size * options.gradient_accumulation_steps * num_processes
    training = max_steps * batch * TRAINING_FORWARDS_PER_IMAGE
    return {
        "grids": grids,
        "images": images,
        "steps": options.validation_inference_steps,
        "guidance": guidance,
        "unet_forwards": forwards,
        "training_forwards": training,
        "fraction_of_training": forwards / training,
    }


def validation_line(cost: dict, every: int) -> str:
    """:func:`validation_cost` as the line a run prints at its start."""
    when = f"every {every} steps and at the end" if every else "at the end"
    guided = " x 2 (guidance)" if cost["guidance"] else ""
    return (
        f"validation: {cost['grids']} grid(s) ({when}) of {cost['images']} images x {cost['steps']} DDIM steps"
        f"{guided} = {cost['unet_forwards']:,} UNet forwards, {cost['fraction_of_training']:.1%} of the "
        f"training's {cost['training_forwards']:,} (forward + backward ~ {TRAINING_FORWARDS_PER_IMAGE} forwards "
        "per image); --num_validation_images, --validation_every and --validation_inference_steps change it"
    )


def text_grid_layout(count: int, prompts: list[str]) -> tuple[int, int, list[str] | None]:
    """``(images, columns, column_labels)`` of a text-conditioned validation grid of about ``count`` images:
    one labelled column per prompt (``count // len(prompts)`` rows, at least one), or for a single prompt a
    near-square grid of its ``count`` images (the prompt goes to the legend)."""
    if len(prompts) == 1:
        return count, max(1, math.ceil(math.sqrt(count))), None
    rows = max(1, count // len(prompts))
    return rows * len(prompts), len(prompts), list(prompts)


@torch.no_grad()
def sample_grid(
    pipeline: SkipDiffPipeline, options: TrainOptions, data: TrainingData, seed: int = 0, step: int | None = None
):
    """A grid of validation samples (:func:`validation_images` of them), seeded: one column per class when
    class-conditional (labelled), else a near-square grid; cells upscaled and spaced by
    :func:`skipdiff.grids.image_grid`, the sampling settings in its legend."""
    count, classes = validation_images(options, False), data.classes
    labels = [i % classes for i in range(count)] if classes else None
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    images = pipeline(
        batch_size=count,
        num_inference_steps=options.validation_inference_steps,
        class_labels=labels,
        generator=torch.Generator().manual_seed(seed),
        sampler="ddim",
        show_progress=False,
    ).images
    pipeline.unet.train(was_training)
    columns = classes if classes and classes <= 16 else max(1, math.ceil(math.sqrt(count)))
    column_labels = [f"class {k}" for k in range(columns)] if classes and classes <= 16 else None
    return image_grid(
        images, columns=columns, column_labels=column_labels, legend=_validation_legend(options, step, seed)
    )


def _validation_legend(options: TrainOptions, step: int | None, seed: int) -> str:
    """The settings a validation grid was drawn with, for its legend."""
    at = f"step {step} · " if step is not None else ""
    weights = "EMA weights" if options.use_ema else "raw weights"
    return f"{at}skips {options.skips} · {weights} · DDIM-{options.validation_inference_steps} · seed {seed}"


@torch.no_grad()
def text_sample_grid(target, options: TrainOptions, data: TrainingData, step: int | None = None):
    """Validation samples of a text-conditioned pipeline: ``--validation_prompts`` (else the first
    :data:`VALIDATION_TEXT_PROMPTS` test captions), laid out by :func:`text_grid_layout` (a labelled column per
    prompt), through the pipeline's own sampler with the run's gates."""
    prompts = list(options.validation_prompts) or [
        str(c) for c in data.splits["test"]["caption"][:VALIDATION_TEXT_PROMPTS]
    ]
    count, columns, labels = text_grid_layout(validation_images(options, True), prompts)
    was_training = target.unet.training
    target.unet.eval()
    samples = sample_images(
        target,
        count,
        seed=0,
        steps=options.validation_inference_steps,
        prompts=prompts,
        resolution=options.resolution,
        progress=False,
    )
    target.unet.train(was_training)
    images = numpy_to_pil(((samples.images + 1) / 2).permute(0, 2, 3, 1).numpy())
    legend = _validation_legend(options, step, 0) + ("" if labels else f"\nprompt: {prompts[0]}")
    return image_grid(images, columns=columns, column_labels=labels, legend=legend)


def save_outputs(output_dir: Path, unet, ema: WeightEMA | None, scheduler, encoder: Encoder, options_json: str) -> None:
    """The run folder: a pipeline whose ``unet/`` holds the weights to sample from (the EMA's when there
    is one, as diffusers' examples save them), ``unet_raw/`` the raw weights (with an EMA), its code for
    diffusers' ``trust_remote_code`` (:func:`skipdiff.export.export_pipeline`), options."""
    sampling = unet
    if ema is not None:
        sampling = copy.deepcopy(unet)
        ema.copy_to(sampling.parameters())
    sampling, unet = plain_model(sampling), plain_model(unet)  # LoRA adapters merged in
    export_pipeline(make_pipeline(sampling, scheduler, encoder), output_dir, raw_unet=unet if ema is not None else None)
    DDIMScheduler.from_config(scheduler.config)  # validates that DDIM sampling will load
    (output_dir / "training_options.json").write_text(options_json)
