"""A domain feature extractor for FID: a small SkipResNet trained to classify a built-in image set.

Inception-v3 was trained on 299x299 ImageNet photographs; 16x16 digits or photo patches lie far from
them, and its weights need a download. For a built-in labelled image set (``digits``,
``photo_patches``; :data:`skipdiff.data_options.IMAGE_DATASETS`) FID can use instead the penultimate
features of a classifier trained on the set itself, as FID on MNIST usually does. One recipe for every
set (:data:`RECIPE`): SkipResNet widths (16, 32, 64), one block per stage, 64-d features; AdamW with a
one-cycle schedule, 5 epochs of batch 64, no augmentation; seeded, deterministic for a given thread
count, and leaving the global RNG untouched.

**Split.** The extractor trains on the run's own train split: the run's :class:`DataOptions` (dataset,
split seed, test fraction, resolution, channels) define it, so the test images that give FID its floor
(or serve as its reference) are never seen by the extractor. A run's ``--max_train_samples`` subset is
not applied: the whole train split holds no test image either, and a 100-image subset would make a poor
extractor. Every training seed of a sweep shares the extractor (its own seed stays 0), so their FIDs
are comparable.

**Cache.** ``<cache>/extractors/<dataset>-<resolution>px[-c<channels>]-<split key>-seed<seed>/`` holds
``config.json`` + ``model.safetensors`` and ``extractor.json`` (held-out accuracy, recipe, training
time, the registered name); :func:`cached_domain_extractor` trains it on first use (50-90 s for digits on one
CPU thread, printing a line per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..classifiers import SkipResNetConfig, SkipResNetForImageClassification
from ..data_options import IMAGE_DATASETS, DataOptions
from .extractors import EXTRACTOR_INFO, classifier_extractor_name, uint8_to_model_input
from .fid import real_images


@dataclasses.dataclass(frozen=True)
class ExtractorRecipe:
    """Architecture and optimisation of a domain extractor (the same for every dataset)."""

    widths: tuple[int, ...] = (16, 32, 64)  # SkipResNet stage widths
    depth: int = 1  # residual blocks per stage
    hidden_size: int = 64  # the feature dimension FID sees
    epochs: int = 5
    batch_size: int = 64  # the last incomplete batch of an epoch is dropped
    lr: float = 3e-3  # AdamW peak of the one-cycle schedule
    weight_decay: float = 1e-4


RECIPE = ExtractorRecipe()
# Held-out accuracy below which training fails. Measured with RECIPE on the default split (seed 0,
# fraction 0.2), one thread: digits 0.992 (360 test images), photo_patches 0.969 (578 test patches).
# The field sets (skipdiff/field_patches.py, their own spatial split; chance is 1/4 for the quadrant
# sets, 1/3 textures, 1/2 faces): hubble 0.315, histology 0.445, retina 0.551, cells 0.430, moon 0.275,
# textures 0.970, faces 0.553 (38 test images); the groups (label = member set) fields_colour 0.997,
# fields_grey 0.988. The floors sit below those so that only a broken training fails; a low floor is no
# licence for FID: docs/datasets.md says which sets' extractors tell real from degraded images
# (eval/extractor_checks.py --dataset fields).
MIN_ACCURACY = {
    "digits": 0.95,
    "photo_patches": 0.9,
    "hubble": 0.27,
    "histology": 0.38,
    "retina": 0.5,
    "cells": 0.37,
    "moon": 0.22,
    "textures": 0.93,
    "faces": 0.45,
    "fields_colour": 0.95,
    "fields_grey": 0.95,
}


def default_cache_dir() -> Path:
    """``$SKIPDIFF_CACHE``, else ``$XDG_CACHE_HOME/skipdiff``, else ``~/.cache/skipdiff``."""
    if os.environ.get("SKIPDIFF_CACHE"):
        return Path(os.environ["SKIPDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skipdiff"


def extractor_data(data: DataOptions) -> DataOptions:
    """The data options that define a domain extractor: the built-in set, its split (seed, fraction),
    resolution and channels; everything else at its default (no ``max_train_samples``)."""
    name = data.builtin_image_dataset()
    if name is None:
        source = data.dataset_name or data.train_data_dir or data.dataset
        raise ValueError(
            f"a domain feature extractor needs a built-in image set {sorted(IMAGE_DATASETS)}, got {source!r} "
            "(use --feature_extractor inception, or a folder holding a trained SkipResNet classifier)"
        )
    return DataOptions(
        dataset=name,
        split_seed=data.split_seed,
        test_fraction=data.test_fraction,
        resolution=data.resolution,
        image_channels=data.image_channels,
    )


def extractor_dir(data: DataOptions, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`cached_domain_extractor` keeps the extractor of ``data``'s split for ``seed``."""
    data = extractor_data(data)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    channels = "" if data.image_channels is None else f"-c{data.image_channels}"
    return root / "extractors" / f"{data.dataset}-{data.resolution}px{channels}-{data.split_key()}-seed{seed}"


