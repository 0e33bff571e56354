"""The one data layer every skipdiff script uses, on 🤗 datasets.

Three sources of images, all ending as a ``DatasetDict`` with ``train`` and ``test`` splits of
``{"image": PIL.Image, "label": int}`` rows:

* built-in offline sets (:data:`BUILTIN_IMAGE_DATASETS`): ``digits``, scikit-learn's 1797 8x8
  handwritten digits (UCI), kept at 8x8 here and resized by the transform; ``photo_patches``, 2890
  16x16 colour patches of three photographs bundled with scikit-learn and matplotlib, labelled by
  photograph (:mod:`skipdiff.photo_patches`); and sets from other fields cut from scikit-image's
  bundled images (astronomy, histology, ophthalmology, microscopy, lunar surface, textures, faces;
  :mod:`skipdiff.field_patches`), which bring their own train/test splits in separate spatial blocks;
* a Hub dataset id (``dataset_name="cifar10"``), for users with internet;
* a local folder of images (``train_data_dir``), through ``load_dataset("imagefolder")``.

Tabular sets from other fields (:data:`TABULAR_DATASETS`: breast_cancer, wine, iris) come as
``{"features": list[float], "label": int}`` rows, standardised with train-split statistics only.

Splits are deterministic: a stratified split seeded by ``split_seed`` unless the source has its
own ``test`` split.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value, load_dataset
from PIL import Image as PILImage
from torchvision import transforms

from .data_options import IMAGE_DATASETS, TABULAR_DATASETS, DataOptions
from .field_patches import FIELD_DATASETS, field_patches
from .photo_patches import PHOTOGRAPHS, photo_patch_grid

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
CHANNEL_MODES = {1: "L", 3: "RGB"}


# --------------------------------------------------------------------------------------------------
# Built-in sets (shipped with scikit-learn, matplotlib and scikit-image: no network needed)
# --------------------------------------------------------------------------------------------------


def _digits() -> Dataset:
    # heavy: scikit-learn (~1 s) only for the built-in sets it ships
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(p, mode="L") for p in pixels], "label": bunch.target.tolist()},
        features=features,
    )


def _photo_patches() -> Dataset:
    grid = photo_patch_grid()
    features = Features({"image": Image(), "label": ClassLabel(names=list(PHOTOGRAPHS))})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(p, mode="RGB") for p in grid.pixels], "label": grid.labels.tolist()},
        features=features,
    )


def _field(name: str) -> DatasetDict:
    """A field set (:mod:`skipdiff.field_patches`) with its own spatially separated train/test splits."""
    patches = field_patches(name)
    mode = CHANNEL_MODES[FIELD_DATASETS[name].channels]
    features = Features({"image": Image(), "label": ClassLabel(names=list(patches.class_names))})

    def split(which: str) -> Dataset:
        index = patches.split(which)
        images = [
            PILImage.fromarray(patches.pixels[i].squeeze(-1) if mode == "L" else patches.pixels[i], mode=mode)
            for i in index
        ]
        return Dataset.from_dict({"image": images, "label": patches.labels[index].tolist()}, features=features)

    return DatasetDict(train=split("train"), test=split("test"))


BUILTIN_IMAGE_DATASETS: dict[str, Callable[[], Dataset | DatasetDict]] = {
    "digits": _digits,
    "photo_patches": _photo_patches,
    **{name: functools.partial(_field, name) for name in FIELD_DATASETS},
}
if set(BUILTIN_IMAGE_DATASETS) != set(IMAGE_DATASETS):
    raise ImportError(f"built-in image loaders {sorted(BUILTIN_IMAGE_DATASETS)} != names {sorted(IMAGE_DATASETS)}")


def _tabular_loader(name: str) -> Callable:
    # heavy: scikit-learn (~1 s) only for the built-in sets it ships
    import sklearn.datasets

    return getattr(sklearn.datasets, f"load_{name}")


# --------------------------------------------------------------------------------------------------
# Loading and splitting
# --------------------------------------------------------------------------------------------------


def split_dataset(dataset: Dataset, test_fraction: float, seed: int, label_column: str | None) -> DatasetDict:
    """A deterministic train/test split, stratified by label when there is a ClassLabel column."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    stratify = label_column if label_column and isinstance(dataset.features.get(label_column), ClassLabel) else None
    return dataset.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column=stratify)


