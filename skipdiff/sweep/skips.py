"""Skip specifications in a diffusion sweep: every cell's ``skips`` and every inference variant checked
against its model's skip geometry before anything runs, and a trained run rebuilt with other skips.

An inference variant is the trained model with another skip spec, the same weights loaded strictly:
it works whenever the trained and the new gates hold no parameters or buffers (keep, zero, scale,
fourier, bernoulli).
"""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import parse_key_values
from ..presets import unet_config
from ..runfolder import write_json_atomic

if TYPE_CHECKING:
    from .spec import Cell


@functools.cache
def _skips_of(model: str) -> tuple:
    """The skip geometry (``SkipInfo`` list) of a UNet preset or config file, to check specs against."""
    # heavy: torch and diffusers only to check skip specs: the sweep command line answers bad arguments before it
    from ..skips.router import discover_skips
    from ..skips.unet import SkipUNet2DModel

    return tuple(discover_skips(SkipUNet2DModel(**unet_config(model, sample_size=32, channels=1))))


def check_skip_specs(cells: list[Cell]) -> None:
    """Every diffusion cell's ``skips`` (and ``markov`` options) must resolve for its model."""
    # heavy: torch (the router) only to check skip specs
    from ..skips.router import SkipRouter

    checked = set()
    for cell in cells:
        key = (cell.options["model"], cell.options["skips"], cell.options["markov"])
        if key in checked:
            continue
        checked.add(key)
        try:
            SkipRouter(list(_skips_of(key[0])), key[1], parse_key_values(key[2], "--markov"))
        except ValueError as err:
            raise ValueError(f"cell {cell.name!r}: {err}") from err


def check_variant_specs(models: set[str], variants: dict[str, str]) -> None:
    """Each variant must be a valid, parameter- and buffer-free skip spec for every model used, so that
    the trained state dict loads into the variant strictly."""
    # heavy: torch (the router) only to check skip specs
    from ..skips.router import SkipRouter

    for model in sorted(models):
        for label, spec in variants.items():
            try:
                router = SkipRouter(list(_skips_of(model)), spec)
            except ValueError as err:
                raise ValueError(f"inference variant {label!r}: {err}") from err
            removing = [g.info.index for g in router.gates if g.removes_skip]
            if removing or router.state_dict():
                raise ValueError(
                    f"inference variant {label!r} ({spec!r}) adds parameters or buffers or removes "
                    f"skips; use keep, zero, scale, fourier or bernoulli gates"
                )


def _variant(unet, spec: str):
    """A trained ``SkipUNet2DModel`` rebuilt with the skip spec ``spec`` and the same weights, in eval mode:
    :meth:`~skipdiff.skips.unet.SkipUNet2DModel.from_unet` with ``strict=True`` (``ValueError`` where the
    weights do not fit), its shortcuts and chain options kept."""
    # heavy: torch and diffusers only to build a variant
    from ..skips.unet import SkipUNet2DModel

    config = unet.config
    return SkipUNet2DModel.from_unet(
        unet, spec, config.get("residual_shortcuts"), config.get("markov"), strict=True
    ).eval()


def with_skips(unet, spec: str):
    """Deprecated: ``SkipUNet2DModel.from_unet(unet, spec, residual_shortcuts, markov, strict=True).eval()``."""
    warnings.warn(
        "skipdiff.sweep.with_skips is deprecated; use SkipUNet2DModel.from_unet(unet, skips=..., strict=True)",
        DeprecationWarning,
        stacklevel=2,
    )
    return _variant(unet, spec)


def make_inference_variant(run: Path, spec: str, folder: Path) -> Path:
    """A run folder at ``folder`` holding ``run``'s trained model with skips ``spec`` (``unet/``: the
    weights to sample from, ``unet_raw/``: the raw ones when the run kept an EMA, whatever layout
    ``run`` has), the same scheduler, VAE and training options, and ``variant.json``."""
    # heavy: torch and diffusers only to build a variant
    from ..export import export_pipeline
    from ..pipeline import SkipDiffPipeline, weights_layout
    from ..skips.unet import SkipUNet2DModel

    pipeline = SkipDiffPipeline.from_pretrained(run)  # the EMA weights when saved
    pipeline.unet = _variant(pipeline.unet, spec)
    layout = weights_layout(run)
    raw = _variant(SkipUNet2DModel.from_pretrained(run, subfolder=layout["raw"]), spec) if layout["ema"] else None
    folder.mkdir(parents=True, exist_ok=True)
    export_pipeline(pipeline, folder, raw_unet=raw)
    shutil.copyfile(run / "training_options.json", folder / "training_options.json")
    write_json_atomic(folder / "variant.json", {"skips": spec, "trained_run": run.name})
    return folder
