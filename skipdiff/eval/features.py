"""Feature extractors for FID/KID/precision-recall, plugged into torch-fidelity.

Two families, both reached through torch-fidelity's registry of feature extractors:

* A **domain classifier**: any :class:`~skipdiff.classifiers.SkipResNetForImageClassification`, whose
  penultimate features (``model.features``) play the role Inception's pool features play in FID.
  :func:`register_classifier_extractor` registers it under a name that carries a hash of its config
  and weights (``skipdiff-digits16-<hash12>``). torch-fidelity keys its feature cache by input name and
  extractor *name* only, so a retrained extractor under an old name would silently reuse stale
  statistics; with the hash in the name it cannot. :func:`train_digits_extractor` trains the one used
  for the built-in ``digits`` set (deterministic, seconds on a CPU, ~99% test accuracy).
* **Inception-v3** (torch-fidelity's ``inception-v3-compat``, the standard FID network). Its weights come
  from a URL on first use; :func:`inception_kwargs` finds them (a given file, or torch hub's cache) or
  raises :class:`InceptionUnavailableError` *before* any sampling when they cannot be had offline.

:func:`resolve_extractor` turns a CLI choice (``digits``, ``inception-v3-compat``, or a folder holding a
saved classifier) into an :class:`ExtractorSpec`; :func:`create_extractor` builds the torch-fidelity
module from it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch.nn import functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from ..classifiers import SkipResNetConfig, SkipResNetForImageClassification

INCEPTION = "inception-v3-compat"
EXTRACTOR_CHOICES = ("digits", INCEPTION)  # offered to the CLI; a folder with a saved classifier also works
EXTRACTOR_INFO = "extractor.json"  # written next to a trained extractor's config.json + model.safetensors

# ITU-R BT.601 luma, as PIL's convert("L") computes it (the data layer makes grey images that way).
_LUMA = (0.299, 0.587, 0.114)


class InceptionUnavailableError(RuntimeError):
    """Inception-v3 weights are neither given nor cached, and cannot be downloaded."""


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


def classifier_extractor_name(
    model: nn.Module, tag: str = "classifier", resolution: int | None = None
) -> str:
    """``skipdiff-<tag>-<first 12 hex digits of weights_digest>``: changes whenever the weights do."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", tag).strip("_") or "classifier"
    return f"skipdiff-{slug}-{weights_digest(model, resolution)[:12]}"


def register_classifier_extractor(
    model: nn.Module, tag: str = "classifier", resolution: int | None = None
) -> str:
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
# The digits extractor
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SKIPDIFF_CACHE``, else ``$XDG_CACHE_HOME/skipdiff``, else ``~/.cache/skipdiff``."""
    if os.environ.get("SKIPDIFF_CACHE"):
        return Path(os.environ["SKIPDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skipdiff"


def digits_extractor_dir(
    resolution: int = 16, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where :func:`digits_extractor` keeps the extractor for (resolution, seed)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "extractors" / f"digits-{resolution}-seed{seed}"


def train_digits_extractor(
    resolution: int = 16,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    min_accuracy: float = 0.95,
) -> Path:
    """Train a small SkipResNet on the digits train split and save it; return its folder.

    Widths (16, 32, 64), depth 1, 64-d features; AdamW with a one-cycle schedule, no augmentation.
    Deterministic for a given seed and thread count (the global RNG is left untouched). The folder holds
    ``config.json`` + ``model.safetensors`` and ``extractor.json`` (test accuracy, training time, the
    registered name). Raises ``RuntimeError`` if the test accuracy stays below ``min_accuracy``.
    """
    from ..data import image_transform, load_image_splits
    from ..data_options import DataOptions

    out = Path(out_dir) if out_dir is not None else digits_extractor_dir(resolution, seed)
    splits = load_image_splits(DataOptions(dataset="digits", split_seed=split_seed, test_fraction=test_fraction))
    transform = image_transform(resolution, channels=1)

    def tensors(split):  # (N, 1, r, r) in [-1, 1], quantised to uint8 as evaluation will see them
        images = torch.stack([transform(image) for image in split["image"]])
        images = ((images + 1) * 127.5).round().to(torch.uint8)
        return uint8_to_model_input(images, 1), torch.tensor(split["label"])

    x_train, y_train = tensors(splits["train"])
    x_test, y_test = tensors(splits["test"])
    config = SkipResNetConfig(num_labels=10, num_channels=1, widths=[16, 32, 64], depth=1, hidden_size=64)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SkipResNetForImageClassification(config)
        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = len(x_train) // batch_size
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
        )
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                loss = model(x_train[index], labels=y_train[index]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).logits.argmax(dim=1) == y_test).float().mean())
    if accuracy < min_accuracy:
        raise RuntimeError(
            f"the digits extractor reached {accuracy:.3f} test accuracy < min_accuracy={min_accuracy} "
            f"(resolution={resolution}, seed={seed}, epochs={epochs})"
        )
    info = {
        "dataset": "digits",
        "resolution": resolution,
        "seed": seed,
        "split_seed": split_seed,
        "test_fraction": test_fraction,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "train_size": len(x_train),
        "test_size": len(x_test),
        "test_accuracy": accuracy,
        "train_seconds": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "name": classifier_extractor_name(model, f"digits{resolution}", resolution),
    }
    # Write next to the destination, then swap in: a reader never sees a half-written folder.
    staging = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    (staging / EXTRACTOR_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    return out


def load_extractor(path: str | os.PathLike) -> SkipResNetForImageClassification:
    """A saved classifier (``config.json`` + ``model.safetensors``) in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} holds no saved classifier (no config.json)")
    return SkipResNetForImageClassification.from_pretrained(path).eval()


