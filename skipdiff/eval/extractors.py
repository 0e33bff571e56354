"""Classifier features as a torch-fidelity feature extractor, registered under a weight-hashed name.

Any :class:`~skipdiff.classifiers.SkipResNetForImageClassification`'s penultimate features
(``model.features``) can play the role Inception's pool features play in FID.
:func:`register_classifier_extractor` registers the model with torch-fidelity under a name that carries
a hash of its config and weights (``skipdiff-digits16-<hash12>``). torch-fidelity keys its feature
cache by input name and extractor *name* only, so a retrained extractor under an old name would
silently reuse stale statistics; with the hash in the name it cannot. :func:`create_extractor` builds
the torch-fidelity module from an :class:`ExtractorSpec` (a registered name and its kwargs).

Where the models come from lives elsewhere: :mod:`.domain_extractor` trains one per built-in image set,
:mod:`.inception` finds Inception's weights, :mod:`.extractor_choice` turns a CLI choice into a spec.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from ..classifiers import SkipResNetForImageClassification

EXTRACTOR_INFO = "extractor.json"  # written next to a trained extractor's config.json + model.safetensors

# ITU-R BT.601 luma, as PIL's convert("L") computes it (the data layer makes grey images that way).
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class ExtractorSpec:
    """A torch-fidelity feature extractor: its registered ``name`` and constructor ``kwargs``."""

    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Classifier features as a torch-fidelity extractor
# --------------------------------------------------------------------------------------------------


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """Penultimate features of a skipdiff image classifier, for torch-fidelity.

    Not registered itself: :func:`register_classifier_extractor` makes a subclass bound to one frozen
    copy of a model. Input: uint8 images (B, C, H, W) in [0, 255], as torch-fidelity passes them; they
    are mapped to the model's [-1, 1] input, converted grey <-> colour to the model's channels, and
    resized to the model's training resolution when one was given.
    """

    source_model: nn.Module  # set on the subclass; every instance works on its own copy
    resolution: int | None = None

    def __init__(self, name, features_list, **kwargs):  # kwargs: every calculate_metrics option, unused
        super().__init__(name, features_list)
        self.net = copy.deepcopy(self.source_model).eval().requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pixels = uint8_to_model_input(images, self.net.config.num_channels, self.resolution)  # (B, C', r, r)
        features = self.net.features(pixels)  # (B, hidden_size)
        out = {"features": features}
        if "logits" in self.features_list:
            out["logits"] = self.net.classifier(features)  # (B, num_labels)
        return tuple(out[name].float() for name in self.features_list)


def uint8_to_model_input(images: torch.Tensor, channels: int, resolution: int | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float (B, channels, H', W') in [-1, 1].

    RGB -> grey uses PIL's luma weights (rounded to integers as PIL does); grey -> RGB repeats the
    channel. ``resolution`` resizes bilinearly (antialiased) to ``resolution`` x ``resolution``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images of shape (B, C, H, W), got dtype {images.dtype} and shape {tuple(images.shape)}"
        )
    pixels = images.float()  # (B, C, H, W) in [0, 255]
    have = pixels.shape[1]
    if have == 3 and channels == 1:
        weights = pixels.new_tensor(_LUMA).view(1, 3, 1, 1)
        pixels = (pixels * weights).sum(dim=1, keepdim=True).round()  # (B, 1, H, W)
    elif have == 1 and channels == 3:
        pixels = pixels.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    elif have != channels:
        raise ValueError(f"cannot feed {have}-channel images to a {channels}-channel classifier")
    pixels = pixels / 127.5 - 1.0
    if resolution is not None and pixels.shape[-2:] != (resolution, resolution):
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bilinear", antialias=True)
    return pixels


def weights_digest(model: nn.Module, resolution: int | None = None) -> str:
    """sha256 over what defines the computation: the model class, the config options that shape it (not
    bookkeeping such as ``_name_or_path`` or ``architectures``, which a save/load round trip adds), the
    input resolution, and every tensor of the state dict (names, dtypes, shapes, bytes; BatchNorm
    statistics included)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        keys = ["model_type", "num_labels", *getattr(type(config), "own_options", tuple)()]
        values = {key: getattr(config, key, None) for key in keys}
        digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    digest.update(f"resolution={resolution}".encode())
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def classifier_extractor_name(model: nn.Module, tag: str = "classifier", resolution: int | None = None) -> str:
    """``skipdiff-<tag>-<first 12 hex digits of weights_digest>``: changes whenever the weights do."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", tag).strip("_") or "classifier"
    return f"skipdiff-{slug}-{weights_digest(model, resolution)[:12]}"


def register_classifier_extractor(model: nn.Module, tag: str = "classifier", resolution: int | None = None) -> str:
    """Register ``model.features`` with torch-fidelity; return the name to pass as ``feature_extractor``.

    Idempotent: the same weights (and config and resolution) give the same name and register once. The
    registered extractor holds a frozen CPU copy, so later changes to ``model`` do not reach it.
    """
    if not isinstance(model, SkipResNetForImageClassification):
        raise ValueError(
            f"register_classifier_extractor takes a SkipResNetForImageClassification, got {type(model).__name__}"
        )
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be positive or None, got {resolution}")
    name = classifier_extractor_name(model, tag, resolution)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        frozen = copy.deepcopy(model).cpu().eval().requires_grad_(False)
        cls = type(
            f"ClassifierFeatureExtractor_{name.rsplit('-', 1)[-1]}",
            (ClassifierFeatureExtractor,),
            {"source_model": frozen, "resolution": resolution},
        )
        register_feature_extractor(name, cls)
    return name


# --------------------------------------------------------------------------------------------------
# Saved classifiers and the torch-fidelity module
# --------------------------------------------------------------------------------------------------


def load_extractor(path: str | os.PathLike) -> SkipResNetForImageClassification:
    """A saved classifier (``config.json`` + ``model.safetensors``) in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} holds no saved classifier (no config.json)")
    return SkipResNetForImageClassification.from_pretrained(path).eval()


def extractor_info(path: str | os.PathLike) -> dict:
    """The ``extractor.json`` written next to a trained extractor ({} when there is none; see
    :func:`skipdiff.eval.domain_extractor.train_domain_extractor`)."""
    info = Path(path) / EXTRACTOR_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def create_extractor(spec: ExtractorSpec | str, cuda: bool | None = None) -> FeatureExtractorBase:
    """The torch-fidelity module for ``spec``, producing its FID feature layer only.

    FID, KID and precision/recall all use that one layer (as ``calculate_metrics`` does when given a
    ``feature_extractor``). ``cuda=None`` uses the GPU when there is one.
    """
    if isinstance(spec, str):
        spec = ExtractorSpec(spec)
    if spec.name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f"feature extractor {spec.name!r} is not registered with torch-fidelity; registered: "
            f"{sorted(FEATURE_EXTRACTORS_REGISTRY)} (register classifiers with register_classifier_extractor)"
        )
    cuda = torch.cuda.is_available() if cuda is None else cuda
    layer = FEATURE_EXTRACTORS_REGISTRY[spec.name].get_default_feature_layer_for_metric("fid")
    return create_feature_extractor(spec.name, [layer], cuda=cuda, verbose=False, **spec.kwargs)
