"""A *study target*: whatever skipdiff measures, seen one way.

Evaluation, skip importance and inference sweeps take a :class:`StudyTarget` and never ask where it
came from. :func:`load_target` turns a folder or a Hub id into one; the ``if run folder / if
pipeline`` branches live here and nowhere else. It accepts

* a **skipdiff run** (``train_unet.py``'s output folder, or a Hub repo of one): ``SkipDiffPipeline``
  with its EMA weights (``unet/``; ``unet_ema/`` in older runs) or the raw ones (``use_ema=False``),
  the data it was trained on (``training_options.json``) and its ``stats.jsonl``;
* a **diffusers pipeline whose denoiser is a UNet**: ``DDPMPipeline`` / ``DDIMPipeline`` (pixels, e.g.
  ``google/ddpm-cifar10-32``), ``LDMPipeline`` (VQ latents), ``StableDiffusionPipeline`` (1.x, 2.x) and
  ``StableDiffusionXLPipeline`` (text through the pipeline's own encoders, see :mod:`skipdiff.conditioning`).

The pipeline's ``model_index.json`` is read first (from the Hub: that one file) and a denoiser that is
not a UNet (DiT, PixArt, SD3, Flux: transformers) is refused with a ``ValueError`` naming its class,
before any weights are downloaded. ``subfolder``, ``revision``, ``variant`` and ``torch_dtype`` are
passed to diffusers' ``from_pretrained`` as diffusers users know them (``subfolder``: where the UNet to
score lives, e.g. a run's ``unet_raw``).

A target's view: ``unet``; ``encoder`` (pixels, the pipeline's ``AutoencoderKL``, or an LDM's
``VQModel``: :mod:`skipdiff.encoders`); ``conditioning`` (none, class labels, text); ``scheduler`` (the
pipeline's sampler) and ``noise_scheduler`` (the forward process ``q(x_t | x_0)`` for denoising losses,
a ``DDPMScheduler`` from the same config); ``identity`` and ``weights`` (what was loaded, with a digest
of the weight files, so that a result can say which weights it scored); and :meth:`StudyTarget.skips_applied`,
an inference-time skip specification for the length of a ``with`` block (weights untouched).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub
import torch
from diffusers import UNet2DModel
from torch import nn

from .conditioning import ClassLabels, Conditioning, TextConditioning, Unconditional
from .config import subset
from .data_options import SPLIT_FIELDS, DataOptions
from .encoders import Encoder, PixelEncoder, VaeEncoder, VqEncoder
from .pipeline import SkipDiffPipeline, check_export_finished, weights_layout
from .runfolder import OPTIONS_FILE, weights_digest
from .skips.unet import SkipUNet2DModel, skip_spec_applied

# Pipelines skipdiff knows how to sample and condition: class name -> kind of target.
PIPELINE_KINDS = {
    "SkipDiffPipeline": "skipdiff-run",
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
    "LDMPipeline": "vq-latent",
    "StableDiffusionPipeline": "text",
    "StableDiffusionXLPipeline": "text-xl",
}
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "SkipUNet2DModel")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # Hub pipelines saved before safetensors hold .bin files
MODEL_INDEX = "model_index.json"
PIPELINE_UNET = "unet"  # where a pipeline (and a run folder) keeps its UNet


def _dtype_keyword() -> str:
    """diffusers >= 0.36 names from_pretrained's dtype argument ``dtype`` (``torch_dtype`` is deprecated)."""
    try:
        # a version probe: only diffusers >= 0.36 has it
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


DTYPE_KEYWORD = _dtype_keyword()


