"""FID, KID and precision/recall as ``x_to_y`` functions on torch-fidelity, and FID with its floor.

The chain, each step a function::

    images in [-1, 1]  --images_to_uint8-->  uint8 (B, C, H, W)  --features_of-->  features (N, D)
    features  --features_to_statistics-->  (mu, sigma)  --statistics_to_fid-->  FID

    FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))        (Heusel et al. 2017, eq. 6)

Statistics and the Fréchet distance are torch-fidelity's own (``fid_features_to_statistics``,
``fid_statistics_to_metric``), KID and precision/recall too (``kid_features_to_metric``,
``prc_features_to_metric``); features come from its extractor modules (:mod:`.extractors`).

**Reference cache.** Features of real images are cached through torch-fidelity's input-cache mechanism:
the file is ``<cache_root>/<cache_name>-<extractor name>-features-<layer>.pt`` (what ``calculate_metrics``
writes for ``input2_cache_name=<cache_name>``). :func:`real_images` names a split
``skipdiff-<label>-<resolution>px-<hash12>`` where the hash is taken over the exact uint8 pixels the
extractor sees, so the key covers dataset, split (seed and fraction included), resolution and channels
by construction; skipdiff's extractor names carry a hash of their weights (see :mod:`.extractors`).
Together, a cache hit can only return features of the same pixels under the same weights. Statistics
are recomputed from the cached features (float64, milliseconds to seconds), not cached.

**Floor.** :func:`fid_with_floor` reports every FID of generated samples next to the real-vs-real
floor at the same sample count: ``num_samples`` held-out real images against the same reference. The
estimator is biased upward at finite N (the bias shrinks roughly as 1/N), so only the gap to the floor
means anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import Dataset
from torch_fidelity import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_FID,
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    FeatureExtractorBase,
)
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

from ..config import subset
from ..data_options import DataOptions
from .extractors import ClassifierFeatureExtractor, ExtractorSpec, create_extractor

KID_SUBSET_SIZE = 1000  # torch-fidelity's default; lowered to the smaller set's size when needed
REFERENCE_SPLITS = ("train", "test")
# Fewer reference images than this (or than the feature dimension + 1, where that is larger: 2049 for
# Inception, 65 for the domain extractors) and fid_with_floor warns: the reference's mean and covariance
# are then too noisy (a covariance of fewer points than dimensions is singular) for the FID to say much,
# floor or not. On digits the real-vs-real FID was 14.4 at 899 vs 898 images, 19.1 at 899 vs 500.
MIN_FID_REFERENCE_IMAGES = 500

SampleFn = Callable[[int, int], torch.Tensor]  # (num_samples, seed) -> images (N, C, H, W) in [-1, 1]


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images (B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W) in [0, 255].

    ``round((x + 1) * 127.5)`` after clamping, the quantisation diffusers' ``numpy_to_pil`` applies; it
    inverts :func:`skipdiff.data.image_transform` exactly. NaN or inf raise ``ValueError``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [-1, 1], got dtype {images.dtype}")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"{bad} of {images.numel()} pixel values are NaN or inf (did sampling diverge?)")
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class UInt8Images(Dataset):
    """A uint8 tensor (N, C, H, W) as the torch Dataset torch-fidelity reads (one image per item)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 images (N, C, H, W), got dtype {images.dtype} and shape {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@dataclasses.dataclass(frozen=True)
class RealImages:
    """Real images of one split as uint8 (N, C, H, W), and the cache name of their features."""

    images: torch.Tensor
    cache_name: str

    def __len__(self) -> int:
        return self.images.shape[0]


def pixels_digest(images: torch.Tensor) -> str:
    """sha256 over a uint8 tensor's shape and bytes."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def real_images(split, resolution: int, channels: int, label: str) -> RealImages:
    """A 🤗 split of ``{"image": PIL}`` rows -> :class:`RealImages`, through the training transform.

    The transform is :func:`skipdiff.data.image_transform` (resize, centre crop, no flip), so real
    images meet the extractor exactly as the diffusion model saw them. ``label`` (e.g. ``digits-train``)
    only makes cache files readable; the content hash makes them correct.
    """
    # heavy: the data layer (🤗 datasets, ~0.7 s) only where real images are read
    from ..data import image_transform

    if len(split) == 0:
        raise ValueError(f"split {label!r} is empty")
    transform = image_transform(resolution, channels)
    images = images_to_uint8(torch.stack([transform(image) for image in split["image"]]))  # (N, C, r, r)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")[:60] or "images"
    return RealImages(images, f"skipdiff-{slug}-{resolution}px-{pixels_digest(images)[:12]}")


def real_splits(options: dict) -> dict[str, RealImages]:
    """``{"train", "test"}`` real images of a training run, from its ``training_options.json`` dict.

    Reads the data keys (``dataset``, ``dataset_name``, ``dataset_config_name``, ``train_data_dir``,
    ``image_column``, ``label_column``, ``split_seed``, ``test_fraction``, ``resolution``,
    ``skip_corrupt_images``, ``cache_dir``) so that the splits are exactly the run's. Images are always
    centre-cropped (a deterministic reference, even for runs trained with random crops).
    """
    # heavy: the data layer (🤗 datasets, ~0.7 s) only where real images are read
    from ..data import dataset_channels, load_image_splits

    if "resolution" not in options:
        raise ValueError(f"training options lack 'resolution'; keys: {sorted(options)}")
    data = subset(DataOptions, options)
    splits = load_image_splits(data)
    channels = dataset_channels(splits, data.image_channels)
    return {
        name: real_images(splits[name], data.resolution, channels, f"{data.source()}-{name}")
        for name in ("train", "test")
    }


def reference_and_heldout(real: dict[str, RealImages], reference: str = "train") -> tuple[RealImages, RealImages]:
    """(reference, held-out) for :func:`fid_with_floor`: ``"train"`` compares samples with the train split
    and takes the floor from test images; ``"test"`` swaps the roles (use it when the test split is
    smaller than the number of samples)."""
    if reference not in REFERENCE_SPLITS:
        raise ValueError(f"reference must be one of {REFERENCE_SPLITS}, got {reference!r}")
    heldout = "test" if reference == "train" else "train"
    return real[reference], real[heldout]


# --------------------------------------------------------------------------------------------------
# Features, statistics, metrics
# --------------------------------------------------------------------------------------------------


def _blas_threads():
    """numpy's BLAS limited to torch's thread count: its default (every core) oversubscribes a shared
    machine, which made KID's kernel matrices ~20x slower here."""
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def features_of(
    images: torch.Tensor,
    extractor: FeatureExtractorBase | ExtractorSpec | str,
    *,
    batch_size: int = 64,
    cache_name: str | None = None,
    cache_root: str | None = None,
    cuda: bool | None = None,
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 features (N, D) of the extractor's FID layer.

    Runs torch-fidelity's own extraction loop (no worker processes). With ``cache_name``, the features
    are cached under ``cache_root`` (torch-fidelity's default ``$TORCH_HOME/fidelity_cache`` if None) as
    ``<cache_name>-<extractor name>-features-<layer>.pt``; the caller vouches that the name identifies
    the pixels (:func:`real_images` hashes them). Grey images are repeated to RGB for extractors other
    than skipdiff classifiers (Inception takes RGB only).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"features_of takes uint8 images (N >= 1, C, H, W) (see images_to_uint8), got dtype {images.dtype} "
            f"and shape {tuple(images.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not isinstance(extractor, FeatureExtractorBase):
        extractor = create_extractor(extractor, cuda=cuda)
    if images.shape[1] == 1 and not isinstance(extractor, ClassifierFeatureExtractor):
        images = images.expand(-1, 3, -1, -1)  # (N, 3, H, W)
    (layer,) = extractor.get_requested_features_list()
    featuresdict = extract_featuresdict_from_input_id_cached(
        1,
        extractor,
        input1=UInt8Images(images),
        input1_cache_name=cache_name,
        cache=cache_name is not None,
        cache_root=cache_root,
        batch_size=batch_size,
        cuda=cuda,
        save_cpu_ram=True,
        verbose=False,
    )
    return featuresdict[layer]


def features_to_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) -> (mu (D,), sigma (D, D)) in float64; N >= 2 (sigma is the unbiased covariance)."""
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got num_samples={features.shape[0]}")
    with _blas_threads():
        stats = fid_features_to_statistics(features.detach().cpu().double())
    return stats["mu"], stats["sigma"]


def statistics_to_fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians (torch-fidelity's ``fid_statistics_to_metric``)."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    as64 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    other = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    with _blas_threads():
        return fid_statistics_to_metric(as64, other, verbose=False)[KEY_METRIC_FID]


def features_to_fid(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return statistics_to_fid(*features_to_statistics(features1), *features_to_statistics(features2))


def kid_subset_size_for(num_samples: int, num_reference: int, requested: int | None = None) -> int:
    """KID's subset size: ``requested`` (checked), else min(1000, both set sizes)."""
    largest = min(num_samples, num_reference)
    if requested is None:
        return min(KID_SUBSET_SIZE, largest)
    if not 2 <= requested <= largest:
        raise ValueError(
            f"kid_subset_size must lie in [2, min(num_samples, reference size)] = [2, {largest}], got {requested}"
        )
    return requested


def features_to_kid(
    features1: torch.Tensor,
    features2: torch.Tensor,
    subset_size: int | None = None,
    subsets: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """KID (Binkowski et al. 2018; cubic polynomial kernel, unbiased MMD^2) over random subsets.

    Returns ``kid_mean``, ``kid_std`` (over subsets) and the ``kid_subset_size`` used.
    """
    size = kid_subset_size_for(len(features1), len(features2), subset_size)
    with _blas_threads():  # float32 features, as calculate_metrics passes them
        out = kid_features_to_metric(
            features1.cpu().float(),
            features2.cpu().float(),
            kid_subsets=subsets,
            kid_subset_size=size,
            rng_seed=seed,
            verbose=False,
        )
    return {"kid_mean": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_subset_size": size}


def features_to_prc(generated: torch.Tensor, real: torch.Tensor, neighborhood: int = 3) -> dict[str, float]:
    """Precision/recall (Kynkäänniemi et al. 2019, k-NN manifolds): ``precision`` is the fraction of
    generated samples inside the real manifold, ``recall`` the fraction of real ones inside the
    generated manifold."""
    if min(len(generated), len(real)) <= neighborhood:
        raise ValueError(
            f"precision/recall with prc_neighborhood={neighborhood} needs more than {neighborhood} samples per set, "
            f"got {len(generated)} and {len(real)}"
        )
    out = prc_features_to_metric(
        generated.cpu().float(),
        real.cpu().float(),
        prc_neighborhood=neighborhood,
        save_cpu_ram=True,
        verbose=False,
    )
    return {
        "precision": out[KEY_METRIC_PRECISION],
        "recall": out[KEY_METRIC_RECALL],
        "f_score": out[KEY_METRIC_F_SCORE],
    }


# --------------------------------------------------------------------------------------------------
# FID with its floor, over sampling seeds
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FidReport:
    """Per-seed metrics of generated samples (``fid``, ...) and of the floor (``floor_fid``, ...), and
    their mean and sample std (ddof=1; None for a single seed) over seeds."""

    extractor: str
    num_samples: int
    seeds: list[int]
    reference: str  # cache name of the reference split
    reference_size: int
    heldout: str
    heldout_size: int
    kid_subset_size: int | None
    per_seed: list[dict]
    summary: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """One line, e.g. ``FID 34.1 ± 3.2 (floor 14.4 ± 0.5; 500 samples, 3 seeds)``."""

        def pm(key: str) -> str:
            mean, std = self.summary[key]["mean"], self.summary[key]["std"]
            return f"{mean:.4g}" + ("" if std is None else f" ± {std:.2g}")

        extra = "".join(
            f", {key} {pm(key)} (floor {pm('floor_' + key)})"
            for key in ("kid_mean", "precision", "recall")
            if key in self.summary
        )
        return (
            f"FID {pm('fid')} (floor {pm('floor_fid')}){extra}; {self.num_samples} samples, "
            f"{len(self.seeds)} seed(s), {self.extractor}"
        )


def _summarise(per_seed: list[dict]) -> dict[str, dict[str, float | None]]:
    keys = [key for key, value in per_seed[0].items() if key != "seed" and isinstance(value, float)]
    out = {}
    for key in keys:
        values = [row[key] for row in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else None
        out[key] = {"mean": statistics.fmean(values), "std": std}
    return out


def _metrics(features: torch.Tensor, reference: torch.Tensor, ref_stats, kid: bool, kid_size, prc: bool, seed) -> dict:
    out = {"fid": statistics_to_fid(*features_to_statistics(features), *ref_stats)}
    if kid:
        out.update(features_to_kid(features, reference, kid_size, seed=seed))
        out.pop("kid_subset_size")
    if prc:
        out.update(features_to_prc(features, reference))
    return out


def extractor_channels(extractor: FeatureExtractorBase) -> int:
    """The channels a feature extractor reads: a skipdiff classifier's own, 3 for Inception and the others."""
    return extractor.net.config.num_channels if isinstance(extractor, ClassifierFeatureExtractor) else 3


def warn_channel_mismatch(channels: int, extractor: FeatureExtractorBase) -> None:
    """Warn when ``channels``-channel images are scored by an extractor that reads another channel count
    (converted on the way, :func:`~.extractors.uint8_to_model_input`); grey into Inception is its usual
    use (repeated to RGB) and passes silently."""
    wanted = extractor_channels(extractor)
    if channels == wanted or not isinstance(extractor, ClassifierFeatureExtractor):
        return
    effect = (
        "colour is reduced to grey (luma) first, so this FID cannot see colour errors"
        if channels == 3
        else "grey is repeated to 3 channels, images the extractor never saw in training"
    )
    warnings.warn(
        f"FID of {channels}-channel images with the {wanted}-channel feature extractor "
        f"{extractor.get_name()!r}: {effect}; pass a {channels}-channel extractor (--feature_extractor)",
        UserWarning,
        stacklevel=3,
    )


def warn_few_reference_images(count: int, dimension: int, name: str) -> None:
    """Warn when an FID's reference holds fewer than :data:`MIN_FID_REFERENCE_IMAGES` images (or fewer than
    the feature dimension + 1)."""
    minimum = max(MIN_FID_REFERENCE_IMAGES, dimension + 1)
    if count < minimum:
        warnings.warn(
            f"FID against {count} reference images ({name}), fewer than the {minimum} it needs "
            f"(MIN_FID_REFERENCE_IMAGES = {MIN_FID_REFERENCE_IMAGES}, or the {dimension}-d features' "
            "dimension + 1): its value and its floor are mostly estimation noise; use a larger reference "
            "split (--reference) or more data",
            UserWarning,
            stacklevel=3,
        )


def fid_with_floor(
    sample_fn: SampleFn,
    reference: RealImages,
    heldout: RealImages,
    extractor: FeatureExtractorBase | ExtractorSpec | str,
    *,
    num_samples: int,
    seeds: Sequence[int] = (0, 1, 2),
    kid: bool = False,
    prc: bool = False,
    kid_subset_size: int | None = None,
    batch_size: int = 64,
    cache_root: str | None = None,
    cuda: bool | None = None,
) -> FidReport:
    """FID of ``num_samples`` generated images against ``reference``, with the real-vs-real floor.

    For every seed: ``sample_fn(num_samples, seed)`` gives images (N, C, H, W) in [-1, 1] (same C, H, W
    as the real ones); their FID (and KID, precision/recall when asked) against the whole ``reference``
    split is reported next to the floor, the same metrics for ``num_samples`` held-out real images drawn
    without replacement (seeded by the same seed) against the same reference. When the held-out split
    holds exactly ``num_samples`` images every seed draws all of them, and the floor's std is 0.

    Real features are cached (see the module docstring). The extractor is built first, so a missing
    Inception download fails before any sampling. ``kid_subset_size`` defaults to min(1000, N, reference
    size); it is recorded in the report.
    """
    seeds = list(seeds)
    if num_samples < 2:
        raise ValueError(f"FID needs num_samples >= 2 (a covariance), got num_samples={num_samples}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {seeds}")
    if len(heldout) < num_samples:
        raise ValueError(
            f"the floor needs num_samples={num_samples} held-out real images but {heldout.cache_name!r} has "
            f"{len(heldout)}: lower num_samples, or swap the roles of the splits (reference='test')"
        )
    kid_size = kid_subset_size_for(num_samples, len(reference), kid_subset_size) if kid else None
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not isinstance(extractor, FeatureExtractorBase):
        extractor = create_extractor(extractor, cuda=cuda)
    extract = dict(batch_size=batch_size, cache_root=cache_root, cuda=cuda)
    warn_channel_mismatch(reference.images.shape[1], extractor)
    reference_features = features_of(reference.images, extractor, cache_name=reference.cache_name, **extract)
    warn_few_reference_images(len(reference), reference_features.shape[1], reference.cache_name)
    heldout_features = features_of(heldout.images, extractor, cache_name=heldout.cache_name, **extract)
    reference_stats = features_to_statistics(reference_features)
    per_seed = []
    for seed in seeds:
        start = time.perf_counter()
        images = sample_fn(num_samples, seed)
        sample_seconds = time.perf_counter() - start
        expected = (num_samples, *reference.images.shape[1:])
        if tuple(images.shape) != expected:
            raise ValueError(
                f"sample_fn({num_samples}, {seed}) returned shape {tuple(images.shape)}, expected {expected}"
            )
        start = time.perf_counter()
        generated = features_of(images_to_uint8(images), extractor, **extract)  # (N, D)
        extract_seconds = time.perf_counter() - start
        pick = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed))[:num_samples]
        pick = pick.sort().values  # a subset in split order: all of the split gives a bitwise-stable floor
        row = {"seed": seed}
        row.update(_metrics(generated, reference_features, reference_stats, kid, kid_size, prc, seed))
        floor = _metrics(heldout_features[pick], reference_features, reference_stats, kid, kid_size, prc, seed)
        row.update({f"floor_{key}": value for key, value in floor.items()})
        row.update(sample_seconds=sample_seconds, extract_seconds=extract_seconds)
        per_seed.append(row)
    summary = {key: value for key, value in _summarise(per_seed).items() if not key.endswith("_seconds")}
    return FidReport(
        extractor=extractor.get_name(),
        num_samples=num_samples,
        seeds=seeds,
        reference=reference.cache_name,
        reference_size=len(reference),
        heldout=heldout.cache_name,
        heldout_size=len(heldout),
        kid_subset_size=kid_size,
        per_seed=per_seed,
        summary=summary,
    )
