"""Skip gates as a small, shareable artefact: save, load, stack and unload them like LoRA adapters.

A trained set of gates (learned scalars, per-channel vectors, adapter bottlenecks, a Markov chain) is a
filtered state dict plus what is needed to rebuild it: the resolved skip specification, the chain's
options, the skip geometry it was made for and the base model's identity. It is saved as two files,
the way peft saves a LoRA adapter::

    skip_gates.safetensors          the router's parameters and buffers (kilobytes to a few MB)
    skip_gates_config.json          {"skips", "markov", "geometry", "base_model", "unet_class", ...}

:func:`load_skip_gates` puts them on any compatible UNet (or pipeline): its own long skips must have
the same count and channels, else ``ValueError`` naming both geometries. Loading another artefact on
top *stacks* it: each artefact is its own :class:`~skipdiff.skips.router.SkipRouter`, and the routers' hooks
run in the order they were loaded, so the gates compose. :func:`unload_skip_gates` removes one (by
name) or all, restoring the base model bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file, save_file
from torch import nn

from ..runfolder import follow_umask
from ..training import hub
from .router import SkipRouter, discover_skips

WEIGHTS_NAME = "skip_gates.safetensors"
CONFIG_NAME = "skip_gates_config.json"
FORMAT = "skipdiff-skip-gates"
LOADED_ATTRIBUTE = "_skipdiff_loaded_gates"  # name -> router, on the UNet


def _unet_of(target) -> nn.Module:
    """The UNet of a pipeline (``.unet``) or the UNet itself."""
    unet = getattr(target, "unet", target)
    if not hasattr(unet, "up_blocks"):
        raise ValueError(f"{type(unet).__name__} is no diffusers UNet (no up_blocks): skip gates need long skips")
    return unet


def _geometry(skips) -> list[dict]:
    return [
        {"skip_channels": s.skip_channels, "main_channels": s.main_channels, "resolution": s.resolution} for s in skips
    ]


def gate_router(target) -> SkipRouter:
    """The router whose gates are trained: a SkipUNet2DModel's own, or one put on a UNet by apply_skip_spec
    and kept as its ``skip_router`` attribute (as ``--train_only gates`` does)."""
    router = getattr(_unet_of(target), "skip_router", None)
    if router is None:
        raise ValueError("this UNet has no skip router: train or load gates first")
    return router


def save_skip_gates(
    target, folder: str | os.PathLike, base_model: str | None = None, router: SkipRouter | None = None
) -> Path:
    """Write the router's gates (``router`` or the UNet's own) as an artefact in ``folder``; returns it.

    ``base_model`` names the pretrained model the gates were trained on (a Hub id or folder), for the
    model card and for users; the geometry check at load time does not depend on it."""
    unet = _unet_of(target)
    router = router or gate_router(unet)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in router.state_dict().items()}
    config = {
        "format": FORMAT,
        "version": 1,
        "base_model": base_model,
        "unet_class": type(unet).__name__,
        "skips": router.entries,
        "markov": router.chain.options() if router.chain is not None else {},
        "geometry": _geometry(router.skips),
        "num_parameters": sum(p.numel() for p in router.parameters()),
    }
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    follow_umask(folder)  # safetensors writes its files 0600
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_skip_gates(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of an artefact, with errors naming a missing or foreign file."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{str(folder)!r} holds no skip gates ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{str(config_path)!r} is not a skipdiff skip-gates config (format {config.get('format')!r})")
    return config, load_file(str(weights_path))


ARTEFACT_FOLDER = "skip_gates"  # where a gate-tuning run saves its artefact, inside the run folder


def default_name(folder: str | os.PathLike) -> str:
    """The name gates load under by default: the folder's name, or the run's name for a run's own
    ``<run>/skip_gates`` (so that artefacts of two runs stack without ``name=``)."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == ARTEFACT_FOLDER else path.name


