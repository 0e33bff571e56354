"""Where the trained UNet comes from: a preset (fresh weights) or pretrained weights, with the run's skips.

* ``--model <preset or config.json>``: a fresh :class:`~skipdiff.skips.unet.SkipUNet2DModel`.
* ``--pretrained_model_name_or_path <UNet or pipeline, folder or Hub id>``: a ``UNet2DModel`` (DDPM, LDM,
  a skipdiff run) becomes a ``SkipUNet2DModel`` with the same architecture and exactly its weights, plus
  the run's skip specification; a ``remove`` skip drops the weights that read the removed channels (named
  in a message). The pipeline's own noise scheduler is kept (its beta schedule and prediction type).
  A Stable Diffusion ``UNet2DConditionModel`` keeps its class and gets the gates through
  :func:`~skipdiff.skips.unet.apply_skip_spec` (the router becomes its ``skip_router`` submodule).
* ``--train_only gates``: every weight but the gates' is frozen (no gradient, no optimizer state).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from ..diffusion import make_scheduler
from ..presets import unet_config
from ..skips.unet import SkipUNet2DModel, apply_skip_spec
from ..targets import is_pipeline, load_target, unet_config_of, unet_subfolder
from .options import UNetOptions


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (``requires_grad``), in the model's order."""
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------------
# Checking the requested model before any work
# --------------------------------------------------------------------------------------------------


def check_model_options(options) -> None:
    """Build the requested model's skip router once (any channels and size: the skips do not depend on
    them), so that the preset, the skip specification, the shortcut switches and the chain options are
    checked before the VAE stage or any download of weights."""
    shortcuts = {part: False for part in options.disable_shortcuts} or None
    if options.pretrained_model_name_or_path:
        config = pretrained_unet_config(options)
        if config.get("_class_name") == "UNet2DConditionModel":
            return  # checked when the gates are applied (no cheap stand-in for its blocks)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        SkipUNet2DModel.from_config(
            {**config, "skips": options.skips, "residual_shortcuts": shortcuts, "markov": options.markov_options()}
        )
        return
    config = unet_config(
        options.model,
        sample_size=options.resolution,
        channels=1,
        skips=options.skips,
        residual_shortcuts=shortcuts,
        markov=options.markov_options(),
    )
    unknown = sorted(set(config) - set(inspect.signature(SkipUNet2DModel.__init__).parameters))
    if unknown:
        raise ValueError(f"--model {options.model!r} is not a UNet2DModel config: unexpected key(s) {unknown}")
    SkipUNet2DModel(**config)


def pretrained_unet_config(options) -> dict:
    """The pretrained UNet's ``config.json`` (a folder, or its pipeline's ``unet/``; Hub ids are asked once):
    :func:`skipdiff.targets.unet_config_of`."""
    return unet_config_of(options.pretrained_model_name_or_path, options.revision, options.cache_dir)


# --------------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSource:
    """What a run trains and with what: the UNet, its noise scheduler, the pixel/latent encoder, the
    conditioning (none, class labels, or text through a pipeline's frozen text encoder), where the encoder
    came from, and the study target of a pretrained pipeline (for its validation grids), if any."""

    unet: nn.Module
    noise_scheduler: object
    encoder: object
    conditioning: object
    encoder_source: str
    target: object = None


def is_pipeline_source(options) -> bool:
    """Whether ``--pretrained_model_name_or_path`` is a whole pipeline (:func:`skipdiff.targets.is_pipeline`):
    then its own VAE, text encoder and noise schedule come with its UNet."""
    return is_pipeline(options.pretrained_model_name_or_path)


def pipeline_source(options, data) -> ModelSource:
    """A pretrained pipeline as the study target view (:func:`skipdiff.targets.load_target`), its UNet given
    the run's skips: a ``SkipUNet2DModel`` for a ``UNet2DModel``, the router as ``skip_router`` otherwise."""
    source = options.pretrained_model_name_or_path
    target = load_target(
        source, revision=options.revision, variant=options.variant, cache_dir=options.cache_dir, device="cpu"
    )
    if target.image_channels != data.channels:
        raise ValueError(
            f"the pipeline {source!r} makes {target.image_channels}-channel images but the dataset has "
            f"{data.channels} channels (--image_channels)"
        )
    if options.resolution % target.encoder.downscale:
        raise ValueError(
            f"--resolution {options.resolution} is not a multiple of the pipeline's VAE downscaling "
            f"{target.encoder.downscale}"
        )
    if target.text_conditioned and not options.caption_column:
        raise ValueError(f"{source!r} is text-conditioned: name the captions with --caption_column")
    if isinstance(target.unet, UNet2DConditionModel):
        unet = target.unet
        unet.skip_router = apply_skip_spec(unet, options.skips, options.markov_options())
    else:
        unet = SkipUNet2DModel.from_unet(
            target.unet, options.skips, _shortcuts_off(options.disable_shortcuts), options.markov_options()
        )
    if data.classes and not target.conditioning.kind == "class":
        raise ValueError(f"--class_conditional, but the pipeline {source!r} is not class-conditional")
    unet.train()
    return ModelSource(
        finish_model(unet, options.unet),
        target.noise_scheduler,
        target.encoder,
        target.conditioning,
        f"{source} (the pipeline's own)",
        target,
    )