def labelled_pixels(split, resolution: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of ``{"image", "label"}`` rows -> (inputs (N, C, r, r) in [-1, 1], labels (N,)).

    The pixels are exactly those evaluation feeds the extractor: the data transform, quantised to uint8
    (:func:`skipdiff.eval.fid.real_images`), then mapped back to [-1, 1].
    """
    real = real_images(split, resolution, channels, "extractor")
    return uint8_to_model_input(real.images, channels), torch.tensor(split["label"])


def fit_classifier(
    model: SkipResNetForImageClassification,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: ExtractorRecipe,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> None:
    """Train ``model`` on (x (N, C, H, W), y (N,)) in place: shuffled batches, AdamW, one-cycle schedule;
    ``log`` receives one line per epoch (its last batch's loss, the seconds so far).

    A dozen lines rather than :func:`skipdiff.training.classifier.train_classifier`: that loop brings an
    ``Accelerator`` (process-wide state, the accelerate config's precision), reseeds every global RNG,
    logs gradient flow and writes a run folder, none of which an extractor built inside an evaluation
    should do.
    """
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x) // recipe.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the train split has {len(x)} images, fewer than one batch of {recipe.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    model.train()
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator)  # (N,)
        for step in range(steps_per_epoch):
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]  # (B,)
            loss = model(x[index], labels=y[index]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if log is not None:  # once an epoch: the only host read of the loop
            log(f"  epoch {epoch + 1}/{recipe.epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()


@torch.no_grad()
def accuracy(model: SkipResNetForImageClassification, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of (x (N, C, H, W), y (N,)) classified correctly (eval mode)."""
    return float((model.eval()(x).logits.argmax(dim=1) == y).float().mean())


def train_domain_extractor(
    data: DataOptions,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    *,
    recipe: ExtractorRecipe = RECIPE,
    min_accuracy: float | None = None,
    overwrite: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the extractor of ``data``'s built-in set on its train split, save it and return its folder.

    ``out_dir`` defaults to :func:`extractor_dir`; with ``overwrite=False`` a folder that appeared there
    meanwhile (another process, e.g. a second sweep runner) is kept and this training discarded. Raises
    ``RuntimeError`` when the held-out (test split) accuracy stays below ``min_accuracy`` (default
    :data:`MIN_ACCURACY` of the set). ``log`` (default: print, flushed) receives a line when training starts,
    one per epoch and one at the end.
    """
    # heavy: the data layer (🤗 datasets, ~0.7 s) only when an extractor is trained
    from ..data import dataset_channels, load_image_splits, num_classes

    log = log or _print

    data = extractor_data(data)
    out = Path(out_dir) if out_dir is not None else extractor_dir(data, seed)
    min_accuracy = MIN_ACCURACY.get(data.dataset, 0.9) if min_accuracy is None else min_accuracy
    splits = load_image_splits(data)
    channels = dataset_channels(splits, data.image_channels)
    x_train, y_train = labelled_pixels(splits["train"], data.resolution, channels)
    x_test, y_test = labelled_pixels(splits["test"], data.resolution, channels)
    config = SkipResNetConfig(
        num_labels=num_classes(splits),
        num_channels=channels,
        widths=list(recipe.widths),
        depth=recipe.depth,
        hidden_size=recipe.hidden_size,
    )
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the weight init must not move the caller's global RNG
        torch.manual_seed(seed)
        model = SkipResNetForImageClassification(config)
    log(
        f"training the {data.dataset} feature extractor for FID (once; then cached in {out}): {recipe.epochs} epochs "
        f"on {len(x_train)} train images, {torch.get_num_threads()} thread(s)"
    )
    fit_classifier(model, x_train, y_train, recipe, seed, log=log)
    seconds = time.perf_counter() - start
    held_out = accuracy(model, x_test, y_test)
    log(f"  done in {seconds:.0f} s: test accuracy {held_out:.3f}")
    if held_out < min_accuracy:
        raise RuntimeError(
            f"the {data.dataset} extractor reached {held_out:.3f} test accuracy < min_accuracy={min_accuracy} "
            f"(resolution={data.resolution}, seed={seed}, epochs={recipe.epochs})"
        )
    info = {
        "dataset": data.dataset,
        "resolution": data.resolution,
        "channels": channels,
        "seed": seed,
        "split_seed": data.split_seed,
        "test_fraction": data.test_fraction,
        "split_key": data.split_key(),
        "recipe": dataclasses.asdict(recipe),
        "train_size": len(x_train),
        "test_size": len(x_test),
        "test_accuracy": held_out,
        "train_seconds": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "name": classifier_extractor_name(model, f"{data.dataset}{data.resolution}", data.resolution),
    }
    save_extractor(model, info, out, overwrite)
    return out


def _print(line: str) -> None:
    print(line, flush=True)


def save_extractor(model: SkipResNetForImageClassification, info: dict, out: Path, overwrite: bool = True) -> None:
    """``model`` (config.json + model.safetensors) and ``info`` (extractor.json) into ``out``.

    Written next to the destination, then swapped in: a reader never sees a half-written folder. An
    existing ``out`` is replaced, or with ``overwrite=False`` kept (and nothing written).
    """
    staging = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    (staging / EXTRACTOR_INFO).write_text(json.dumps(info, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and out.exists():
        shutil.rmtree(out)
    try:
        os.replace(staging, out)  # refuses a non-empty folder: another process was first
    except OSError:
        if overwrite or not out.exists():
            raise
        shutil.rmtree(staging)


def cached_domain_extractor(data: DataOptions, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached extractor's folder for ``data``'s split and ``seed``, trained on first use (when two
    processes train it at once, the first to finish wins and both use its weights)."""
    path = extractor_dir(data, seed, cache_dir)
    if (path / "model.safetensors").is_file() and (path / EXTRACTOR_INFO).is_file():
        return path
    return train_domain_extractor(data, seed, path, overwrite=False)
