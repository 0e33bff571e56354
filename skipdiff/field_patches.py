"""Image sets from other fields, cut from the images scikit-image's wheel bundles (no network).

Astronomy, histology, ophthalmology, microscopy, the lunar surface, textures and faces
(:data:`FIELD_DATASETS`), read through :mod:`skimage.data` and cut on the grid of
:mod:`skipdiff.photo_patches` (:func:`~skipdiff.photo_patches.grid_cells`, the same flat-cell rule
:func:`~skipdiff.photo_patches.textured`), with a *spatial* train/test split instead of a random one:

* **Grid.** Each image is tiled by the centred, non-overlapping grid of ``patch_size`` (16) squares:
  the default job's 16x16 resolution, so no patch is resized.
* **Spatial blocks.** The grid is divided into blocks of ``block`` x ``block`` cells (8 x 8 = 128 x 128
  pixels; edge blocks may be smaller). Block (i, j) (row, column of blocks) is a test block when
  ``(i + 2 j) % 4 == 1``: exactly one block of every aligned 2 x 2 group of blocks, at a position that
  alternates down the image, so ~1/4 of the area is test and every part of the image has test blocks
  near it. **Guard ring:** a train cell that touches a test cell (shares an edge or a corner) is
  dropped, so every train patch lies at least one cell (16 pixels) from every test patch: no test patch
  overlaps or touches a train patch.
* **Flat cells are dropped** (after the split) by photo_patches' rule: a cell whose standard deviation
  is below ``min_std`` (2.0) grey levels of 255 in every channel (:data:`~skipdiff.photo_patches.MIN_STD`).
* **Labels.** ``region``: the image quadrant holding the patch's centre (4 classes, for sets of one
  image); ``source``: which image (``textures``: brick, grass, gravel); ``face``: face or non-face.
* **Faces** are not cut: ``lfw_subset`` holds 200 separate 25 x 25 crops (100 faces, then 100
  non-faces cut from the backgrounds of the same LFW photographs); image ``k`` is a test image when
  ``k % 5 == 4`` (20 faces and 20 non-faces), kept at 25 x 25 (the data transform resizes them).
* **Channels.** Colour images stay RGB, grey images stay grey (``L``).
* **Groups.** ``fields_colour`` (hubble, histology, retina) and ``fields_grey`` (cells, moon, textures)
  pool their members' splits unchanged, labelled by member (``field``): what the FID feature extractor
  of every member trains on (:mod:`skipdiff.eval.extractor_choice`), since a quadrant is a poor thing
  for a classifier to learn from one image (docs/datasets.md). ``faces`` (25 x 25) is in neither.

The split is fixed by these rules: ``--split_seed`` and ``--test_fraction`` do not apply to these sets
(as for a Hub dataset with its own test split). Deterministic given the decoded files (PNG exactly; the
two JPEGs through scikit-image's reader, which another libjpeg may decode differently in the last bit).
Counts per set and the credit of every image are in docs/datasets.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from skimage import data as skimage_data

from .photo_patches import MIN_STD, grid_cells, textured

PATCH_SIZE = 16  # pixels: the default job's resolution
BLOCK = 8  # cells per side of a split block (128 pixels at PATCH_SIZE 16)
TEST_EVERY = 5  # faces: image k is a test image when k % TEST_EVERY == TEST_EVERY - 1
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
FACE_CLASSES = ("face", "non-face")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One built-in set of another field: which ``skimage.data`` images, and what a patch's label is."""

    field: str  # the field, e.g. "astronomy"
    sources: tuple[str, ...]  # skimage.data function names, in label order for label="source"
    files: tuple[str, ...]  # the files they read inside skimage/data/
    label: str  # "region" (image quadrant), "source" (which image), "face" (face / non-face) or "field"
    channels: int  # 1 (grey) or 3 (RGB), as the files are

    def class_names(self) -> tuple[str, ...]:
        """The names of the label's classes, in class-index order (a group's: its member sets)."""
        return {"region": QUADRANTS, "source": self.sources, "face": FACE_CLASSES, "field": self.sources}[self.label]


