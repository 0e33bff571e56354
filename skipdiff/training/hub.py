"""Pushing runs to the Hugging Face Hub, with a generated model card.

The repository is created and write access checked *before* training, before the output folder is made
(offline mode, no token, no network or no permission fails at once and leaves nothing behind). Uploads
use ``HfApi.upload_folder``; tests replace the client.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, constants

from .. import __version__
from ..config import SkipdiffError, redact
from ..data_options import IMAGE_DATASETS
from .options import HubOptions


class HubAccessError(SkipdiffError):
    """The Hub repository cannot be created or written (no token, no network, no permission)."""


IGNORE_PATTERNS = [".*", "**/.*", "checkpoint-*/**", "logs/**", "*.tmp/**"]


def prepare_repo(repo_id: str, token: str | None, private: bool, api: HfApi | None = None) -> str:
    """Create (or reuse) the model repo and check that this token may write to it; returns its id."""
    api = api or HfApi(token=token)
    try:
        user = api.whoami(token=token)
    except Exception as err:  # noqa: BLE001  the client raises several types (HTTP, offline, auth)
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if hub_offline():  # the client then fails however good the token: say why
            raise HubAccessError(
                f"cannot push to the Hub repo {repo_id!r}: no valid token or no network: HF_HUB_OFFLINE is set, so "
                f"nothing may reach the Hub ({why}). Unset it (HF_HUB_OFFLINE=0) to push (and log in with "
                "`hf auth login` if you have not), or drop --push_to_hub and upload the run later"
            ) from err
        raise HubAccessError(
            f"cannot push to the Hub repo {repo_id!r}: no valid token or no network ({why}). Log in with "
            "`hf auth login` or pass --hub_token."
        ) from err
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    except Exception as err:  # noqa: BLE001
        name = user.get("name", "?") if isinstance(user, dict) else "?"
        raise HubAccessError(f"cannot create or write the Hub repo {repo_id!r} as {name!r}: {err}") from err
    return getattr(url, "repo_id", repo_id)


def hub_offline() -> bool:
    """Whether huggingface_hub's offline mode is on: ``HF_HUB_OFFLINE`` now, or when huggingface_hub was
    imported (it reads the variable once)."""
    now = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return now or bool(constants.HF_HUB_OFFLINE)


def prepare_repo_if_asked(hub: HubOptions, is_main_process: bool) -> str | None:
    """With ``--push_to_hub``, on the main process: :func:`prepare_repo` (fails before any training)."""
    if not (hub.push_to_hub and is_main_process):
        return None
    return prepare_repo(hub.hub_model_id, hub.hub_token, hub.hub_private_repo)


def repository_url() -> str | None:
    """skipdiff's repository as its installed package metadata names it (``[project.urls]``), else None."""
    try:
        entries = importlib.metadata.metadata("skipdiff").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in entries:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("repository", "source", "source code", "homepage") and url.strip():
            return url.strip()
    return None


def _install_note() -> str:
    url = repository_url()
    where = f"its repository, <{url}>" if url else "a clone of the skipdiff repository"
    return f"skipdiff is not on PyPI: install it from {where} (`pip install -e .` in the clone's root)."


def _data_line(options: dict, dataset: str | None) -> tuple[str, list[str] | None]:
    """The card's sentence about the training data, and the Hub dataset ids for its metadata (only
    real Hub ids: a built-in set or a local folder has none)."""
    if options.get("dataset_name"):
        name = options["dataset_name"]
        return f"the Hub dataset [`{name}`](https://huggingface.co/datasets/{name})", [name]
    if options.get("train_data_dir"):
        return "a local image folder", None
    name = dataset or options.get("dataset", "?")
    return f"`{name}` ({IMAGE_DATASETS.get(name, 'a built-in dataset')}, built into skipdiff)", None


def _weights_note(repo_id: str, options: dict, plain: bool) -> str:
    """Which weights each subfolder holds, how to get the raw ones, and what plain diffusers does with the UNet."""
    if options.get("use_ema", True):
        note = (
            "`unet/` holds the EMA weights, which sampling uses; `unet_raw/` holds the raw weights: "
            f'`SkipDiffPipeline.from_pretrained("{repo_id}", use_ema=False)`, or without skipdiff '
            f'`pipe.unet = type(pipe.unet).from_pretrained("{repo_id}", subfolder="unet_raw")`.'
        )
    else:
        note = "`unet/` holds the weights (the run kept no EMA)."
    if plain:
        return note + (
            " Every skip is kept, so diffusers' `UNet2DModel.from_pretrained(..., "
            'subfolder="unet")` loads the same model.'
        )
    return note + (
        " diffusers' `UNet2DModel` cannot represent the skip gates and refuses `unet/` (its error "
        "names `SkipUNet2DModel`): use `pipe.unet` or skipdiff's `SkipUNet2DModel`."
    )


