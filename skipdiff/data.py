"""The one data layer every skipdiff script uses, on 🤗 datasets.

Three sources of images, all ending as a ``DatasetDict`` with ``train`` and ``test`` splits of
``{"image": PIL.Image, "label": int}`` rows:

* built-in offline sets (:data:`BUILTIN_IMAGE_DATASETS`): ``digits``, scikit-learn's 1797 8x8
  handwritten digits (UCI), kept at 8x8 here and resized by the transform;
* a Hub dataset id (``dataset_name="cifar10"``), for users with internet;
* a local folder of images (``train_data_dir``), through ``load_dataset("imagefolder")``.

Tabular sets from other fields (:data:`TABULAR_DATASETS`: breast_cancer, wine, iris) come as
``{"features": list[float], "label": int}`` rows, standardised with train-split statistics only.

Splits are deterministic: a stratified split seeded by ``split_seed`` unless the source has its
own ``test`` split.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage
from torchvision import transforms

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MODE_CHANNELS = {"L": 1, "RGB": 3}
CHANNEL_MODES = {1: "L", 3: "RGB"}


# --------------------------------------------------------------------------------------------------
# Built-in sets (shipped with scikit-learn: no network needed)
# --------------------------------------------------------------------------------------------------


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(p, mode="L") for p in pixels], "label": bunch.target.tolist()},
        features=features,
    )


BUILTIN_IMAGE_DATASETS: dict[str, Callable[[], Dataset]] = {"digits": _digits}


def _tabular_loader(name: str) -> Callable:
    import sklearn.datasets

    return getattr(sklearn.datasets, f"load_{name}")


TABULAR_DATASETS = {
    "breast_cancer": "medicine: 569 tumours, 30 cell-nucleus features, benign/malignant",
    "wine": "chemistry: 178 wines, 13 chemical measurements, 3 cultivars",
    "iris": "botany: 150 flowers, 4 measurements, 3 species",
}


def dataset_kind(name: str) -> str:
    """``"image"`` or ``"tabular"`` for a built-in name; Hub ids and folders are images."""
    return "tabular" if name in TABULAR_DATASETS else "image"


# --------------------------------------------------------------------------------------------------
# Loading and splitting
# --------------------------------------------------------------------------------------------------


def split_dataset(dataset: Dataset, test_fraction: float, seed: int, label_column: str | None) -> DatasetDict:
    """A deterministic train/test split, stratified by label when there is a ClassLabel column."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    stratify = (
        label_column if label_column and isinstance(dataset.features.get(label_column), ClassLabel) else None
    )
    return dataset.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column=stratify)


def load_image_splits(
    dataset: str | None = "digits",
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    test_fraction: float = 0.2,
    split_seed: int = 0,
    cache_dir: str | None = None,
    skip_corrupt: bool = False,
) -> DatasetDict:
    """Load an image dataset as ``DatasetDict(train=..., test=...)`` with ``image``/``label`` columns.

    Exactly one source is used: ``train_data_dir`` (a folder), else ``dataset_name`` (a Hub id),
    else the built-in ``dataset``. Raises ``ValueError`` naming the problem (unknown name, missing
    or empty folder, missing column, corrupt image) before any training starts.
    """
    if train_data_dir is not None:
        raw, image_column = _load_folder(Path(train_data_dir), skip_corrupt), "image"
    elif dataset_name is not None:
        raw = _load_hub(dataset_name, dataset_config_name, cache_dir)
    elif dataset in BUILTIN_IMAGE_DATASETS:
        raw = BUILTIN_IMAGE_DATASETS[dataset]()
    elif dataset in TABULAR_DATASETS:
        raise ValueError(
            f"dataset {dataset!r} is tabular; image models need one of {sorted(BUILTIN_IMAGE_DATASETS)}"
        )
    else:
        raise ValueError(
            f"unknown dataset {dataset!r}; built-in image sets: {sorted(BUILTIN_IMAGE_DATASETS)} "
            "(or pass dataset_name=<Hub id> / train_data_dir=<folder>)"
        )
    splits = raw if isinstance(raw, DatasetDict) else DatasetDict(train=raw)
    columns = splits["train"].column_names
    if image_column not in columns:
        raise ValueError(f"image column {image_column!r} not in the dataset's columns {columns}")
    if label_column is not None and label_column not in columns:
        label_column = None  # unlabelled data is fine for unconditional models; see require_labels
    keep = [image_column] + ([label_column] if label_column else [])
    splits = DatasetDict({name: split.select_columns(keep) for name, split in splits.items()})
    if image_column != "image":
        splits = splits.rename_column(image_column, "image")
    if label_column not in (None, "label"):
        splits = splits.rename_column(label_column, "label")
    if "test" not in splits:
        splits = split_dataset(splits["train"], test_fraction, split_seed, "label" if label_column else None)
    if len(splits["train"]) == 0:
        raise ValueError("the dataset's train split is empty")
    return DatasetDict(train=splits["train"], test=splits["test"])


