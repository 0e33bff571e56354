"""Which feature extractor FID uses: a CLI choice and the run's data -> :class:`ExtractorSpec`.

* ``auto``: the built-in image set's own domain extractor when the run uses one (``digits``,
  ``photo_patches``, the field sets; for ``moon`` its group's, ``fields_grey``, whose train split is
  the union of its members' train splits), Inception-v3 otherwise (a Hub dataset or an image folder);
* a built-in image set's name: its domain extractor (:mod:`.domain_extractor`), trained on the run's
  train split when the run uses that set, else on the set's default split at the run's resolution;
* ``inception-v3-compat`` (or ``inception``): see :func:`~skipdiff.eval.inception.inception_kwargs`;
* a folder holding a saved SkipResNet classifier (its ``extractor.json`` resolution, if any, is used).

Classifier extractors are registered with torch-fidelity on the way (:mod:`.extractors`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data_options import IMAGE_DATASETS, DataOptions
from ..field_patches import field_group
from .domain_extractor import cached_domain_extractor
from .extractors import ExtractorSpec, extractor_info, load_extractor, register_classifier_extractor
from .inception import INCEPTION, inception_kwargs

EXTRACTOR_CHOICES = ("auto", *IMAGE_DATASETS, INCEPTION)  # offered to the CLI; a classifier folder also works


# Field sets whose FID uses their group's extractor (trained on every member's train split to tell the
# members apart) rather than their own: where only the group's told real from degraded images
# (eval/extractor_checks.py --dataset fields --extractor own / group; docs/datasets.md).
GROUP_EXTRACTOR = ("moon",)


def auto_extractor(data: DataOptions) -> str:
    """``auto``'s choice for ``data``: the built-in image set's name (for a set in
    :data:`GROUP_EXTRACTOR`, its group's: ``fields_grey``), else Inception."""
    name = data.builtin_image_dataset()
    if name is None:
        return INCEPTION
    return field_group(name) if name in GROUP_EXTRACTOR else name


def resolve_extractor(
    choice: str,
    *,
    data: DataOptions | None = None,
    inception_weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ExtractorSpec:
    """A CLI choice (see the module docstring) -> :class:`ExtractorSpec`.

    ``data`` is the run's data options (default: ``DataOptions()``, digits at 16x16); ``cache_dir`` is
    where domain extractors are kept (default :func:`~skipdiff.eval.domain_extractor.default_cache_dir`).
    """
    data = data if data is not None else DataOptions()
    if choice == "auto":
        choice = auto_extractor(data)
    if choice in IMAGE_DATASETS:
        if data.builtin_image_dataset() != choice:  # another set's extractor: that set's default split
            data = DataOptions(dataset=choice, resolution=data.resolution)
        model = load_extractor(cached_domain_extractor(data, cache_dir=cache_dir))
        return ExtractorSpec(register_classifier_extractor(model, f"{choice}{data.resolution}", data.resolution))
    if choice in (INCEPTION, "inception"):
        kwargs = inception_kwargs(inception_weights)
        return ExtractorSpec(kwargs.pop("feature_extractor"), kwargs)
    if Path(choice).is_dir():
        model, info = load_extractor(choice), extractor_info(choice)
        resolution = info.get("resolution")
        tag = f"{info['dataset']}{resolution}" if "dataset" in info else Path(choice).resolve().name
        return ExtractorSpec(register_classifier_extractor(model, tag, resolution))
    raise ValueError(
        f"unknown feature extractor {choice!r}; choose from {list(EXTRACTOR_CHOICES)} or pass a folder holding "
        "a saved SkipResNetForImageClassification"
    )