# --------------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StudyTarget:
    """One model under study, whatever its source (see the module docstring)."""

    source: str  # the folder or Hub id as given
    kind: str  # a value of PIPELINE_KINDS
    pipeline: Any  # the loaded DiffusionPipeline (text targets sample through its own __call__)
    unet: nn.Module
    scheduler: Any  # the sampling scheduler the pipeline was saved with
    noise_scheduler: Any  # DDPMScheduler of the same config: q(x_t | x_0), training targets
    encoder: Encoder
    conditioning: Conditioning
    identity: dict  # what was loaded: classes, revision, subfolder, variant, dtype, EMA
    weights: dict  # {"digest": ..., "components": {name: {"folder", "digest"}}} (local) or {"revision": sha}
    training_options: dict | None = None  # a skipdiff run's training_options.json
    folder: Path | None = None  # the local folder (None for a Hub id)

    @property
    def text_conditioned(self) -> bool:
        return self.conditioning.kind == "text"

    @property
    def latent_size(self) -> int:
        size = self.unet.config.sample_size
        return size[0] if isinstance(size, list | tuple) else size

    @property
    def resolution(self) -> int:
        """Side of the images the target makes by default (pixels)."""
        return self.latent_size * self.encoder.downscale

    @property
    def image_channels(self) -> int:
        return self.encoder.vae.config.in_channels if hasattr(self.encoder, "vae") else self.unet.config.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of one latent (or pixel sample) the UNet denoises at ``resolution`` (default: its own)."""
        side = self.latent_size if resolution is None else resolution // self.encoder.downscale
        return (self.unet.config.in_channels, side, side)

    def skips_applied(self, spec):
        """``with target.skips_applied(spec):`` the UNet runs with skip specification ``spec`` (None: as it
        is), its weights untouched; afterwards it is bit for bit the model it was. Yields the router
        (:func:`skipdiff.skips.unet.skip_spec_applied`)."""
        return skip_spec_applied(self.unet, spec)

    def data_options(self, given: dict) -> DataOptions:
        """The reference data: a run's own (``training_options.json``) with ``given`` overriding it; for a
        pipeline, what ``given`` names (at the target's resolution and channels unless given)."""
        given = {key: value for key, value in given.items() if value is not None}
        if self.training_options is not None:
            return subset(DataOptions, {**self.training_options, **given})
        if not {"dataset", "dataset_name", "train_data_dir"} & set(given):
            raise ValueError(
                f"name the reference images for {self.source!r}: --dataset_name <Hub id> or --train_data_dir "
                "<folder> (with --caption_column for text-conditioned pipelines)"
            )
        defaults = {"resolution": self.resolution, "image_channels": self.image_channels}
        return subset(DataOptions, {**defaults, **given})

    def describe(self) -> dict:
        """What was loaded (for results): identity, encoder, conditioning."""
        return {
            **self.identity,
            "kind": self.kind,
            "encoder": self.encoder.describe(),
            "conditioning": self.conditioning.describe(),
            "resolution": self.resolution,
        }


# --------------------------------------------------------------------------------------------------
# What a model source is: a run folder or pipeline (model_index.json), a bare UNet (config.json), a Hub id
# --------------------------------------------------------------------------------------------------


def unet_subfolder(source: str) -> str | None:
    """Where ``source`` (a folder or Hub id) keeps its UNet: ``None`` for a bare UNet (``config.json`` at its
    root), :data:`PIPELINE_UNET` for a pipeline or a run folder. A Hub id is asked for its root config."""
    local = Path(source)
    if local.exists():
        return None if (local / "config.json").is_file() else PIPELINE_UNET
    try:
        UNet2DModel.load_config(source)
        return None
    except (OSError, ValueError):
        return PIPELINE_UNET


def is_pipeline(source: str | None) -> bool:
    """Whether ``source`` is a whole pipeline (a ``model_index.json``; on the Hub: no UNet at its root), whose
    own VAE, text encoder and noise schedule come with its UNet."""
    if not source:
        return False
    if Path(source).exists():
        return (Path(source) / MODEL_INDEX).is_file()
    return unet_subfolder(source) == PIPELINE_UNET


def unet_config_of(
    source: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    flag: str = "--pretrained_model_name_or_path",
) -> dict:
    """The UNet's ``config.json`` of ``source``: a UNet folder, or its pipeline's ``unet/``; a Hub id is asked
    once per place. ``flag`` names the option in the ``ValueError`` when there is none."""
    local = Path(source)
    if local.exists():
        for candidate in (local / "config.json", local / PIPELINE_UNET / "config.json"):
            if candidate.is_file() and "_class_name" in (config := json.loads(candidate.read_text())):
                if "UNet" in config["_class_name"]:
                    return config
        raise ValueError(f"{flag} {source!r} holds no UNet (no config.json or unet/config.json)")
    errors = []
    for subfolder in (None, PIPELINE_UNET):
        try:
            return dict(UNet2DModel.load_config(source, subfolder=subfolder, revision=revision, cache_dir=cache_dir))
        except (OSError, ValueError) as err:
            errors.append(str(err).splitlines()[0])
    raise ValueError(
        f"could not load the UNet config of {source!r} (offline, a typo, or a private repo?): {errors[-1]}"
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_target(
    checkpoint: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: str = "float32",
    use_ema: bool = True,
    cache_dir: str | None = None,
    device: str | torch.device | None = None,
) -> StudyTarget:
    """A :class:`StudyTarget` from a skipdiff run or a diffusers UNet pipeline (folder or Hub id).

    Raises ``ValueError`` naming the problem: a missing folder, a pipeline whose denoiser is not a UNet
    (before downloading weights), a damaged EMA copy (``use_ema=False`` scores the raw weights), float16
    on a CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(torch_dtype, device)
    index, local, revision_sha = read_model_index(checkpoint, revision, cache_dir)
    pipeline_class = check_denoiser(index, checkpoint)
    source = {
        "checkpoint": checkpoint,
        "subfolder": subfolder,
        "revision": revision,
        "variant": variant,
        "dtype": dtype,
        "cache_dir": cache_dir,
    }
    if pipeline_class == "SkipDiffPipeline":
        target = _run_target(source, index, local, use_ema)
    else:
        if not use_ema:
            raise ValueError(f"--no_ema applies to skipdiff runs; {checkpoint!r} is a {pipeline_class}")
        target = _pipeline_target(source, pipeline_class, index, local)
    target.identity.update(torch_dtype=torch_dtype, revision=revision_sha or revision, variant=variant)
    target.weights = _weights_identity(target, local, revision_sha)
    target.pipeline.to(device)
    target.encoder.to(device)
    target.unet.eval()
    return target


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` -> torch dtype; float16 is refused on a CPU (many CPU kernels
    have no half-precision version; bfloat16 works)."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"--torch_dtype must be one of {sorted(TORCH_DTYPES)}, got {name!r}")
    if name == "float16" and device.type == "cpu":
        raise ValueError("--torch_dtype float16 needs a GPU (CPU kernels lack half precision); use bfloat16 or float32")
    return TORCH_DTYPES[name]


def read_model_index(
    checkpoint: str, revision: str | None = None, cache_dir: str | None = None
) -> tuple[dict, Path | None, str | None]:
    """``(model_index.json, local folder or None, Hub commit sha or None)``; from the Hub, only that file
    is downloaded."""
    path = Path(checkpoint)
    if path.exists():
        check_export_finished(path)
        if not (path / MODEL_INDEX).is_file() and (path / OPTIONS_FILE).is_file():
            raise ValueError(
                f"--checkpoint {checkpoint!r} is a skipdiff run without its exported pipeline (no "
                f"{MODEL_INDEX}: it has not finished); finish it with --resume_from_checkpoint latest"
            )
        if not (path / MODEL_INDEX).is_file():
            raise ValueError(
                f"--checkpoint {checkpoint!r} is not a skipdiff run folder or a diffusers pipeline (no {MODEL_INDEX})"
            )
        return json.loads((path / MODEL_INDEX).read_text()), path, None
    if checkpoint.count("/") != 1:
        raise ValueError(f"--checkpoint {checkpoint!r} does not exist (and is not a Hub id like user/name)")
    try:
        downloaded = Path(
            huggingface_hub.hf_hub_download(checkpoint, MODEL_INDEX, revision=revision, cache_dir=cache_dir)
        )
    except Exception as err:  # noqa: BLE001  offline, typo, private repo, not a pipeline: all one answer
        raise ValueError(
            f"could not fetch {MODEL_INDEX} of {checkpoint!r} from the Hub (offline, a typo, a private repo, or not a "
            f"diffusers pipeline?): {str(err).splitlines()[0]}"
        ) from err
    sha = downloaded.parent.name if downloaded.parent.parent.name == "snapshots" else None
    return json.loads(downloaded.read_text()), None, sha


def check_denoiser(index: dict, checkpoint: str = "") -> str:
    """The pipeline class of a ``model_index.json`` when skipdiff can study it; else ``ValueError``
    saying why (a transformer denoiser has no long skips; other UNet pipelines are conditioned in ways
    skipdiff does not implement)."""
    name = index.get("_class_name", "?")
    if isinstance(name, list):  # a run folder's own code: ["skipdiff_pipeline", "SkipDiffPipeline"] (remote code)
        name = name[-1]
    components = {
        key: value
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2
    }
    transformer = (components.get("transformer") or [None, None])[1]
    if transformer:
        raise ValueError(
            f"{checkpoint!r} is a {name} whose denoiser is a {transformer}, a transformer: it has no long "
            "encoder-decoder skip connections, which is what skipdiff measures. Supported: pipelines whose "
            f"denoiser is a {' or '.join(UNET_CLASSES[:2])} ({', '.join(PIPELINE_KINDS)})"
        )
    unet = (components.get("unet") or [None, None])[1]
    if unet not in UNET_CLASSES:
        raise ValueError(
            f"{checkpoint!r} is a {name} without a UNet denoiser (unet: {unet}); supported pipelines: "
            f"{', '.join(PIPELINE_KINDS)}"
        )
    if name not in PIPELINE_KINDS:
        raise ValueError(
            f"{checkpoint!r} is a {name}: its {unet} is a UNet, but skipdiff does not implement how that pipeline "
            f"conditions it; supported pipelines: {', '.join(PIPELINE_KINDS)}"
        )
    return name


def _from_pretrained(cls, checkpoint: str, source: dict, **kwargs):
    """``cls.from_pretrained`` with the source's revision, variant, dtype and cache; errors -> ``ValueError``."""
    options = {"revision": source["revision"], DTYPE_KEYWORD: source["dtype"], "cache_dir": source["cache_dir"]}
    if source["variant"]:
        options["variant"] = source["variant"]
    try:
        return cls.from_pretrained(checkpoint, **options, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        where = f" (subfolder {kwargs['subfolder']!r})" if kwargs.get("subfolder") else ""
        raise ValueError(
            f"could not load {cls.__name__} from {checkpoint!r}{where} (damaged or incomplete?): "
            f"{str(err).splitlines()[0]}"
        ) from err


# ---- a skipdiff run ------------------------------------------------------------------------------


def _run_target(source: dict, index: dict, local: Path | None, use_ema: bool) -> StudyTarget:
    """A skipdiff run: components loaded one by one, so that a damaged EMA copy is an error of its own
    (never replaced by the raw weights) and ``use_ema=False`` works even when the EMA copy is damaged."""
    checkpoint = source["checkpoint"]
    options = _training_options(checkpoint, local, source)
    layout = (
        weights_layout(local)
        if local is not None
        else {
            "ema": "unet" if options.get("use_ema", True) else None,
            "raw": "unet_raw" if options.get("use_ema", True) else "unet",
        }
    )
    used_ema = use_ema and layout["ema"] is not None
    folder = source["subfolder"] or (layout["ema"] if used_ema else layout["raw"])
    if source["subfolder"] and not use_ema:
        raise ValueError("give --subfolder or --no_ema, not both (--no_ema means the run's raw weights)")
    try:
        unet = SkipUNet2DModel.from_pretrained(
            checkpoint,
            subfolder=folder,
            revision=source["revision"],
            cache_dir=source["cache_dir"],
            **{DTYPE_KEYWORD: source["dtype"]},
        )
    except (OSError, ValueError, RuntimeError) as err:
        hint = "; pass --no_ema to score the raw weights" if used_ema and not source["subfolder"] else ""
        raise ValueError(
            f"the run's {folder}/ weights cannot be loaded (damaged?){hint}: {str(err).splitlines()[0]}"
        ) from err
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    scheduler = scheduler_class.from_pretrained(
        checkpoint, subfolder="scheduler", revision=source["revision"], cache_dir=source["cache_dir"]
    )
    vae = None
    if (index.get("vae") or [None, None])[1]:
        vae = _from_pretrained(getattr(diffusers, index["vae"][1]), checkpoint, source, subfolder="vae")
    pipeline = SkipDiffPipeline(unet=unet, scheduler=scheduler, vae=vae)
    conditioning = ClassLabels(unet.config.num_class_embeds) if unet.config.num_class_embeds else Unconditional()
    identity = {
        "source": checkpoint,
        "pipeline_class": "SkipDiffPipeline",
        "unet_class": type(unet).__name__,
        "subfolder": folder,
        "ema": used_ema,
    }
    components = {"unet": folder, **({"vae": "vae"} if vae is not None else {})}
    return StudyTarget(
        checkpoint,
        PIPELINE_KINDS["SkipDiffPipeline"],
        pipeline,
        unet,
        scheduler,
        scheduler,
        pipeline.encoder(),
        conditioning,
        identity,
        {"components": components},
        training_options=options,
        folder=local,
    )


def _training_options(checkpoint: str, local: Path | None, source: dict) -> dict:
    if local is not None:
        path = local / OPTIONS_FILE
        if not path.is_file():
            raise ValueError(f"{checkpoint!r} is a SkipDiffPipeline without {OPTIONS_FILE}: not a skipdiff run folder")
        options = json.loads(path.read_text())
        check_split_agrees(local, options)
        return options
    try:
        path = huggingface_hub.hf_hub_download(
            checkpoint, OPTIONS_FILE, revision=source["revision"], cache_dir=source["cache_dir"]
        )
    except Exception as err:  # noqa: BLE001  offline, missing file, ...
        raise ValueError(f"{checkpoint!r} has no {OPTIONS_FILE}: {err}") from err
    return json.loads(Path(path).read_text())


def check_split_agrees(folder: Path, options: dict) -> None:
    """Refuse a run folder whose ``training_options.json`` names another train/test split
    (:data:`~skipdiff.data_options.SPLIT_FIELDS`) than the options its latest checkpoint saved: the file is the
    run's to read and edit, so an edit (a ``split_seed``, a ``test_fraction``) would silently score another test
    split, training images among it. A run without checkpoints has nothing to compare."""
    # training: evaluation imports this module and stays free of training modules (test_layout)
    from .training.checkpoints import STATE_FILE, list_checkpoints, read_state

    latest = next((c for c in reversed(list_checkpoints(folder)) if (c / STATE_FILE).is_file()), None)
    saved = read_state(latest).get("training_options") if latest is not None else None
    if saved is None:  # no checkpoint, or one written before checkpoints kept the options
        return
    differing = [name for name in SPLIT_FIELDS if name in saved and saved[name] != options.get(name)]
    if differing:
        details = "; ".join(
            f"{name}: {OPTIONS_FILE} {options.get(name)!r} vs checkpoint {saved[name]!r}" for name in differing
        )
        raise ValueError(
            f"{str(folder / OPTIONS_FILE)!r} names another train/test split than the run was trained "
            f"with ({details}; its {latest.name}/{STATE_FILE} keeps the options it trained with): "
            f"evaluating it would score other test images, training images among them; restore "
            f"{OPTIONS_FILE} to those values"
        )


# ---- a diffusers pipeline ------------------------------------------------------------------------


def _pipeline_target(source: dict, pipeline_class: str, index: dict, local: Path | None) -> StudyTarget:
    checkpoint = source["checkpoint"]
    extra = {}
    unet_folder = source["subfolder"] or "unet"
    if source["subfolder"]:
        unet_class = getattr(diffusers, index["unet"][1])
        extra["unet"] = _from_pretrained(unet_class, checkpoint, source, subfolder=source["subfolder"])
    pipeline = _from_pretrained(getattr(diffusers, pipeline_class), checkpoint, source, **extra)
    pipeline.set_progress_bar_config(disable=True)
    kind = PIPELINE_KINDS[pipeline_class]
    unet = pipeline.unet
    encoder, encoder_folder = _pipeline_encoder(pipeline, kind)
    if kind.startswith("text"):
        conditioning: Conditioning = TextConditioning(pipeline)
    elif unet.config.num_class_embeds:
        conditioning = ClassLabels(unet.config.num_class_embeds)
    else:
        conditioning = Unconditional()
    noise_scheduler = diffusers.DDPMScheduler.from_config(pipeline.scheduler.config)
    identity = {
        "source": checkpoint,
        "pipeline_class": pipeline_class,
        "unet_class": type(unet).__name__,
        "subfolder": source["subfolder"],
        "ema": None,
        "scheduler_class": type(pipeline.scheduler).__name__,
    }
    components = {"unet": unet_folder, **({encoder_folder: encoder_folder} if encoder_folder else {})}
    components.update({name: name for name in ("text_encoder", "text_encoder_2") if getattr(pipeline, name, None)})
    return StudyTarget(
        checkpoint,
        kind,
        pipeline,
        unet,
        pipeline.scheduler,
        noise_scheduler,
        encoder,
        conditioning,
        identity,
        {"components": components},
        folder=local,
    )


def _pipeline_encoder(pipeline, kind: str) -> tuple[Encoder, str | None]:
    """The pipeline's pixel/latent encoder and the folder of its weights."""
    if kind == "pixel":
        return PixelEncoder(pipeline.unet.config.in_channels), None
    if kind == "vq-latent":
        vqvae = pipeline.vqvae
        # VQ models converted before diffusers had a scaling_factor option (CompVis' LDMs) were trained on
        # unscaled latents (LDM paper, sec. 4.3.2); diffusers' default 0.18215 would be wrong for them.
        declared = "scaling_factor" not in (vqvae.config.get("_use_default_values") or [])
        return VqEncoder(vqvae, None if declared else 1.0), "vqvae"
    vae = pipeline.vae
    if getattr(vae.config, "latents_mean", None) is not None:
        raise ValueError("this pipeline's VAE normalises latents per channel (latents_mean/std): not supported yet")
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae = copy.deepcopy(vae).float()  # SDXL's VAE overflows in float16 (the pipeline upcasts it to decode)
    return VaeEncoder(vae), "vae"


# ---- which weights -------------------------------------------------------------------------------


def _weights_identity(target: StudyTarget, local: Path | None, revision_sha: str | None) -> dict:
    """``{"digest", "components": {name: {"folder", "digest"}}}`` over the weight files of the components
    that were loaded (local folders), or ``{"revision": commit}`` for a Hub snapshot (immutable)."""
    components = target.weights["components"]
    if local is None:
        return {"digest": revision_sha, "revision": revision_sha, "components": {}}
    digests = {
        name: {"folder": folder, "digest": weights_digest(local / folder, WEIGHT_PATTERNS)}
        for name, folder in sorted(components.items())
    }
    return {"digest": combine_digests(digests), "components": digests}


def combine_digests(components: dict) -> str:
    """One digest over the components' digests (names included)."""
    text = json.dumps({name: entry["digest"] for name, entry in sorted(components.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_changed(folder: str | Path, weights: dict) -> str | None:
    """Why the weights recorded in a result (``weights``) are not those in ``folder`` now, or None when they
    are (or cannot be checked: a Hub snapshot is pinned by its commit)."""
    components = weights.get("components") or {}
    for name, entry in sorted(components.items()):
        path = Path(folder) / entry["folder"]
        try:
            now = weights_digest(path, WEIGHT_PATTERNS)
        except ValueError:
            return f"{str(path)!r} holds no weights any more"
        if now != entry["digest"]:
            return f"{name} weights in {str(path)!r} changed (digest {entry['digest']} when scored, {now} now)"
    return None
