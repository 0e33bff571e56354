"""Pushing runs to the Hugging Face Hub, with a generated model card.

The repository is created and write access checked *before* training (no token, no network or no
permission fails at once). Uploads use ``HfApi.upload_folder``; tests replace the client.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..config import SkipdiffError


class HubAccessError(SkipdiffError):
    """The Hub repository cannot be created or written (no token, no network, no permission)."""


IGNORE_PATTERNS = [".*", "**/.*", "checkpoint-*/**", "logs/**", "*.tmp/**"]


def prepare_repo(repo_id: str, token: str | None, private: bool, api: HfApi | None = None) -> str:
    """Create (or reuse) the model repo and check that this token may write to it; returns its id."""
    api = api or HfApi(token=token)
    try:
        user = api.whoami(token=token)
    except Exception as err:  # noqa: BLE001  the client raises several types (HTTP, offline, auth)
        raise HubAccessError(
            f"cannot push to the Hub repo {repo_id!r}: no valid token or no network ({type(err).__name__}: {err}). "
            "Run `huggingface-cli login` or pass --hub_token."
        ) from err
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    except Exception as err:  # noqa: BLE001
        name = user.get("name", "?") if isinstance(user, dict) else "?"
        raise HubAccessError(f"cannot create or write the Hub repo {repo_id!r} as {name!r}: {err}") from err
    return getattr(url, "repo_id", repo_id)


def prepare_repo_if_asked(options, is_main_process: bool) -> str | None:
    """With ``--push_to_hub``, on the main process: :func:`prepare_repo` (fails before any training)."""
    if not (options.push_to_hub and is_main_process):
        return None
    return prepare_repo(options.hub_model_id, options.hub_token, options.hub_private_repo)


def model_card(
    repo_id: str,
    options: dict,
    skip_table: list[dict],
    metrics: dict | None = None,
    sample_grid: str | None = None,
    dataset: str | None = None,
) -> ModelCard:
    """A model card: YAML metadata, the skip configuration as a table, training settings, metrics."""
    data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["skipdiff", "diffusers", "unconditional-image-generation", "skip-connections"],
        datasets=[dataset] if dataset else None,
        pipeline_tag="unconditional-image-generation",
    )
    rows = "\n".join(
        f"| {s['index']} | up_blocks.{s['up_block']}.resnets.{s['layer']} | {s['source']} | {s['resolution']} "
        f"| {s['skip_channels']} | `{s['gate']}` |"
        for s in skip_table
    )
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(options.items()) if k != "hub_token")
    metric_rows = (
        "\n".join(f"| {k} | {v} |" for k, v in sorted((metrics or {}).items())) or "| (none yet) | |"
    )
    grid = f"\n## Samples\n\n![samples]({sample_grid})\n" if sample_grid else ""
    content = f"""---
{data.to_yaml()}
---

# {repo_id}

A diffusion model trained with [skipdiff](https://github.com/) to study what its long (encoder-decoder)
skip connections do. Load it with `SkipDiffPipeline.from_pretrained("{repo_id}")` after `pip install skipdiff`.

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


def upload(folder: str | Path, repo_id: str, token: str | None, message: str, path_in_repo: str | None = None,
           api: HfApi | None = None) -> None:  # fmt: skip
    """Upload a folder (hidden files, checkpoints and logs left out) to the repo."""
    api = api or HfApi(token=token)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo, commit_message=message,
        token=token, ignore_patterns=IGNORE_PATTERNS,
    )  # fmt: skip
