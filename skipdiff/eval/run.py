"""The data evaluation reads for a study target: held-out batches, the prompts it samples from, checks.

Which images: a skipdiff run's own data (its ``training_options.json``) or, for a pipeline, the data the
user names (``--dataset_name`` / ``--train_data_dir``, ``--caption_column``): see
:meth:`skipdiff.targets.StudyTarget.data_options`. The held-out (test) split feeds the denoising loss and
the skip importance; FID compares samples with the reference split (:mod:`.fid`).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from torch.utils.data import DataLoader

from ..config import subset
from ..data import collate_images, dataset_channels, load_image_splits, options_transform, with_pixel_values
from ..data_options import DataOptions


def held_out_batches(
    data: DataOptions | dict, batch_size: int = 16, limit: int | None = None
) -> tuple[list[dict], int]:
    """The test split as a list of batches (``pixel_values``[, ``labels``, ``captions``]) and its channels.

    ``data`` is a :class:`DataOptions` or a dict holding its fields (a run's training options); ``limit``
    keeps the first images of the split."""
    data = data if isinstance(data, DataOptions) else subset(DataOptions, data)
    splits = load_image_splits(data)
    channels = dataset_channels(splits, data.image_channels)
    test = splits["test"]
    if limit is not None and limit < len(test):
        test = test.select(range(limit))
    test = with_pixel_values(test, options_transform(data, channels, train=False))
    return list(DataLoader(test, batch_size=batch_size, collate_fn=collate_images)), channels


def check_data_matches(target, data: DataOptions, channels: int) -> None:
    """The target must make images at the data's resolution and channels; else a clear ``ValueError``.

    Text-conditioned pipelines sample at any resolution (their UNet is convolutional): only the channels
    must match."""
    if not target.text_conditioned and target.resolution != data.resolution:
        raise ValueError(
            f"the model makes {target.resolution}px images but the dataset is evaluated at {data.resolution}px "
            "(--resolution)"
        )
    if data.resolution % target.encoder.downscale:
        raise ValueError(
            f"--resolution {data.resolution} is not a multiple of the encoder's downscale {target.encoder.downscale}"
        )
    if target.image_channels != channels:
        raise ValueError(
            f"the model makes {target.image_channels}-channel images but the dataset has {channels} "
            "channels (--image_channels)"
        )
    if target.training_options is None and data.image_channels is not None:  # a pipeline: converted to its channels
        own = dataset_channels(load_image_splits(data))
        if own != channels:
            how = "grey repeated to 3 channels" if own == 1 else "colour reduced to grey (luma)"
            warnings.warn(
                f"the model makes {channels}-channel images but the reference images are {own}-channel: "
                f"they are converted ({how}) to score it, so its FID and denoising loss measure it against "
                f"{'grey' if own == 1 else 'colour'} images it may never have been trained on",
                UserWarning,
                stacklevel=2,
            )


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a prompt file (one prompt per line)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts {path!r} is not a file")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt (one per line)")
    return prompts


def sampling_prompts(target, prompts_file: str | None, data: DataOptions | None) -> list[str] | None:
    """What a text-conditioned target samples from: the prompt file, else the held-out split's captions
    (the split the FID floor is drawn from). None for other targets; ``ValueError`` when there is neither."""
    if not target.text_conditioned:
        if prompts_file:
            raise ValueError(f"--prompts given, but {target.source!r} is not text-conditioned")
        return None
    if prompts_file:
        return read_prompts(prompts_file)
    if data is None or data.caption_column is None:
        raise ValueError(
            f"{target.source!r} is text-conditioned: give --prompts FILE (one prompt per line) or a captioned "
            "dataset (--dataset_name/--train_data_dir with --caption_column)"
        )
    splits = load_image_splits(data)
    return [str(caption) for caption in splits["test"]["caption"]]


def load_run(checkpoint: str, use_ema: bool = True):
    """``(pipeline, training options, used_ema)`` of a skipdiff run folder or Hub repo (see
    :func:`skipdiff.targets.load_target`, which this wraps)."""
    # heavy: diffusers (targets) only when a run is loaded; held_out_batches needs none
    from ..targets import load_target

    target = load_target(checkpoint, use_ema=use_ema)
    if target.training_options is None:
        raise ValueError(f"{checkpoint!r} is a {target.identity['pipeline_class']}, not a skipdiff run")
    return target.pipeline, target.training_options, target.identity["ema"]


def data_dict(data: DataOptions) -> dict:
    """A DataOptions as the dict :func:`skipdiff.eval.fid.real_splits` reads."""
    return dataclasses.asdict(data)
