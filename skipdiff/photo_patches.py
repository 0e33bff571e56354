"""Natural-image patches: 16x16 colour tiles cut from the photographs that installed packages bundle.

The second built-in image set (``photo_patches``), from natural-image statistics rather than
handwriting. Three photographs ship inside the wheels skipdiff already depends on, so no download is
needed: scikit-learn's ``china.jpg`` and ``flower.jpg`` (427x640, :func:`sklearn.datasets.load_sample_images`)
and matplotlib's ``grace_hopper.jpg`` (512x600, :func:`matplotlib.cbook.get_sample_data`).

* **Grid.** Each photograph is tiled by a centred, non-overlapping grid of ``patch_size`` squares (the
  remainder, at most ``patch_size - 1`` pixels per axis, is cut off evenly on both sides). A patch is
  one grid cell, so two patches never share a pixel: however the patches are split, train and test
  patches never overlap spatially (neighbouring cells can still be alike, as neighbouring pixels are).
* **Flat cells are dropped.** A cell whose standard deviation is below ``min_std`` grey levels (of 255)
  in every channel is uniform sky or background: it carries no structure, and dozens of such
  near-identical cells would sit on both sides of the split (a free match for any generator and for
  the FID floor). With the defaults: china 739, flower 968, grace_hopper 1183 patches, 2890 in all
  (374 flat cells dropped, 301 of them china's sky).
* **Label** = the source photograph (3 classes), which the FID feature extractor learns to tell apart
  from a patch's texture and colour (:mod:`skipdiff.eval.domain_extractor`).

Deterministic given the decoded photographs (PIL's JPEG decoder; another libjpeg build may differ in
the last bit, which the pixel-hashed FID caches would notice).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOGRAPHS = ("china", "flower", "grace_hopper")  # class index = position here
PATCH_SIZE = 16
MIN_STD = 2.0  # grey levels (of 255): a cell flatter than this in every channel is dropped


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """Patches (N, P, P, 3) uint8, their labels (N,) (index into ``PHOTOGRAPHS``) and the top-left
    corner (N, 2) = (row, column) of each patch in its photograph, in pixels."""

    pixels: np.ndarray
    labels: np.ndarray
    corners: np.ndarray
    patch_size: int

    def __len__(self) -> int:
        return len(self.labels)


def photographs() -> dict[str, np.ndarray]:
    """The bundled photographs as uint8 RGB arrays (H, W, 3), in ``PHOTOGRAPHS`` order."""
    # heavy: matplotlib and scikit-learn (~1 s) only to cut the patches (their sample photographs)
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    photos = {Path(name).stem: image for name, image in zip(bunch.filenames, bunch.images, strict=True)}
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        photos["grace_hopper"] = np.asarray(image.convert("RGB"))
    return {name: photos[name] for name in PHOTOGRAPHS}


def grid_cells(photo: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A photograph (H, W, C) -> its centred grid's cells (R * K, P, P, C) in row-major order, and their
    top-left corners (R * K, 2)."""
    height, width, channels = photo.shape
    rows, columns = height // patch_size, width // patch_size
    top, left = (height - rows * patch_size) // 2, (width - columns * patch_size) // 2
    grid = photo[top : top + rows * patch_size, left : left + columns * patch_size]  # (R*P, K*P, C)
    cells = grid.reshape(rows, patch_size, columns, patch_size, channels).swapaxes(1, 2)  # (R, K, P, P, C)
    row, column = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")  # (R, K) each
    corners = np.stack([top + row * patch_size, left + column * patch_size], axis=-1)  # (R, K, 2)
    return cells.reshape(-1, patch_size, patch_size, channels), corners.reshape(-1, 2)


def textured(cells: np.ndarray, min_std: float) -> np.ndarray:
    """The flat-cell rule: cells (M, P, P, C) -> (M,) bool, True where the standard deviation of the
    cell's pixels reaches ``min_std`` grey levels in at least one channel (flat only when flat in every
    channel). Shared by every built-in patch set (:mod:`skipdiff.field_patches` too)."""
    spread = cells.reshape(len(cells), -1, cells.shape[-1]).std(axis=1)  # (M, C): per channel
    return spread.max(axis=1) >= min_std


def photo_patch_grid(patch_size: int = PATCH_SIZE, min_std: float = MIN_STD) -> PatchGrid:
    """Every non-flat grid cell of every bundled photograph (see the module docstring)."""
    if patch_size < 2:
        raise ValueError(f"patch_size must be >= 2, got {patch_size}")
    if not min_std >= 0:
        raise ValueError(f"min_std must be >= 0, got {min_std}")
    pixels, labels, corners = [], [], []
    for label, photo in enumerate(photographs().values()):
        cells, cell_corners = grid_cells(photo, patch_size)  # (M, P, P, 3), (M, 2)
        keep = textured(cells, min_std)  # (M,)
        pixels.append(cells[keep])
        corners.append(cell_corners[keep])
        labels.append(np.full(int(keep.sum()), label, dtype=np.int64))
    return PatchGrid(np.concatenate(pixels), np.concatenate(labels), np.concatenate(corners), patch_size)
