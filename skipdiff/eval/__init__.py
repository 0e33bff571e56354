"""Evaluation as a library of ``x_to_y`` functions on torch-fidelity (a thin CLI sits on top).

:mod:`.extractors`: classifier features as torch-fidelity extractors under weight-hashed names;
:mod:`.domain_extractor`: the classifier trained for a built-in image set (digits, photo_patches) on the
run's train split; :mod:`.inception`: Inception-v3 weights offline; :mod:`.extractor_choice`: a CLI
choice (auto, a set's name, inception, a folder) -> extractor. :mod:`.fid`: images -> uint8 -> features ->
statistics -> FID / KID / precision-recall, and :func:`fid_with_floor`, which reports every FID with the
real-vs-real floor at the same sample count and its spread over sampling seeds.
"""

from .domain_extractor import cached_domain_extractor, train_domain_extractor
from .extractor_choice import EXTRACTOR_CHOICES, auto_extractor, resolve_extractor
from .extractors import (
    ClassifierFeatureExtractor,
    ExtractorSpec,
    classifier_extractor_name,
    create_extractor,
    load_extractor,
    register_classifier_extractor,
)
from .fid import (
    FidReport,
    RealImages,
    features_of,
    features_to_fid,
    features_to_kid,
    features_to_prc,
    features_to_statistics,
    fid_with_floor,
    images_to_uint8,
    real_images,
    real_splits,
    reference_and_heldout,
    statistics_to_fid,
)
from .inception import INCEPTION, InceptionUnavailableError, inception_kwargs

__all__ = [
    "EXTRACTOR_CHOICES",
    "INCEPTION",
    "ClassifierFeatureExtractor",
    "ExtractorSpec",
    "FidReport",
    "InceptionUnavailableError",
    "RealImages",
    "auto_extractor",
    "cached_domain_extractor",
    "classifier_extractor_name",
    "create_extractor",
    "features_of",
    "features_to_fid",
    "features_to_kid",
    "features_to_prc",
    "features_to_statistics",
    "fid_with_floor",
    "images_to_uint8",
    "inception_kwargs",
    "load_extractor",
    "real_images",
    "real_splits",
    "reference_and_heldout",
    "register_classifier_extractor",
    "resolve_extractor",
    "statistics_to_fid",
    "train_domain_extractor",
]