def load_image_splits(data: DataOptions) -> DatasetDict:
    """Load an image dataset as ``DatasetDict(train=..., test=...)`` with ``image``/``label`` columns
    (``caption`` too when ``data.caption_column`` is set).

    Exactly one source is used: ``train_data_dir`` (a folder), else ``dataset_name`` (a Hub id),
    else the built-in ``dataset``. Raises ``ValueError`` naming the problem (unknown name, missing
    or empty folder, missing column, corrupt image) before any training starts.
    """
    image_column = data.image_column
    if data.train_data_dir is not None:
        raw, image_column = _load_folder(Path(data.train_data_dir), data.skip_corrupt_images), "image"
    elif data.dataset_name is not None:
        raw = _load_hub(data.dataset_name, data.dataset_config_name, data.cache_dir)
    elif data.dataset in BUILTIN_IMAGE_DATASETS:
        raw = BUILTIN_IMAGE_DATASETS[data.dataset]()
    elif data.dataset in TABULAR_DATASETS:
        raise ValueError(
            f"dataset {data.dataset!r} is tabular; image models need one of {sorted(BUILTIN_IMAGE_DATASETS)}"
        )
    else:
        raise ValueError(
            f"unknown dataset {data.dataset!r}; built-in image sets: {sorted(BUILTIN_IMAGE_DATASETS)} "
            "(or pass dataset_name=<Hub id> / train_data_dir=<folder>)"
        )
    splits = raw if isinstance(raw, DatasetDict) else DatasetDict(train=raw)
    skipped = getattr(raw, "skipped_images", [])
    columns = splits["train"].column_names
    if image_column not in columns:
        raise ValueError(f"image column {image_column!r} not in the dataset's columns {columns}")
    if data.caption_column is not None and data.caption_column not in columns:
        raise ValueError(f"caption column {data.caption_column!r} not in the dataset's columns {columns}")
    label_column = data.label_column if data.label_column in columns else None  # unlabelled data is fine
    renames = {image_column: "image", label_column: "label", data.caption_column: "caption"}
    renames = {old: new for old, new in renames.items() if old is not None}
    splits = DatasetDict({name: split.select_columns(list(renames)) for name, split in splits.items()})
    splits = splits.rename_columns({old: new for old, new in renames.items() if old != new})
    if "test" not in splits:
        splits = split_dataset(splits["train"], data.test_fraction, data.split_seed, "label" if label_column else None)
    if data.keep_labels:  # after the split: the kept classes' images land where they did before
        splits = _keep_labels(splits, data.keep_labels, label_column is not None)
    train = splits["train"]
    if data.max_train_samples is not None and data.max_train_samples < len(train):
        train = train.shuffle(seed=data.split_seed).select(range(data.max_train_samples))
    if len(train) == 0:
        raise ValueError("the dataset's train split is empty")
    result = DatasetDict(train=train, test=splits["test"])
    result["train"].skipped_images = list(skipped)  # counted by callers' logs
    return result


def _keep_labels(splits: DatasetDict, labels: list[int], has_labels: bool) -> DatasetDict:
    """Only the rows whose label is in ``labels`` (split by split)."""
    if not has_labels:
        raise ValueError("--keep_labels needs a label column, and the dataset has none")
    wanted = set(labels)
    kept = DatasetDict({name: split.filter(lambda row: row["label"] in wanted) for name, split in splits.items()})
    if len(kept["train"]) == 0:
        raise ValueError(f"no train image has a label in --keep_labels {sorted(wanted)}")
    return kept


def _load_hub(dataset_name: str, config_name: str | None, cache_dir: str | None) -> DatasetDict:
    try:
        return load_dataset(dataset_name, config_name, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set)" if offline else " (no network, a typo, or a private dataset?)"
        raise ValueError(f"could not load Hub dataset {dataset_name!r}{hint}: {err}") from err


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _load_folder(folder: Path, skip_corrupt: bool) -> Dataset:
    if not folder.is_dir():
        raise ValueError(f"train_data_dir {str(folder)!r} does not exist or is not a folder")
    files = _image_files(folder)
    if not files:
        raise ValueError(f"train_data_dir {str(folder)!r} holds no image files ({sorted(IMAGE_EXTENSIONS)})")
    corrupt = [f for f in files if not _readable(f)]
    if corrupt and not skip_corrupt:
        names = ", ".join(str(f) for f in corrupt[:5])
        raise ValueError(
            f"{len(corrupt)} unreadable image(s) in {str(folder)!r}: {names}; pass skip_corrupt "
            "(--skip_corrupt_images) to skip them"
        )
    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    if corrupt:
        bad = {str(f.resolve()) for f in corrupt}
        paths = dataset.cast_column("image", Image(decode=False))["image"]
        keep = [i for i, item in enumerate(paths) if str(Path(item["path"]).resolve()) not in bad]
        dataset = dataset.select(keep)
        dataset.info.description = f"skipped {len(corrupt)} unreadable image(s)"
    dataset.skipped_images = [str(f) for f in corrupt]  # counted by callers' logs
    return dataset


def _readable(path: Path) -> bool:
    try:
        with PILImage.open(path) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001  PIL raises many types for corrupt files
        return False


# --------------------------------------------------------------------------------------------------
# Image tensors
# --------------------------------------------------------------------------------------------------


# How a file's pixels become the model's: one rule for every source (documented in docs/training.md).
#   * grey modes ("1", "L", "LA", "I", "I;16*", "F") are grey; every other mode is colour;
#   * 16-bit and 32-bit integer images are scaled to 8 bits (value / 257; "I" images whose values all
#     fit in 0..255 are taken as 8-bit), float images ("F") are taken as [0, 1] when they lie in it
#     and as 0..255 otherwise (clipped); PIL's own conversion would clip them to 255;
#   * alpha is composited onto black (transparent pixels become black), palette images ("P") are
#     expanded to their colours (and their transparency) first;
#   * the dataset's channel count is 3 if any of its images is colour, else 1 (``--image_channels``
#     sets it); grey images are repeated to RGB, colour images reduced to grey with PIL's luma weights.
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_grey_mode(mode: str) -> bool:
    return mode in GREY_MODES