def _loading_section(repo_id: str, options: dict, plain: bool) -> str:
    """The card's ``## Loading``: diffusers with the repository's code, skipdiff, the weights, installing."""
    labels = ", class_labels=labels" if options.get("class_conditional") else ""
    label_note = "\nlabels = [0] * 16  # one class index per image: the UNet is class-conditional" if labels else ""
    return f"""## Loading

With diffusers alone: the pipeline's code ships in this repository (`skipdiff_pipeline.py` and
`unet/skipdiff_unet.py`, generated from the sources of skipdiff {__version__}), and
`trust_remote_code=True` runs it, so read it first.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True){label_note}
images = pipe(batch_size=16{labels}, num_inference_steps=50, sampler="ddim",
              generator=torch.Generator().manual_seed(0)).images
```

With skipdiff installed, which uses its own code and runs nothing from the repository:

```python
from skipdiff import SkipDiffPipeline

pipe = SkipDiffPipeline.from_pretrained("{repo_id}")
```

{_weights_note(repo_id, options, plain)}

{_install_note()}
"""


def model_card(
    repo_id: str,
    options: dict,
    skip_table: list[dict],
    metrics: dict | None = None,
    sample_grid: str | None = None,
    dataset: str | None = None,
) -> ModelCard:
    """A model card: YAML metadata, how to load the model, the skip configuration as a table,
    metrics and training settings.

    ``library_name`` is ``skipdiff``, the library that defines the pipeline's classes: with
    ``diffusers`` the Hub would show its generic snippet, ``DiffusionPipeline.from_pretrained(id)``
    without ``trust_remote_code`` and called with a prompt, which fails on this pipeline. The
    ``diffusers`` and ``custom_code`` tags say that diffusers loads it with the repository's code."""
    data_line, hub_datasets = _data_line(options, dataset)
    conditional = bool(options.get("class_conditional"))
    plain = all(s["gate"] == "keep" for s in skip_table) and not options.get("disable_shortcuts")
    data = ModelCardData(
        library_name="skipdiff",
        license="apache-2.0",
        tags=[
            "skipdiff",
            "diffusers",
            "custom_code",
            "skip-connections",
            "class-conditional-image-generation" if conditional else "unconditional-image-generation",
        ],
        datasets=hub_datasets,
        # The Hub has no task for class-conditional generation.
        pipeline_tag=None if conditional else "unconditional-image-generation",
    )
    rows = "\n".join(
        f"| {s['index']} | up_blocks.{s['up_block']}.resnets.{s['layer']} | {s['source']} | {s['resolution']} "
        f"| {s['skip_channels']} | `{s['gate']}` |"
        for s in skip_table
    )
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(redact(options).items()))
    metric_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted((metrics or {}).items())) or "| (none yet) | |"
    grid = f"\n## Samples\n\n![samples]({sample_grid})\n" if sample_grid else ""
    space = (
        "pixel space"
        if str(options.get("vae", "")).lower() == "none"
        else "the latent space of its `AutoencoderKL` (`vae/`)"
    )
    content = f"""---
{data.to_yaml()}
---

# {repo_id}

{"A class-conditional" if conditional else "An unconditional"} diffusion model trained with skipdiff, a research
toolkit on diffusers, to study what its long (encoder-decoder) skip connections do. It is a
`SkipDiffPipeline`: a `SkipUNet2DModel` (diffusers' `UNet2DModel` whose long skips pass through the
gates listed below) denoising in {space}. Trained on {data_line}.

{_loading_section(repo_id, options, plain)}
## Skip configuration

| skip | receiving resnet | source | resolution | channels | gate |
|---|---|---|---|---|---|
{rows}

## Metrics

| metric | value |
|---|---|
{metric_rows}
{grid}
## Training settings

| option | value |
|---|---|
{settings}
"""
    return ModelCard(content)


def upload(
    folder: str | Path,
    repo_id: str,
    token: str | None,
    message: str,
    path_in_repo: str | None = None,
    api: HfApi | None = None,
) -> None:
    """Upload a folder (hidden files, checkpoints and logs left out) to the repo."""
    api = api or HfApi(token=token)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        commit_message=message,
        token=token,
        ignore_patterns=IGNORE_PATTERNS,
    )
