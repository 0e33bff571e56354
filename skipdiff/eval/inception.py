"""Inception-v3 weights for FID, found offline or refused early.

torch-fidelity's ``inception-v3-compat`` (the standard FID network) downloads its weights from a URL on
first use. :func:`inception_kwargs` finds them without the network (a given file, or torch hub's
cache, where torch-fidelity's own download lands) and otherwise checks that the URL's host can be
reached, raising :class:`InceptionUnavailableError` *before* any sampling when it cannot.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from ..data_options import IMAGE_DATASETS

INCEPTION = "inception-v3-compat"


class InceptionUnavailableError(RuntimeError):
    """Inception-v3 weights are neither given nor cached, and cannot be downloaded."""


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
            f"or use a built-in image set's own extractor: --feature_extractor {' / '.join(IMAGE_DATASETS)}."
        )
    return {"feature_extractor": INCEPTION, "feature_extractor_weights_path": None}