def dataset_channels(splits: DatasetDict, requested: int | None = None) -> int:
    """The dataset's channel count: ``requested`` when given, else 3 if any image (train or test) is
    colour, else 1. Reads only each image's header, not its pixels."""
    if requested is not None:
        if requested not in CHANNEL_MODES:
            raise ValueError(f"image channels must be 1 or 3, got {requested}")
        return requested
    for split in splits.values():
        for item in split.cast_column("image", Image(decode=False))["image"]:
            source = item.get("bytes") or item.get("path")
            with PILImage.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                if not is_grey_mode(image.mode):
                    return 3
    return 1


def to_mode(image: PILImage.Image, channels: int) -> PILImage.Image:
    """A PIL image in any mode -> 8-bit ``L`` (channels 1) or ``RGB`` (channels 3) by the rule above."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else values
        elif mode != "I" or (values.size and values.max() > 255):
            values = values / 257.0  # 16-bit (0..65535) -> 8-bit (0..255)
        image = PILImage.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
    elif mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        background = PILImage.new("RGBA", image.size, (0, 0, 0, 255))
        image = PILImage.alpha_composite(background, image.convert("RGBA"))
        image = image.convert("L" if mode in ("LA", "La") else "RGB")
    target = CHANNEL_MODES[channels]
    return image if image.mode == target else image.convert(target)


def image_transform(resolution: int, channels: int, *, center_crop: bool = True, random_flip: bool = False):
    """PIL (any mode) -> float tensor (C, resolution, resolution) in [-1, 1], as diffusers' examples do."""
    if channels not in CHANNEL_MODES:
        raise ValueError(f"images must have 1 or 3 channels, got channels={channels}")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    steps = [
        transforms.Lambda(lambda image: to_mode(image, channels)),
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    return transforms.Compose(steps)


def options_transform(options: DataOptions, channels: int, train: bool = True):
    """The image transform ``options`` ask for (:func:`image_transform`): crops and flips as asked for
    training; centre crop and no flip otherwise (evaluation, latent caches). (Here rather than a method of
    :class:`~skipdiff.data_options.DataOptions`, which imports nothing heavy and nothing from this module.)"""
    if not train:
        return image_transform(options.resolution, channels)
    return image_transform(
        options.resolution, channels, center_crop=options.center_crop, random_flip=options.random_flip
    )


def with_pixel_values(split: Dataset, transform) -> Dataset:
    """The split with rows ``{"pixel_values": (C, H, W), "label": int[, "caption": str]}`` computed on access."""
    passed = [column for column in ("label", "caption") if column in split.column_names]

    def apply(batch):
        out = {"pixel_values": [transform(image) for image in batch["image"]]}
        out.update({column: batch[column] for column in passed})
        return out

    return split.with_transform(apply)


def collate_images(rows: list[dict]) -> dict:
    """Stack rows of :func:`with_pixel_values` into a batch (captions stay a list of strings)."""
    batch = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    if "caption" in rows[0]:
        batch["captions"] = [str(r["caption"]) for r in rows]
    return batch


def num_classes(splits: DatasetDict) -> int | None:
    """Number of classes of the ``label`` column (None when there is none)."""
    if "label" not in splits["train"].column_names:
        return None
    feature = splits["train"].features["label"]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return int(max(splits["train"]["label"])) + 1


# --------------------------------------------------------------------------------------------------
# Tabular sets
# --------------------------------------------------------------------------------------------------


def load_tabular_splits(data: DataOptions) -> DatasetDict:
    """A tabular set as ``DatasetDict(train, test)`` of ``{"features": [...], "label": int}``.

    Features are standardised with the train split's mean and std only (no test leakage); the
    statistics are stored in the splits' ``info.description`` for reference.
    """
    name, test_fraction, split_seed = data.dataset, data.test_fraction, data.split_seed
    if name not in TABULAR_DATASETS:
        known = sorted(TABULAR_DATASETS) + sorted(BUILTIN_IMAGE_DATASETS)
        raise ValueError(f"unknown tabular dataset {name!r}; built-in datasets: {known}")
    bunch = _tabular_loader(name)()
    names = [str(n) for n in bunch.target_names]
    features = Features({"features": Sequence(Value("float32")), "label": ClassLabel(names=names)})
    raw = Dataset.from_dict({"features": bunch.data.tolist(), "label": bunch.target.tolist()}, features=features)
    splits = split_dataset(raw, test_fraction, split_seed, "label")
    train = np.asarray(splits["train"]["features"], dtype=np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0

    def standardise(batch):
        batch["features"] = ((np.asarray(batch["features"]) - mean) / std).astype(np.float32).tolist()
        return batch

    return DatasetDict({k: v.map(standardise, batched=True) for k, v in splits.items()})