def _load_hub(dataset_name: str, config_name: str | None, cache_dir: str | None) -> DatasetDict:
    from datasets import load_dataset

    try:
        return load_dataset(dataset_name, config_name, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set)" if offline else " (no network, a typo, or a private dataset?)"
        raise ValueError(f"could not load Hub dataset {dataset_name!r}{hint}: {err}") from err


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _load_folder(folder: Path, skip_corrupt: bool) -> Dataset:
    from datasets import load_dataset

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


def image_channels(splits: DatasetDict) -> int:
    """Channels of the dataset's images (1 for grey, 3 for colour), from its first image."""
    mode = splits["train"][0]["image"].mode
    return MODE_CHANNELS.get(mode, 3)


def image_transform(resolution: int, channels: int, *, center_crop: bool = True, random_flip: bool = False):
    """PIL -> float tensor (C, resolution, resolution) in [-1, 1], as diffusers' examples do."""
    if channels not in CHANNEL_MODES:
        raise ValueError(f"images must have 1 or 3 channels, got channels={channels}")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    steps = [
        transforms.Lambda(lambda image: image.convert(CHANNEL_MODES[channels])),
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    return transforms.Compose(steps)


def with_pixel_values(split: Dataset, transform) -> Dataset:
    """The split with rows ``{"pixel_values": (C, H, W), "label": int}`` computed on access."""
    has_label = "label" in split.column_names

    def apply(batch):
        out = {"pixel_values": [transform(image) for image in batch["image"]]}
        if has_label:
            out["label"] = batch["label"]
        return out

    return split.with_transform(apply)


def collate_images(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack rows of :func:`with_pixel_values` into a batch."""
    batch = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
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


def load_tabular_splits(name: str, *, test_fraction: float = 0.2, split_seed: int = 0) -> DatasetDict:
    """A tabular set as ``DatasetDict(train, test)`` of ``{"features": [...], "label": int}``.

    Features are standardised with the train split's mean and std only (no test leakage); the
    statistics are stored in the splits' ``info.description`` for reference.
    """
    if name not in TABULAR_DATASETS:
        known = sorted(TABULAR_DATASETS) + sorted(BUILTIN_IMAGE_DATASETS)
        raise ValueError(f"unknown tabular dataset {name!r}; built-in datasets: {known}")
    bunch = _tabular_loader(name)()
    names = [str(n) for n in bunch.target_names]
    features = Features({"features": Sequence(Value("float32")), "label": ClassLabel(names=names)})
    raw = Dataset.from_dict(
        {"features": bunch.data.tolist(), "label": bunch.target.tolist()}, features=features
    )
    splits = split_dataset(raw, test_fraction, split_seed, "label")
    train = np.asarray(splits["train"]["features"], dtype=np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0

    def standardise(batch):
        batch["features"] = ((np.asarray(batch["features"]) - mean) / std).astype(np.float32).tolist()
        return batch

    return DatasetDict({k: v.map(standardise, batched=True) for k, v in splits.items()})
