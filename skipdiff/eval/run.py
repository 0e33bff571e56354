"""Loading what evaluation scores: a training run's folder (or a Hub repo) and its data."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import subset
from ..data import collate_images, dataset_channels, image_transform, load_image_splits, with_pixel_values
from ..data_options import DataOptions
from ..pipeline import SkipDiffPipeline, weights_layout


def load_run(checkpoint: str, use_ema: bool = True) -> tuple[SkipDiffPipeline, dict, bool]:
    """``(pipeline, training options, used_ema)`` of a run folder or a Hub repo id.

    A run trained with an EMA saves the EMA weights as ``unet/`` and the raw ones as ``unet_raw/``;
    ``use_ema=False`` scores the raw ones (:func:`skipdiff.pipeline.weights_layout`; runs saved before
    that layout keep the EMA in ``unet_ema/``). A damaged EMA copy is an error, never silently replaced
    by the raw weights.
    """
    path = Path(checkpoint)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"--checkpoint {checkpoint!r} is not a skipdiff run folder (no model_index.json)")
    if not path.exists() and checkpoint.count("/") != 1:
        raise ValueError(f"--checkpoint {checkpoint!r} does not exist (and is not a Hub id like user/name)")
    options = _training_options(checkpoint)
    has_ema = weights_layout(path)["ema"] is not None if path.exists() else options.get("use_ema", True)
    used_ema = use_ema and has_ema
    try:
        pipeline = SkipDiffPipeline.from_pretrained(checkpoint, use_ema=used_ema)
    except (OSError, ValueError, RuntimeError) as err:
        hint = "; pass --no_ema to score the raw weights" if used_ema else ""
        raise ValueError(f"could not load the run {checkpoint!r} (damaged or incomplete?){hint}: {err}") from err
    pipeline.unet.eval()
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    return pipeline, options, used_ema


def _training_options(checkpoint: str) -> dict:
    local = Path(checkpoint) / "training_options.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(checkpoint, "training_options.json")).read_text())
    except Exception as err:  # noqa: BLE001  offline, missing file, ...
        raise ValueError(f"{checkpoint!r} has no training_options.json: {err}") from err


def check_data_matches(pipeline: SkipDiffPipeline, options: dict, channels: int) -> None:
    """The run's model must take the data's resolution and channels; else a clear ``ValueError``."""
    encoder = pipeline.encoder()
    size = pipeline.unet.config.sample_size
    size = size[0] if isinstance(size, list | tuple) else size
    if size * encoder.downscale != options["resolution"]:
        raise ValueError(
            f"the model makes {size * encoder.downscale}px images but the dataset is evaluated at "
            f"{options['resolution']}px (--resolution)"
        )
    model_channels = (
        pipeline.vae.config.in_channels if pipeline.vae is not None else pipeline.unet.config.in_channels
    )
    if model_channels != channels:
        raise ValueError(
            f"the model makes {model_channels}-channel images but the dataset has {channels} channels"
        )


def held_out_batches(options: dict, batch_size: int = 512) -> tuple[list[dict], int]:
    """The run's test split as a list of batches (``pixel_values``, ``labels``), and its channels."""
    data = subset(DataOptions, options)
    splits = load_image_splits(data)
    channels = dataset_channels(splits, data.image_channels)
    test = with_pixel_values(splits["test"], image_transform(options["resolution"], channels))
    return list(DataLoader(test, batch_size=batch_size, collate_fn=collate_images)), channels


def make_sampler(
    pipeline: SkipDiffPipeline, sampler: str, steps: int, batch_size: int, num_classes: int | None
):
    """``sample_fn(n, seed) -> (n, C, H, W)`` in [-1, 1], batched, seeded, with a progress bar.

    Class-conditional models get labels 0, 1, 2, ... cycling over the classes (balanced).
    """

    def sample_fn(count: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        chunks = []
        for start in tqdm(range(0, count, batch_size), desc=f"sampling (seed {seed})", leave=False):
            size = min(batch_size, count - start)
            labels = [(start + i) % num_classes for i in range(size)] if num_classes else None
            out = pipeline(batch_size=size, num_inference_steps=steps, generator=generator, class_labels=labels,
                           sampler=sampler, output_type="pt", show_progress=False)  # fmt: skip
            chunks.append(out.images.cpu())
        return torch.cat(chunks)

    return sample_fn
