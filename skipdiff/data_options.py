"""Which data a run uses: :class:`DataOptions`, shared by every entry point (no heavy imports).

The loading itself is :mod:`skipdiff.data`; this module only names the built-in sets and holds the
options, so that command lines can check them (and answer ``--help``) without importing torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from .config import option
from .field_patches import FIELD_DATASETS

# Built-in sets, all shipped inside Python packages (no network): name -> what it is.
IMAGE_DATASETS = {
    "digits": "handwriting: scikit-learn's 1797 8x8 grey digits (UCI), 10 classes",
    "photo_patches": "natural images: 2890 16x16 colour patches of 3 photographs bundled with scikit-learn "
    "and matplotlib (non-overlapping grid, flat sky dropped), class = photograph",
}
_LABELS = {"region": "image quadrant", "source": "source image", "face": "face or not", "field": "field"}
IMAGE_DATASETS.update(
    {  # other fields, from scikit-image's bundled images (skipdiff/field_patches.py)
        name: f"{spec.field}: {'colour' if spec.channels == 3 else 'grey'} patches of scikit-image's "
        f"{', '.join(spec.files)}, train/test in separate spatial blocks, class = {_LABELS[spec.label]}"
        for name, spec in FIELD_DATASETS.items()
    }
)
TABULAR_DATASETS = {
    "breast_cancer": "medicine: 569 tumours, 30 cell-nucleus features, benign/malignant",
    "wine": "chemistry: 178 wines, 13 chemical measurements, 3 cultivars",
    "iris": "botany: 150 flowers, 4 measurements, 3 species",
}


def dataset_kind(name: str) -> str:
    """``"image"`` or ``"tabular"`` for a built-in name; Hub ids and folders are images."""
    return "tabular" if name in TABULAR_DATASETS else "image"


# The options that decide which images land in each split (DataOptions.split_key): a run's test split is
# held out only while these stay as the run was trained with.
SPLIT_FIELDS = (
    "dataset",
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "image_column",
    "test_fraction",
    "split_seed",
    "max_train_samples",
    "skip_corrupt_images",
    "keep_labels",
)


@dataclasses.dataclass
class DataOptions:
    """Which images (or rows) a run uses and how they become tensors: one object, shared by every
    entry point (diffusion, VAE stage, classifiers, evaluation, sweeps) and passed whole to
    :func:`load_image_splits`. Entry points' options inherit these fields, so their flags are the same
    everywhere; evaluation rebuilds the object from a run's ``training_options.json``
    (:func:`skipdiff.config.subset`) instead of repeating defaults."""

    dataset: str = option(
        "digits",
        f"built-in dataset: images {sorted(IMAGE_DATASETS)} or tabular "
        f"{sorted(TABULAR_DATASETS)} (used unless --dataset_name or --train_data_dir)",
    )
    dataset_name: str | None = option(None, "a Hub dataset id, e.g. cifar10 (needs internet)")
    dataset_config_name: str | None = option(None, "the Hub dataset's configuration name")
    train_data_dir: str | None = option(None, "a local folder of images (loaded with imagefolder)")
    image_column: str = option("image", "column holding the images")
    label_column: str = option("label", "column holding class labels")
    caption_column: str | None = option(None, "column holding captions (text-conditioned UNets)")
    skip_corrupt_images: bool = option(False, "skip unreadable images in --train_data_dir (counted) instead of failing")
    image_channels: int | None = option(
        None, "1 (grey) or 3 (colour); default: 3 if any image of the dataset is colour, else 1 (see skipdiff/data.py)"
    )
    resolution: int = option(16, "image size the data is resized to")
    center_crop: bool = option(True, "center-crop (else random-crop) to --resolution")
    random_flip: bool = option(False, "random horizontal flips (off for digits: a flipped 3 is no digit)")
    test_fraction: float = option(0.2, "held-out fraction when the source has no test split")
    split_seed: int = option(0, "seed of the deterministic train/test split (and of --max_train_samples)")
    max_train_samples: int | None = option(None, "keep this many train images (a seeded subset), for quick runs")
    keep_labels: list[int] = option([], "keep only the images of these classes, in both splits (e.g. a shifted target)")
    cache_dir: str | None = option(None, "🤗 cache folder for Hub datasets and models")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value (no data is read)."""
        if self.resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {self.resolution}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test_fraction must lie in (0, 1), got {self.test_fraction}")
        if self.image_channels not in (None, 1, 3):
            raise ValueError(f"--image_channels must be 1 or 3, got {self.image_channels}")
        if any(label < 0 for label in self.keep_labels):
            raise ValueError(f"--keep_labels must be class indices >= 0, got {self.keep_labels}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1, got {self.max_train_samples}")
        if self.dataset_name is None and self.train_data_dir is None:
            known = set(IMAGE_DATASETS) | set(TABULAR_DATASETS)
            if self.dataset not in known:
                raise ValueError(
                    f"unknown dataset {self.dataset!r}; built-in datasets: images {sorted(IMAGE_DATASETS)}, "
                    f"tabular {sorted(TABULAR_DATASETS)} (or --dataset_name <Hub id> / --train_data_dir <folder>)"
                )

    @property
    def kind(self) -> str:
        """``"image"`` or ``"tabular"``: Hub ids and folders are images."""
        if self.dataset_name is not None or self.train_data_dir is not None:
            return "image"
        return dataset_kind(self.dataset)

    def builtin_image_dataset(self) -> str | None:
        """The built-in image set the options select (``digits``, ...); None for a Hub id, a folder or
        a tabular set."""
        if self.dataset_name is not None or self.train_data_dir is not None:
            return None
        return self.dataset if self.dataset in IMAGE_DATASETS else None

    def source(self) -> str:
        """A short readable name of the source (``digits``, ``cifar10``, a folder's name)."""
        source = self.train_data_dir or self.dataset_name or self.dataset
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(source).rstrip("/").split("/")[-1]).strip("_") or "data"

    def split_key(self) -> str:
        """12 hex digits identifying which images land in each split (source, columns, split seed and
        fraction, subset, corrupt-image rule): caches of anything trained on the train split carry it."""
        values = {name: getattr(self, name) for name in SPLIT_FIELDS}
        if values["train_data_dir"]:
            values["train_data_dir"] = str(Path(values["train_data_dir"]).resolve())
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