def build_unet(options, encoder, data) -> tuple[nn.Module, object]:
    """A preset's fresh ``SkipUNet2DModel`` (or a bare pretrained UNet with the run's skips) and its noise
    scheduler."""
    if options.pretrained_model_name_or_path:
        return _pretrained(options, encoder)
    shortcuts = {part: False for part in options.disable_shortcuts} or None
    config = unet_config(
        options.model,
        sample_size=options.resolution // encoder.downscale,
        channels=encoder.channels,
        num_classes=data.classes,
        skips=options.skips,
        residual_shortcuts=shortcuts,
        markov=options.markov_options(),
    )
    scheduler = make_scheduler(
        options.num_train_timesteps, options.beta_schedule, options.prediction_type, encoder.sample_range
    )
    return SkipUNet2DModel(**config), scheduler


def finish_model(unet: nn.Module, options: UNetOptions) -> nn.Module:
    """What ``--train_only``, ``--gradient_checkpointing``, ``--channels_last`` and ``--torch_compile`` ask."""
    if options.train_only == "gates":
        freeze_all_but_gates(unet)
    elif options.train_only == "lora":
        add_lora(unet, options.lora_rank, options.lora_alpha)
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.torch_compile:
        unet.compile()  # in place: parameter names (and the router's hooks) are unchanged
    return unet


def freeze_all_but_gates(unet: nn.Module) -> int:
    """Freeze every parameter outside ``skip_router`` (the gates and the chain); returns how many train.
    Raises ``ValueError`` when no gate has parameters (nothing would train)."""
    unet.requires_grad_(False)
    router = unet.skip_router
    router.requires_grad_(True)
    count = sum(p.numel() for p in router.parameters())
    if count == 0:
        raise ValueError(
            "--train_only gates, but no skip gate has parameters: use learned, learned_channel or adapter gates "
            f"(skips: {[g.mode for g in router.gates]})"
        )
    return count


LORA_TARGETS = ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None) -> int:
    """LoRA adapters (peft) on every resnet convolution and attention projection; everything else frozen
    (the gates too). Freshly added, they leave the output unchanged (B = 0). Returns the trainable count."""
    from peft import LoraConfig, inject_adapter_in_model  # optional: the lora extra, only for --train_only lora

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(LORA_TARGETS), init_lora_weights=True)
    inject_adapter_in_model(config, unet)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def plain_model(unet: nn.Module) -> nn.Module:
    """The model to save: a copy with LoRA adapters merged into their base weights and removed (a plain
    ``SkipUNet2DModel`` that loads anywhere); ``unet`` itself when it has no adapters."""
    try:
        # optional: peft, the lora extra
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft there are no adapters (only --train_only lora needs it)
        return unet
    if not any(isinstance(m, LoraLayer) for m in unet.modules()):
        return unet
    merged = copy.deepcopy(unet)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if ".lora_" not in k}
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state, strict=True)
    return plain


def _pretrained(options, encoder) -> tuple[nn.Module, object]:
    """A pretrained UNet with the run's skips, and the noise scheduler it was trained with."""
    config = pretrained_unet_config(options)
    source = options.pretrained_model_name_or_path
    subfolder = unet_subfolder(source)
    kwargs = dict(subfolder=subfolder, revision=options.revision, variant=options.variant, cache_dir=options.cache_dir)
    if config.get("_class_name") == "UNet2DConditionModel":
        unet = UNet2DConditionModel.from_pretrained(source, **kwargs)
        unet.skip_router = apply_skip_spec(unet, options.skips, options.markov_options())
    else:
        base = (
            UNet2DModel.from_pretrained(source, **kwargs)
            if config.get("_class_name") == "UNet2DModel"
            else SkipUNet2DModel.from_pretrained(source, **kwargs)
        )
        unet = SkipUNet2DModel.from_unet(
            base, options.skips, _shortcuts_off(options.disable_shortcuts), options.markov_options()
        )
    scheduler = _pretrained_scheduler(options, subfolder, encoder)
    if scheduler is None:
        scheduler = make_scheduler(
            options.num_train_timesteps, options.beta_schedule, options.prediction_type, encoder.sample_range
        )
    return unet, scheduler


def _pretrained_scheduler(options, unet_subfolder: str | None, encoder):
    """The pipeline's own scheduler (as a DDPM scheduler for training), or None for a bare UNet."""
    if unet_subfolder is None:
        return None
    try:
        config = DDPMScheduler.load_config(
            options.pretrained_model_name_or_path,
            subfolder="scheduler",
            revision=options.revision,
            cache_dir=options.cache_dir,
        )
    except (OSError, ValueError):
        return None
    scheduler = DDPMScheduler.from_config(config)
    if encoder.sample_range is None:  # latents: never clip x0 (see skipdiff/encoders.py)
        scheduler.register_to_config(clip_sample=False)
    return scheduler


def skip_unet_from(base: nn.Module, skips, disable_shortcuts: list[str], markov: dict) -> SkipUNet2DModel:
    """Deprecated: :meth:`SkipUNet2DModel.from_unet` (``residual_shortcuts={part: False}`` per disabled part)."""
    warnings.warn(
        "skip_unet_from is deprecated; use SkipUNet2DModel.from_unet(unet, skips=..., "
        "residual_shortcuts=..., markov=...)",
        DeprecationWarning,
        stacklevel=2,
    )
    return SkipUNet2DModel.from_unet(base, skips, _shortcuts_off(disable_shortcuts), markov)


def _shortcuts_off(parts: list[str]) -> dict | None:
    """``--disable_shortcuts down mid`` -> ``{"down": False, "mid": False}`` (None: every shortcut kept)."""
    return {part: False for part in parts} or None
