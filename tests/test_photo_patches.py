"""The photo_patches built-in set: grid cells of bundled photographs, labelled by photograph.

Checks what a diffusion comparison relies on: the counts and labels, that every patch is exactly one
cell of a non-overlapping grid (so train and test patches never share a pixel), that the split is
deterministic and stratified, and that the data layer sees colour images in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skipdiff.data import dataset_channels, image_transform, load_image_splits
from skipdiff.data_options import IMAGE_DATASETS, DataOptions
from skipdiff.photo_patches import MIN_STD, PATCH_SIZE, PHOTOGRAPHS, grid_cells, photo_patch_grid, photographs


@pytest.fixture(scope="module")
def grid():
    return photo_patch_grid()


@pytest.fixture(scope="module")
def splits():
    return load_image_splits(DataOptions(dataset="photo_patches"))


def test_grid_cells_are_centred_disjoint_crops():
    photo = np.arange(37 * 50 * 3).reshape(37, 50, 3)  # rows 37 = 2 * 16 + 5, columns 50 = 3 * 16 + 2
    cells, corners = grid_cells(photo, 16)
    assert cells.shape == (6, 16, 16, 3)
    assert corners.tolist() == [[2, 1], [2, 17], [2, 33], [18, 1], [18, 17], [18, 33]]  # remainder split evenly
    for cell, (top, left) in zip(cells, corners, strict=True):
        np.testing.assert_array_equal(cell, photo[top : top + 16, left : left + 16])
    values = np.concatenate([cell.reshape(-1) for cell in cells])
    assert len(np.unique(values)) == values.size  # no pixel in two cells


def test_patch_counts_labels_and_contrast(grid):
    sizes = {name: photo.shape for name, photo in photographs().items()}
    assert list(sizes) == list(PHOTOGRAPHS)
    cells_per_photo = [(h // PATCH_SIZE) * (w // PATCH_SIZE) for h, w, _ in sizes.values()]
    assert cells_per_photo == [1040, 1040, 1184]
    assert grid.pixels.shape == (2890, 16, 16, 3) and grid.pixels.dtype == np.uint8
    assert np.bincount(grid.labels).tolist() == [739, 968, 1183]  # flat cells dropped: 301, 72, 1
    spread = grid.pixels.reshape(len(grid), -1, 3).std(axis=1).max(axis=1)  # (N,)
    assert spread.min() >= MIN_STD
    unfiltered = photo_patch_grid(min_std=0)
    assert len(unfiltered) == sum(cells_per_photo)
    assert np.bincount(unfiltered.labels).tolist() == cells_per_photo


def test_every_patch_is_its_photographs_crop_at_a_distinct_grid_cell(grid):
    photos = list(photographs().values())
    for label, photo in enumerate(photos):
        mine = grid.labels == label
        corners = grid.corners[mine]
        assert len({tuple(c) for c in corners.tolist()}) == len(corners)  # one patch per cell
        offsets = corners - corners.min(axis=0)
        assert (offsets % PATCH_SIZE == 0).all()  # on one grid: distinct cells never overlap
        for patch, (top, left) in zip(grid.pixels[mine][::97], corners[::97], strict=True):
            np.testing.assert_array_equal(patch, photo[top : top + PATCH_SIZE, left : left + PATCH_SIZE])


def _positions(split, grid) -> list[tuple[int, int, int]]:
    """(photograph, row, column) of every image of a split, found by its exact pixels."""
    where = {
        patch.tobytes(): (int(label), *map(int, corner))
        for patch, label, corner in zip(grid.pixels, grid.labels, grid.corners, strict=True)
    }
    positions = [where[np.asarray(image).tobytes()] for image in split["image"]]
    assert [p[0] for p in positions] == split["label"]  # the label is the source photograph
    return positions


@pytest.mark.slow
def test_split_is_deterministic_stratified_and_spatially_disjoint(grid, splits):
    assert len(splits["train"]) == 2312 and len(splits["test"]) == 578
    train, test = _positions(splits["train"], grid), _positions(splits["test"], grid)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)  # distinct cells of one grid: no shared pixel
    assert len(train) + len(test) == len(grid)
    per_class = np.bincount(splits["test"]["label"]) / np.bincount(grid.labels)
    assert np.abs(per_class - 0.2).max() < 0.01  # stratified by photograph
    again = load_image_splits(DataOptions(dataset="photo_patches"))
    assert _positions(again["test"], grid) == test  # same seed, same split, same order
    other = load_image_splits(DataOptions(dataset="photo_patches", split_seed=1))
    assert set(_positions(other["test"], grid)) != set(test)


def test_the_data_layer_sees_colour_patches_in_range(splits):
    assert "photo_patches" in IMAGE_DATASETS
    assert dataset_channels(splits) == 3
    transform = image_transform(16, 3)
    x = torch.stack([transform(image) for image in splits["train"]["image"][:512]])  # (512, 3, 16, 16)
    assert x.shape == (512, 3, 16, 16)
    assert x.min() == -1.0 and x.max() == 1.0  # the full range is used
    assert x.flatten(1).std(dim=1).median() > 0.1  # patches hold structure, not flat colour


def test_builtin_image_dataset_names_the_set_only_for_built_in_images():
    assert DataOptions(dataset="photo_patches").builtin_image_dataset() == "photo_patches"
    assert DataOptions().builtin_image_dataset() == "digits"
    assert DataOptions(dataset="wine").builtin_image_dataset() is None
    assert DataOptions(dataset_name="cifar10").builtin_image_dataset() is None
    assert DataOptions(train_data_dir="/some/folder").builtin_image_dataset() is None  # dataset stays "digits"


def test_bad_grid_options_are_named():
    with pytest.raises(ValueError, match="patch_size must be >= 2, got 1"):
        photo_patch_grid(patch_size=1)
    with pytest.raises(ValueError, match="min_std must be >= 0, got -1"):
        photo_patch_grid(min_std=-1)
