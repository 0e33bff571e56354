"""Does a generator copy its training images? Nearest-neighbour distances to the train and test splits.

FID against the training split cannot tell a model that generalises from one that reproduces its
training images: both match the training distribution. The test split can. For generated samples G,
train images T and held-out test images H (all as features of one extractor, or as pixels):

* ``d(G -> T)``, ``d(G -> H)``: each sample's distance to its nearest train / test image;
* the baselines ``d(H -> T)``: how close unseen real images come to the training set, and
  ``d(T -> T')``: a training image's distance to its nearest *other* training image;
* the copy rate: the fraction of samples closer to their nearest training image than 99% (or 95%) of
  the held-out images are to theirs (``d(G -> T) < quantile_q d(H -> T)``); a model that samples the data
  distribution without copying has a copy rate near ``1 - q``, a memorising model far above it;
* the ratio ``median d(G -> T) / median d(H -> T)`` (well below 1: samples hug the training images).

Each is a function of feature (or pixel) tensors, so any extractor plugs in (``x_to_y`` style).
"""

from __future__ import annotations

import torch

QUANTILES = (0.01, 0.05)


def nearest_distances(
    queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query (N, D) to its nearest reference (M, D), and that reference's index.

    ``exclude_self``: queries *are* the references (N == M) and each one's own row is skipped
    (leave-one-out nearest neighbour)."""
    if queries.ndim != 2 or references.ndim != 2 or queries.shape[1] != references.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(queries.shape)} and {tuple(references.shape)}")
    if exclude_self and queries.shape[0] != references.shape[0]:
        raise ValueError("exclude_self needs the queries to be the references")
    queries, references = queries.double(), references.double()
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        block = torch.cdist(queries[start : start + chunk], references)  # (n, M)
        if exclude_self:
            rows = torch.arange(block.shape[0])
            block[rows, rows + start] = float("inf")
        value, index = block.min(dim=1)
        distances.append(value)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def _summary(values: torch.Tensor) -> dict[str, float]:
    quantiles = torch.quantile(values, torch.tensor([0.01, 0.05, 0.5], dtype=values.dtype)).tolist()
    return {"median": quantiles[2], "p05": quantiles[1], "p01": quantiles[0], "mean": float(values.mean())}


def memorisation_statistics(generated: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> dict:
    """The module's figures for one representation (features or flattened pixels), each (N, D)."""
    g_train, nearest_train = nearest_distances(generated, train)
    g_test, _ = nearest_distances(generated, test)
    h_train, _ = nearest_distances(test, train)
    t_train, _ = nearest_distances(train, train, exclude_self=True)
    copy_rate = {
        f"below_q{int(q * 100):02d}_of_test_to_train": float((g_train < torch.quantile(h_train, q)).double().mean())
        for q in QUANTILES
    }
    return {
        "generated_to_train": _summary(g_train),
        "generated_to_test": _summary(g_test),
        "test_to_train": _summary(h_train),
        "train_to_other_train": _summary(t_train),
        "ratio_median_generated_to_train_over_test_to_train": float(g_train.median() / h_train.median()),
        "copy_rate": copy_rate,
        "copy_rate_expected_without_copying": {f"below_q{int(q * 100):02d}_of_test_to_train": q for q in QUANTILES},
        "nearest_train_index": nearest_train.tolist(),
        "sizes": {"generated": len(generated), "train": len(train), "test": len(test)},
    }


def equal_size_indices(total: int, size: int, seed: int = 0) -> torch.Tensor:
    """``size`` distinct indices of ``total`` train images, a fixed draw: a train reference as large as the
    test split. Nearest-neighbour distances shrink and FID's bias changes with the reference's size, so a
    comparison of "closer to train than to test" needs references of equal size to mean memorisation."""
    if not 0 < size <= total:
        raise ValueError(f"equal-size reference: {size} of {total} train images is not a subset")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def pixels_as_features(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, C*H*W) floats in [0, 1], for distances in pixel space."""
    return images_uint8.flatten(1).double() / 255.0
