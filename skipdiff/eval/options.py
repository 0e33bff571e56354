"""What ``python -m skipdiff.eval`` measures and on what: :class:`EvalOptions` (no torch import).

The command line is generated from this dataclass (:func:`skipdiff.config.parse_args`); sweeps build
the same object from their YAML ``eval:`` block. Every numeric option is range-checked here, before any
model is loaded.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import OptionGroup, check_choice, check_local_source, check_output_folder, check_positive, option
from ..data_options import DataOptions
from ..skips.cache_options import SkipCacheOptions

TORCH_DTYPES = ("float32", "bfloat16", "float16")
SAMPLER_CHOICES = ("ddim", "ddpm", "pipeline")
REFERENCE_CHOICES = ("auto", "train", "test")


def resolve_reference(reference: str, test_size: int, num_samples: int) -> str:
    """The real split FID compares samples with: ``"auto"`` takes train (the larger) when the test split can
    still give the floor its ``num_samples`` held-out images, else test; ``"train"``/``"test"`` as given."""
    if reference == "auto":
        return "train" if test_size >= num_samples else "test"
    return reference


DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
MAX_SEED = 2**63 - 1

# The reference data: DataOptions' fields, each None by default, meaning "the run's own" for a skipdiff
# run (its training_options.json) and "not given" for a pipeline (which then needs a source).
DATA_FIELDS = (
    "dataset",
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "image_column",
    "label_column",
    "caption_column",
    "image_channels",
    "resolution",
    "test_fraction",
    "split_seed",
    "max_train_samples",
    "skip_corrupt_images",
    "cache_dir",
)
_DATA_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(DataOptions)}


def _data_option(name: str):
    return option(None, f"{_DATA_HELP[name]} (default: the run's own; for a pipeline, not set)")


@dataclasses.dataclass
class EvalOptions(SkipCacheOptions):
    # ---- sampling with cached skip branches: every field of skipdiff.skips.cache_options.SkipCacheOptions -------
    # ---- what to evaluate -------------------------------------------------------------------------
    checkpoint: str | None = option(
        None,
        "a skipdiff run folder, or a diffusers pipeline with a UNet denoiser (folder or Hub id: DDPM, DDIM, "
        "LDM, Stable Diffusion 1.x/2.x, SDXL)",
    )
    subfolder: str | None = option(
        None, "load the UNet from this subfolder (default: the pipeline's unet/; a run's EMA copy)"
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of --checkpoint")
    variant: str | None = option(None, "weights variant, e.g. fp16 (files named *.fp16.safetensors)")
    torch_dtype: str = option("float32", "dtype the pipeline is loaded in (float16 needs a GPU)", choices=TORCH_DTYPES)
    no_ema: bool = option(False, "score a run's raw weights (unet_raw/) instead of its EMA weights (unet/)")
    skips: str | None = option(
        None,
        "an inference-time skip specification to evaluate the model with (e.g. freeu, zero, 'keep,zero,...'); "
        "weights untouched",
    )
    # ---- text conditioning ------------------------------------------------------------------------
    prompts: str | None = option(None, "a text file, one prompt per line (text-conditioned pipelines)")
    guidance_scale: float | None = option(None, "classifier-free guidance scale (default: the pipeline's own)")
    negative_prompt: str | None = option(None, "negative prompt for classifier-free guidance")
    # ---- samples, FID, CLIP -----------------------------------------------------------------------
    fid: bool = option(False, "FID against the real data, with the real-vs-real floor")
    kid: bool = option(False, "add KID (with --fid)")
    prc: bool = option(False, "add precision/recall (with --fid)")
    clip_score: bool = option(False, "CLIP score of the samples against their prompts (text-conditioned pipelines)")
    clip_model: str = option(
        DEFAULT_CLIP_MODEL, "CLIP model for --clip_score (Hub id or folder with model + processor)"
    )
    grid: bool = option(False, "a sample grid only (also drawn with --fid / --clip_score)")
    grid_size: int = option(8, "rows of the sample grid (one prompt or seed per row)")
    grid_variants: list[str] = option(
        [], "more skip specs drawn as columns of the grid (the original and --skips always are)"
    )
    num_samples: int = option(1000, "generated images per seed")
    seeds: list[int] = option([0, 1, 2], "sampling seeds (mean ± std over them); image i of seed s has its own noise")
    sampler: str = option(
        "ddim", "ddim, ddpm, or pipeline (the scheduler the pipeline was saved with)", choices=SAMPLER_CHOICES
    )
    steps: int = option(50, "sampling steps")
    sample_batch_size: int = option(500, "images per sampling batch")
    feature_extractor: str = option(
        "auto",
        "a built-in image set's name (digits, photo_patches), inception-v3-compat, a classifier folder, or "
        "auto (the data's own extractor for a built-in image set, trained on its train split; else Inception)",
    )
    inception_weights: str | None = option(None, "a local Inception-v3 weights file (offline use)")
    reference: str = option(
        "auto", "real split the samples are compared with: train, test, or auto (the larger one that leaves a floor)"
    )
    # ---- denoising loss and skip importance -------------------------------------------------------
    denoise_loss: bool = option(False, "held-out denoising MSE per timestep bucket (deterministic)")
    buckets: int = option(10, "timestep buckets for the denoising loss and skip importance")
    denoise_images: int | None = option(None, "held-out images for the denoising loss and importance (default: all)")
    denoise_batch_size: int = option(16, "images per denoising batch (results do not depend on it)")
    skip_importance: bool = option(False, "delta denoising loss when each skip alone is zeroed/scaled")
    importance_factors: list[float] = option([0.0], "factors each skip is scaled by (0 = zeroed)")
    # ---- training stability and stochastic skips (skipdiff runs) ----------------------------------
    grad_stability: bool = option(False, "gradient stability from stats.jsonl, plus a shattering probe")
    spike_window: int = option(50, "window of the median + k*MAD spike rule")
    spike_k: float = option(6.0, "k of the spike rule (> 0)")
    map: bool = option(
        True,
        "with stochastic skips: also score the MAP configuration (closed skips, FLOPs saved, "
        "denoising loss and FID under map inference)",
    )
    # ---- the reference data (DataOptions; default: the run's own) ---------------------------------
    dataset: str | None = _data_option("dataset")
    dataset_name: str | None = _data_option("dataset_name")
    dataset_config_name: str | None = _data_option("dataset_config_name")
    train_data_dir: str | None = _data_option("train_data_dir")
    image_column: str | None = _data_option("image_column")
    label_column: str | None = _data_option("label_column")
    caption_column: str | None = _data_option("caption_column")
    image_channels: int | None = _data_option("image_channels")
    resolution: int | None = _data_option("resolution")
    test_fraction: float | None = _data_option("test_fraction")
    split_seed: int | None = _data_option("split_seed")
    max_train_samples: int | None = _data_option("max_train_samples")
    skip_corrupt_images: bool | None = _data_option("skip_corrupt_images")
    cache_dir: str | None = _data_option("cache_dir")
    # ---- output -----------------------------------------------------------------------------------
    compare: list[str] = option([], "evaluated folders to put side by side (reads each <run>/eval/eval.json)")
    out: str | None = option(None, "output folder (default <checkpoint>/eval, or <checkpoint>/eval-<skips>)")
    overwrite: bool = option(
        False,
        "replace an eval.json in --out whose settings differ (default: refused; an evaluation with the same "
        "settings adds its sections to it)",
    )
    num_threads: int | None = option(None, "torch CPU threads")

    # the caching fields as their own group (not "cache": that is the --cache flag), what sampling takes
    caching = OptionGroup(SkipCacheOptions)

    def check_sources(self) -> None:
        """A local-looking ``--checkpoint``/``--compare`` path that does not exist is refused at once, not
        after a Hub lookup. (Called when an evaluation starts, not in :meth:`validate`: a spec may name a
        run folder that an earlier step has still to make.)"""
        for source in [self.checkpoint, *self.compare] if self.checkpoint else list(self.compare):
            check_local_source(source, "--checkpoint" if source == self.checkpoint else "--compare")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value (nothing is loaded)."""
        super().validate()
        check_output_folder(self.out)
        if not self.compare and not self.checkpoint:
            raise ValueError("give --checkpoint RUN (or --compare RUN_A RUN_B ...)")
        if self.checkpoint and not self.wants_anything:
            raise ValueError(
                "nothing to do: add --fid, --clip_score, --grid, --denoise_loss, --grad_stability and/or --skip_importance"
            )
        check_positive(
            self,
            ("num_samples", "steps", "sample_batch_size", "buckets", "spike_window", "grid_size", "denoise_batch_size"),
        )
        check_positive(self, ("denoise_images", "num_threads"), optional=True)
        if self.fid and self.num_samples < 2:
            raise ValueError(f"--num_samples must be >= 2 for FID, got {self.num_samples}")
        if (self.kid or self.prc) and not self.fid:
            raise ValueError("--kid and --prc need --fid")
        check_choice(self, "reference", REFERENCE_CHOICES)
        check_choice(self, "torch_dtype", TORCH_DTYPES)
        check_choice(self, "sampler", SAMPLER_CHOICES)
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds) or not all(0 <= s <= MAX_SEED for s in self.seeds):
            raise ValueError(f"--seeds must be distinct integers in [0, 2**63), got {self.seeds}")
        factors = self.importance_factors
        if not factors or len(set(factors)) != len(factors) or not all(math.isfinite(f) and f >= 0 for f in factors):
            raise ValueError(f"--importance_factors must be distinct finite numbers >= 0, got {factors}")
        if not (math.isfinite(self.spike_k) and self.spike_k > 0):
            raise ValueError(f"--spike_k must be a positive finite number, got {self.spike_k}")
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"--guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.no_ema and self.subfolder:
            raise ValueError("give --subfolder or --no_ema, not both (--no_ema means the run's raw weights)")
        if self.grid_variants and not (self.grid or self.fid or self.clip_score):
            raise ValueError("--grid_variants draws grid columns: add --grid (or --fid / --clip_score)")
        self.data_overrides()  # DataOptions' own checks on what was given

    @property
    def wants_anything(self) -> bool:
        return any((self.fid, self.clip_score, self.grid, self.denoise_loss, self.grad_stability, self.skip_importance))

    @property
    def wants_samples(self) -> bool:
        return self.fid or self.clip_score or self.grid

    def data_overrides(self) -> dict:
        """The data options given on the command line (None: not given), checked by DataOptions' rules."""
        given = {name: getattr(self, name) for name in DATA_FIELDS if getattr(self, name) is not None}
        probe = DataOptions(**{**given, "dataset": given.get("dataset", "digits")})
        probe.validate()
        return given
