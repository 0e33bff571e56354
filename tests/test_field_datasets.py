"""The field datasets (skipdiff/field_patches.py): scikit-image's bundled images cut into patches.

Checks what a comparison across fields relies on: every set builds with the documented counts, sizes,
channels and value range; train and test patches come from separate spatial blocks with a gap between
them (checked on the patches' coordinates, not only their pixels); two builds give identical arrays;
the flat-patch rule holds; bad names are refused with the list of names.
"""

from __future__ import annotations

import numpy as np
import pytest

from skipdiff.data import BUILTIN_IMAGE_DATASETS, dataset_channels, image_transform, load_image_splits
from skipdiff.data_options import IMAGE_DATASETS, DataOptions
from skipdiff.field_patches import (
    FIELD_DATASETS,
    FIELD_GROUPS,
    MIN_STD,
    PATCH_SIZE,
    block_test_mask,
    field_group,
    field_patches,
    source_images,
    touching,
)

# (train, test) patches per set with the defaults, as docs/datasets.md lists them
COUNTS = {
    "hubble": (2198, 752),
    "histology": (654, 254),
    "retina": (3233, 1311),
    "cells": (743, 249),
    "moon": (396, 171),
    "textures": (1842, 700),
    "faces": (158, 38),
    "fields_colour": (6085, 2317),
    "fields_grey": (2981, 1120),
}
NAMES = sorted(FIELD_DATASETS)


@pytest.fixture(scope="module")
def patches():
    return {name: field_patches(name) for name in NAMES}


@pytest.fixture(scope="module")
def splits():
    return {name: load_image_splits(DataOptions(dataset=name)) for name in NAMES}


@pytest.mark.slow
def test_every_field_set_is_a_built_in_image_set_with_its_documented_counts(splits):
    assert set(COUNTS) == set(FIELD_DATASETS)
    assert len({spec.field for name, spec in FIELD_DATASETS.items() if name not in FIELD_GROUPS}) == 7
    for name in NAMES:
        assert name in IMAGE_DATASETS and name in BUILTIN_IMAGE_DATASETS
        assert (len(splits[name]["train"]), len(splits[name]["test"])) == COUNTS[name], name


@pytest.mark.slow
def test_the_data_layer_rows_are_the_patches_of_each_split(patches, splits):
    for name in NAMES:
        for which in ("train", "test"):
            index = patches[name].split(which)
            rows = splits[name][which]
            pixels = np.stack([np.asarray(image) for image in rows["image"]])  # (M, P, P[, 3])
            np.testing.assert_array_equal(
                pixels.reshape(patches[name].pixels[index].shape), patches[name].pixels[index]
            )
            assert rows["label"] == patches[name].labels[index].tolist()


@pytest.mark.slow
def test_sizes_channels_and_value_ranges_are_as_documented(patches, splits):
    for name in NAMES:
        spec, cut = FIELD_DATASETS[name], patches[name]
        size = 25 if name == "faces" else PATCH_SIZE
        assert cut.pixels.shape[1:] == (size, size, spec.channels) and cut.pixels.dtype == np.uint8, name
        assert dataset_channels(splits[name]) == spec.channels  # colour stays colour, grey stays grey
        assert splits[name]["train"][0]["image"].mode == ("RGB" if spec.channels == 3 else "L")
        x = np.stack([image_transform(16, spec.channels)(image).numpy() for image in splits[name]["test"]["image"]])
        assert x.shape == (COUNTS[name][1], spec.channels, 16, 16), name
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() - x.min() > 1.0, name  # in range, not flat


def test_no_test_patch_overlaps_or_touches_a_train_patch(patches):
    for name in NAMES:
        cut = patches[name]
        train, test = cut.split("train"), cut.split("test")
        assert len(train) and len(test) and len(train) + len(test) == len(cut)
        if name == "faces":  # separate crops: no image in both splits
            assert not set(cut.sources[train].tolist()) & set(cut.sources[test].tolist())
            continue
        for source in np.unique(cut.sources):
            a = cut.corners[train][cut.sources[train] == source]  # (A, 2)
            b = cut.corners[test][cut.sources[test] == source]  # (B, 2)
            gap = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2)  # (A, B): Chebyshev distance of corners
            assert gap.min() >= 2 * PATCH_SIZE, (name, source)  # >= one patch width of empty pixels between