FIELD_DATASETS: dict[str, FieldSpec] = {
    "hubble": FieldSpec("astronomy", ("hubble_deep_field",), ("hubble_deep_field.jpg",), "region", 3),
    "histology": FieldSpec("histology (immunohistochemistry)", ("immunohistochemistry",), ("ihc.png",), "region", 3),
    "retina": FieldSpec("ophthalmology (fundus photograph)", ("retina",), ("retina.jpg",), "region", 3),
    "cells": FieldSpec("microscopy (quantitative phase)", ("cell",), ("cell.png",), "region", 1),
    "moon": FieldSpec("lunar surface", ("moon",), ("moon.png",), "region", 1),
    "textures": FieldSpec(
        "textures", ("brick", "grass", "gravel"), ("brick.png", "grass.png", "gravel.png"), "source", 1
    ),
    "faces": FieldSpec("faces (LFW)", ("lfw_subset",), ("lfw_subset.npy",), "face", 1),
}
FIELD_GROUPS = {
    "fields_colour": ("hubble", "histology", "retina"),
    "fields_grey": ("cells", "moon", "textures"),
}


def _group_spec(members: tuple[str, ...]) -> FieldSpec:
    """A group's spec: its sources are its member sets, its label the member (members share channels)."""
    channels = FIELD_DATASETS[members[0]].channels
    files = tuple(file for member in members for file in FIELD_DATASETS[member].files)
    kind = "colour" if channels == 3 else "grey"
    return FieldSpec(f"all {kind} fields ({', '.join(members)})", members, files, "field", channels)


FIELD_DATASETS.update({group: _group_spec(members) for group, members in FIELD_GROUPS.items()})


def field_group(name: str) -> str | None:
    """The group a field set belongs to (``fields_colour`` / ``fields_grey``), else None."""
    return next((group for group, members in FIELD_GROUPS.items() if name in members), None)


@dataclasses.dataclass(frozen=True)
class FieldPatches:
    """A field set's patches, both splits: pixels (N, P, P, C) uint8, labels (N,) (index into
    ``class_names``), ``test`` (N,) bool, ``sources`` (N,) the image each patch comes from (index into
    the spec's ``sources``; for ``faces`` the index of the 25 x 25 image) and ``corners`` (N, 2) its
    top-left (row, column) in that image, in pixels."""

    pixels: np.ndarray
    labels: np.ndarray
    test: np.ndarray
    sources: np.ndarray
    corners: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> np.ndarray:
        """Indices (M,) of the ``"train"`` or ``"test"`` patches, in grid order."""
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return np.flatnonzero(self.test if name == "test" else ~self.test)


def field_spec(name: str) -> FieldSpec:
    """The spec of a field set; ``ValueError`` listing the names for an unknown one."""
    if name not in FIELD_DATASETS:
        raise ValueError(f"unknown field dataset {name!r}; field datasets: {sorted(FIELD_DATASETS)}")
    return FIELD_DATASETS[name]


def source_images(name: str) -> list[np.ndarray]:
    """The set's images from ``skimage.data`` as uint8 (H, W, C) arrays, in the spec's ``sources``
    order (``faces``: one (200, 25, 25, 1) array, 0..1 floats scaled to 0..255 and rounded)."""
    spec = field_spec(name)
    images = []
    for source in spec.sources:
        image = getattr(skimage_data, source)()
        if image.dtype != np.uint8:  # lfw_subset: float64 in [0, 1]
            image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        images.append(image[..., None] if image.ndim == 2 or source == "lfw_subset" else image)
    return images


