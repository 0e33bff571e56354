"""Classifier data from the shared data layer (:mod:`skipdiff.data`): train/test splits, the collate
function and the shapes a model is built for."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ...config import subset
from ...data import (
    collate_images,
    dataset_channels,
    load_image_splits,
    load_tabular_splits,
    num_classes,
    options_transform,
    with_pixel_values,
)
from ...data_options import DataOptions


@dataclasses.dataclass
class ClassifierData:
    train: object  # a torch-indexable dataset of rows
    test: object
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    num_inputs: int  # image channels or tabular features
    num_labels: int


def collate_features(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows ``{"features": [...], "label": int}`` -> ``input_features`` (B, F) and ``labels`` (B,)."""
    return {
        "input_features": torch.tensor([r["features"] for r in rows], dtype=torch.float32),
        "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
    }


def load_classifier_data(options: DataOptions) -> ClassifierData:
    """Train/test splits with the collate function and the shapes the model needs."""
    data_options = subset(DataOptions, options)
    if data_options.kind == "tabular":
        splits = load_tabular_splits(data_options)
        return ClassifierData(
            splits["train"], splits["test"], collate_features, len(splits["train"][0]["features"]), num_classes(splits)
        )
    splits = load_image_splits(data_options)
    labels = num_classes(splits)
    if labels is None:
        raise ValueError(f"a classifier needs labels: the dataset has no {data_options.label_column!r} column")
    channels = dataset_channels(splits, data_options.image_channels)
    transform = options_transform(data_options, channels, train=False)  # centre crop, no flips (as evaluation)
    train, test = (with_pixel_values(splits[name], transform) for name in ("train", "test"))
    return ClassifierData(train, test, collate_images, channels, labels)


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs without labels, labels (B,))."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]