def test_patches_are_exact_distinct_crops_of_their_image(patches):
    for name in NAMES:
        if name == "faces" or name in FIELD_GROUPS:
            continue
        cut, images = patches[name], source_images(name)
        for source, image in enumerate(images):
            mine = np.flatnonzero(cut.sources == source)
            corners = cut.corners[mine]
            assert len({tuple(c) for c in corners.tolist()}) == len(corners)  # one patch per cell
            assert ((corners - corners.min(axis=0)) % PATCH_SIZE == 0).all()  # one grid: no overlap
            for i in mine[::53]:
                top, left = cut.corners[i]
                np.testing.assert_array_equal(cut.pixels[i], image[top : top + PATCH_SIZE, left : left + PATCH_SIZE])


def test_two_builds_give_identical_arrays(patches):
    for name in NAMES:
        again = field_patches(name)
        for field in ("pixels", "labels", "test", "sources", "corners"):
            np.testing.assert_array_equal(
                getattr(again, field), getattr(patches[name], field), err_msg=f"{name}.{field}"
            )


def test_flat_patches_are_dropped_by_the_stated_rule(patches):
    for name in NAMES:
        cut = patches[name]
        spread = cut.pixels.reshape(len(cut), -1, cut.pixels.shape[-1]).std(axis=1).max(axis=1)  # (N,)
        assert spread.min() >= MIN_STD, name
    assert len(field_patches("retina", min_std=0)) > len(patches["retina"]) + 2000  # the black surround
    assert len(field_patches("faces", min_std=0)) == 200


def test_labels_are_the_quadrant_the_source_or_face(patches):
    for name in ("hubble", "histology", "retina", "cells", "moon"):
        cut, (image,) = patches[name], source_images(name)
        centre = cut.corners + PATCH_SIZE / 2
        expected = 2 * (centre[:, 0] >= image.shape[0] / 2) + (centre[:, 1] >= image.shape[1] / 2)
        np.testing.assert_array_equal(cut.labels, expected)
        for which in ("train", "test"):
            assert len(np.unique(cut.labels[cut.split(which)])) == 4, (name, which)  # every quadrant in both
    np.testing.assert_array_equal(patches["textures"].labels, patches["textures"].sources)
    faces = patches["faces"]
    np.testing.assert_array_equal(faces.labels, (faces.sources >= 100).astype(int))
    assert faces.class_names == ("face", "non-face")


def test_a_group_pools_its_members_splits_labelled_by_member(patches):
    for group, members in FIELD_GROUPS.items():
        cut = patches[group]
        assert cut.class_names == members and FIELD_DATASETS[group].channels == FIELD_DATASETS[members[0]].channels
        for label, member in enumerate(members):
            mine = cut.labels == label
            for field in ("pixels", "test", "corners"):
                np.testing.assert_array_equal(getattr(cut, field)[mine], getattr(patches[member], field))
        assert len(np.unique(cut.sources)) == sum(len(FIELD_DATASETS[m].sources) for m in members)
        assert field_group(members[0]) == group
    assert field_group("faces") is None


def test_fid_uses_the_sets_own_extractor_except_where_the_groups_measured_better():
    from skipdiff.eval.extractor_choice import EXTRACTOR_CHOICES, auto_extractor

    assert auto_extractor(DataOptions(dataset="moon")) == "fields_grey"
    for name in ("hubble", "histology", "retina", "cells", "textures", "faces", "fields_grey"):
        assert auto_extractor(DataOptions(dataset=name)) == name
    assert set(FIELD_DATASETS) <= set(EXTRACTOR_CHOICES)


def test_one_test_block_in_every_aligned_two_by_two_group_and_the_guard_ring():
    test = block_test_mask(32, 32, block=8)  # 4 x 4 blocks
    per_block = test.reshape(4, 8, 4, 8).all(axis=(1, 3))  # (4, 4): blocks wholly test
    assert per_block.sum() == 4 and (per_block.reshape(2, 2, 2, 2).sum(axis=(1, 3)) == 1).all()
    assert test.sum() == 4 * 64
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 1] = True
    assert touching(mask).sum() == 9 and touching(mask)[:3, :3].all()


def test_bad_names_and_options_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"unknown field dataset 'galaxy'; field datasets: \['cells', 'faces'"):
        field_patches("galaxy")
    with pytest.raises(ValueError, match=r"unknown dataset 'galaxy'; built-in datasets: images \['cells', 'digits'"):
        DataOptions(dataset="galaxy").validate()
    with pytest.raises(ValueError, match=r"unknown dataset 'galaxy'; built-in image sets: .*'hubble'"):
        load_image_splits(DataOptions(dataset="galaxy"))
    with pytest.raises(ValueError, match="block must be >= 2 cells"):
        field_patches("moon", block=1)
    with pytest.raises(ValueError, match="min_std must be >= 0, got -1"):
        field_patches("moon", min_std=-1)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        field_patches("faces").split("val")