def block_test_mask(rows: int, columns: int, block: int = BLOCK) -> np.ndarray:
    """(rows, columns) bool over a grid's cells: True in the test blocks, ``(i + 2 j) % 4 == 1`` for the
    block (i, j) = (row // block, column // block)."""
    if block < 1:
        raise ValueError(f"block must be >= 1 cell, got {block}")
    row, column = np.meshgrid(np.arange(rows) // block, np.arange(columns) // block, indexing="ij")
    return (row + 2 * column) % 4 == 1


def touching(mask: np.ndarray) -> np.ndarray:
    """(R, K) bool -> (R, K) bool: True at the cells that share an edge or a corner with a True cell
    (and at the True cells themselves): a 3 x 3 dilation."""
    rows, columns = mask.shape
    padded = np.pad(mask, 1)  # (R + 2, K + 2)
    out = np.zeros_like(mask)
    for dr in range(3):
        for dc in range(3):
            out |= padded[dr : dr + rows, dc : dc + columns]
    return out


def quadrant(corners: np.ndarray, patch_size: int, height: int, width: int) -> np.ndarray:
    """Corners (N, 2) -> (N,) index into :data:`QUADRANTS` of the quadrant holding each patch's centre."""
    centre = corners + patch_size / 2.0  # (N, 2)
    return (2 * (centre[:, 0] >= height / 2) + (centre[:, 1] >= width / 2)).astype(np.int64)


def cut_image(image: np.ndarray, patch_size: int, block: int, min_std: float) -> tuple[np.ndarray, ...]:
    """One image (H, W, C) -> its kept cells (M, P, P, C), their corners (M, 2) and test flags (M,):
    the grid's cells minus the guard ring (train cells touching a test cell) and flat cells."""
    cells, corners = grid_cells(image, patch_size)  # (R*K, P, P, C), (R*K, 2) row-major
    rows, columns = image.shape[0] // patch_size, image.shape[1] // patch_size
    test = block_test_mask(rows, columns, block)  # (R, K)
    guard = touching(test) & ~test  # (R, K): train cells next to a test cell
    keep = ~guard.reshape(-1) & textured(cells, min_std)  # (R*K,)
    return cells[keep], corners[keep], test.reshape(-1)[keep]


def grid_patches(name: str, patch_size: int, block: int, min_std: float) -> FieldPatches:
    """A cut set (every set but ``faces``): every image's kept cells, labelled by region or source."""
    spec = field_spec(name)
    parts = []
    for index, image in enumerate(source_images(name)):
        cells, corners, test = cut_image(image, patch_size, block, min_std)
        if spec.label == "region":
            labels = quadrant(corners, patch_size, image.shape[0], image.shape[1])
        else:
            labels = np.full(len(cells), index, dtype=np.int64)
        parts.append((cells, labels, test, np.full(len(cells), index, dtype=np.int64), corners))
    pixels, labels, test, sources, corners = (np.concatenate(column) for column in zip(*parts, strict=True))
    return FieldPatches(pixels, labels, test, sources, corners, spec.class_names())


def face_patches(min_std: float) -> FieldPatches:
    """``faces``: lfw_subset's 200 images (25 x 25 grey), label 0 face / 1 non-face, image ``k`` a test
    image when ``k % 5 == 4``; flat images dropped by the same rule."""
    (images,) = source_images("faces")  # (200, 25, 25, 1)
    index = np.arange(len(images))
    labels = (index >= len(images) // 2).astype(np.int64)  # the first 100 are faces
    keep = textured(images, min_std)
    corners = np.zeros((len(images), 2), dtype=np.int64)
    return FieldPatches(
        images[keep],
        labels[keep],
        (index % TEST_EVERY == TEST_EVERY - 1)[keep],
        index[keep],
        corners[keep],
        FACE_CLASSES,
    )


def field_patches(
    name: str, patch_size: int = PATCH_SIZE, block: int = BLOCK, min_std: float = MIN_STD
) -> FieldPatches:
    """Both splits of the field set ``name`` (see the module docstring); ``ValueError`` naming a bad
    name or option."""
    field_spec(name)
    if patch_size < 2:
        raise ValueError(f"patch_size must be >= 2, got {patch_size}")
    if block < 2:
        raise ValueError(f"block must be >= 2 cells (a guard ring needs room), got {block}")
    if not min_std >= 0:
        raise ValueError(f"min_std must be >= 0, got {min_std}")
    if name == "faces":
        return face_patches(min_std)
    if name in FIELD_GROUPS:
        return group_patches(name, patch_size, block, min_std)
    return grid_patches(name, patch_size, block, min_std)


def group_patches(group: str, patch_size: int, block: int, min_std: float) -> FieldPatches:
    """A group's members, splits unchanged, label = member index; ``sources`` numbered across members
    (member k's images follow member k-1's), corners in the member's images."""
    parts, offset = [], 0
    for label, member in enumerate(FIELD_GROUPS[group]):
        cut = grid_patches(member, patch_size, block, min_std)
        parts.append(
            (
                cut.pixels,
                np.full(len(cut), label, dtype=np.int64),
                cut.test,
                cut.sources + offset,
                cut.corners,
            )
        )
        offset += len(FIELD_DATASETS[member].sources)
    pixels, labels, test, sources, corners = (np.concatenate(column) for column in zip(*parts, strict=True))
    return FieldPatches(pixels, labels, test, sources, corners, FIELD_DATASETS[group].class_names())