def extractor_info(path: str | os.PathLike) -> dict:
    """The ``extractor.json`` written by :func:`train_digits_extractor` ({} when there is none)."""
    info = Path(path) / EXTRACTOR_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def digits_extractor(resolution: int = 16, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached digits extractor's folder for (resolution, seed), trained on first use."""
    path = digits_extractor_dir(resolution, seed, cache_dir)
    if (path / "model.safetensors").is_file() and (path / EXTRACTOR_INFO).is_file():
        return path
    return train_digits_extractor(resolution, seed, path)


# --------------------------------------------------------------------------------------------------
# Inception-v3
# --------------------------------------------------------------------------------------------------


def inception_cache_path() -> Path:
    """Where torch hub (and so torch-fidelity) keeps the downloaded Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def network_reachable(url: str = URL_INCEPTION_V3, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds.

    False without trying when ``HF_HUB_OFFLINE`` is set: offline was asked for.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def inception_kwargs(weights_path: str | os.PathLike | None = None, *, timeout: float = 3.0) -> dict:
    """torch-fidelity kwargs for Inception-v3: ``feature_extractor`` and ``feature_extractor_weights_path``.

    A given ``weights_path`` must exist. Without one, torch hub's cached download is used when present;
    otherwise the weights will be downloaded on first use, which needs the network: if the URL's host
    cannot be reached (or ``HF_HUB_OFFLINE`` is set), raise :class:`InceptionUnavailableError` now,
    before any samples are drawn.
    """
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise ValueError(f"--inception_weights {str(weights_path)!r} is not a file")
        return {"feature_extractor": INCEPTION, "feature_extractor_weights_path": str(weights_path)}
    cached = inception_cache_path()
    if cached.is_file():
        return {"feature_extractor": INCEPTION, "feature_extractor_weights_path": str(cached)}
    if not network_reachable(URL_INCEPTION_V3, timeout):
        raise InceptionUnavailableError(
            f"Inception-v3 weights are not cached at {str(cached)!r} and {URL_INCEPTION_V3} cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set). Pass --inception_weights PATH (the .pth file from that URL) "
            "or use --feature_extractor digits."
        )
    return {"feature_extractor": INCEPTION, "feature_extractor_weights_path": None}


# --------------------------------------------------------------------------------------------------
# From a choice to a torch-fidelity module
# --------------------------------------------------------------------------------------------------


def resolve_extractor(
    choice: str,
    *,
    resolution: int = 16,
    inception_weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ExtractorSpec:
    """A CLI choice -> :class:`ExtractorSpec`, registering classifier extractors on the way.

    * ``"digits"``: the digits classifier for ``resolution`` (trained and cached on first use; meant for
      grey digit images, colour inputs are converted to grey);
    * ``"inception-v3-compat"`` (or ``"inception"``): see :func:`inception_kwargs`;
    * a folder holding a saved SkipResNet classifier (its ``extractor.json`` resolution, if any, is used).
    """
    if choice == "digits":
        model = load_extractor(digits_extractor(resolution, cache_dir=cache_dir))
        return ExtractorSpec(register_classifier_extractor(model, f"digits{resolution}", resolution))
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