def load_skip_gates(target, folder: str | os.PathLike, name: str | None = None) -> SkipRouter:
    """Put the gates saved in ``folder`` on ``target`` (a pipeline or a UNet); returns their router.

    Raises ``ValueError`` when the UNet's skips differ from those the gates were made for (count or
    channels), naming both. Gates loaded earlier stay and compose with these (stacking); ``name``
    (default :func:`default_name`: the folder's name, the run's for ``<run>/skip_gates``) is what
    :func:`unload_skip_gates` takes."""
    unet = _unet_of(target)
    config, state = read_skip_gates(folder)
    skips = discover_skips(unet)
    have, want = _geometry(skips), config["geometry"]
    if [(g["skip_channels"], g["main_channels"]) for g in have] != [
        (g["skip_channels"], g["main_channels"]) for g in want
    ]:
        raise ValueError(
            f"the skip gates in {str(folder)!r} were made for {len(want)} skips with (skip, backbone) channels "
            f"{[(g['skip_channels'], g['main_channels']) for g in want]} ({config.get('unet_class')}, base "
            f"{config.get('base_model')!r}), but this {type(unet).__name__} has {len(have)} skips with "
            f"{[(g['skip_channels'], g['main_channels']) for g in have]}"
        )
    router = SkipRouter(skips, config["skips"], config.get("markov") or None)
    router.load_state_dict(state, strict=True)
    parameter = next(unet.parameters())
    router.to(device=parameter.device, dtype=parameter.dtype).train(unet.training)
    loaded = getattr(unet, LOADED_ATTRIBUTE, None)
    if loaded is None:
        loaded = {}
        object.__setattr__(unet, LOADED_ATTRIBUTE, loaded)  # a plain dict: not a submodule, not in the state dict
    key = name or default_name(folder)
    if key in loaded:
        raise ValueError(f"skip gates named {key!r} are loaded already; unload them first or pass another name")
    loaded[key] = router.attach(unet)
    return router


def loaded_skip_gates(target) -> dict[str, SkipRouter]:
    """The gates loaded on a UNet (or pipeline), by name, in loading order."""
    return dict(getattr(_unet_of(target), LOADED_ATTRIBUTE, None) or {})


def unload_skip_gates(target, name: str | None = None) -> None:
    """Remove the gates loaded under ``name`` (all of them when None): the UNet computes as before."""
    unet = _unet_of(target)
    loaded = getattr(unet, LOADED_ATTRIBUTE, None) or {}
    names = list(loaded) if name is None else [name]
    for key in names:
        if key not in loaded:
            raise ValueError(f"no skip gates named {key!r} are loaded; loaded: {list(loaded)}")
        loaded.pop(key).detach()


def skip_gates_card(config: dict, repo_id: str):
    """A model card for an artefact: valid Hub metadata naming the base model, the spec and how to load it."""
    data = ModelCardData(
        library_name="skipdiff",
        license="apache-2.0",
        base_model=config.get("base_model"),
        tags=["skipdiff", "skip-connections", "diffusers", "adapter"],
    )
    modes = sorted({entry["mode"] for entry in config["skips"]})
    content = f"""---
{data.to_yaml()}
---

# {repo_id}

Skip gates for `{config.get("base_model")}` ({config.get("unet_class")}), trained with skipdiff: only the gates
on the UNet's {len(config["skips"])} long skips ({", ".join(modes)}; {config.get("num_parameters", 0):,} parameters)
changed, the base model's weights are untouched.

```python
from diffusers import DiffusionPipeline
from skipdiff import load_skip_gates, unload_skip_gates

pipe = DiffusionPipeline.from_pretrained("{config.get("base_model")}")
load_skip_gates(pipe, "<a local copy of {repo_id}>")   # huggingface_hub.snapshot_download("{repo_id}")
images = pipe(...).images
unload_skip_gates(pipe)                                  # the base model again
```

skipdiff is installed from a clone of its repository (`pip install -e .`).
"""
    return ModelCard(content)


def push_skip_gates(
    folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False, api=None
) -> str:
    """Upload an artefact folder with its model card to a Hub model repo (created if needed)."""
    config, _ = read_skip_gates(folder)
    repo = hub.prepare_repo(repo_id, token, private, api=api)
    skip_gates_card(config, repo).save(Path(folder) / "README.md")
    hub.upload(folder, repo, token, "skip gates", api=api)
    return repo
