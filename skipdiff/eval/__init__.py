"""Evaluation as a library of ``x_to_y`` functions on torch-fidelity (a thin CLI sits on top).

:mod:`.features`: feature extractors (a trained digits classifier, any saved SkipResNet, Inception-v3)
registered with torch-fidelity under weight-hashed names. :mod:`.fid`: images -> uint8 -> features ->
statistics -> FID / KID / precision-recall, and :func:`fid_with_floor`, which reports every FID with the
real-vs-real floor at the same sample count and its spread over sampling seeds.
"""

from .features import (
    EXTRACTOR_CHOICES,
    INCEPTION,
    ClassifierFeatureExtractor,
    ExtractorSpec,
    InceptionUnavailableError,
    classifier_extractor_name,
    create_extractor,
    digits_extractor,
    inception_kwargs,
    load_extractor,
    register_classifier_extractor,
    resolve_extractor,
    train_digits_extractor,
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

__all__ = [
    "EXTRACTOR_CHOICES",
    "INCEPTION",
    "ClassifierFeatureExtractor",
    "ExtractorSpec",
    "FidReport",
    "InceptionUnavailableError",
    "RealImages",
    "classifier_extractor_name",
    "create_extractor",
    "digits_extractor",
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
    "train_digits_extractor",
]
