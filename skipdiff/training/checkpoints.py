"""Checkpoints: ``checkpoint-{step}`` folders written atomically, rotated, and found again to resume.

A checkpoint is Accelerate's ``save_state`` (model weights in safetensors, optimizer, LR scheduler,
EMA, RNG states: everything an exact resume needs) plus ``skipdiff_state.json`` (step, epoch and the
UNet config it belongs to). It is written to ``.checkpoint-{step}.tmp`` and renamed only when
complete, so a run killed mid-write leaves at most a temporary folder that resuming ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "skipdiff_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, request: str | None) -> Path | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (None if the run has none) or a folder.

    Raises ``ValueError`` when an explicit folder does not exist or is not a complete checkpoint.
    """
    if request is None:
        return None
    if request == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(request)
    if not path.is_dir():
        raise ValueError(
            f"--resume_from_checkpoint {request!r} does not exist (use 'latest' or a checkpoint-N folder)"
        )
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {request!r} is not a complete skipdiff checkpoint (no {STATE_FILE})"
        )
    return path


def read_state(checkpoint: Path) -> dict:
    """The checkpoint's ``skipdiff_state.json`` (step, epoch, unet_config)."""
    return json.loads((checkpoint / STATE_FILE).read_text())


def check_compatible(checkpoint: Path, unet_config: dict, key: str = "unet_config") -> None:
    """Refuse a checkpoint whose model config (``key`` in its state file) differs from the model
    being trained, or whose weights file is truncated or corrupt, with a message naming what differs."""
    # Compared as saved (JSON: tuples become lists), without diffusers' bookkeeping keys: its
    # `_use_default_values` is a list made from a set, in another order in every process.
    saved = {k: v for k, v in read_state(checkpoint)[key].items() if not k.startswith("_")}
    requested = json.loads(json.dumps(unet_config, default=list))
    unet_config = {k: v for k, v in requested.items() if not k.startswith("_")}
    differing = sorted(k for k in set(saved) | set(unet_config) if saved.get(k) != unet_config.get(k))
    if differing:
        details = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs requested {unet_config.get(k)!r}" for k in differing[:4]
        )
        raise ValueError(f"checkpoint {str(checkpoint)!r} was made for another model ({details})")
    for weights in sorted(checkpoint.glob("model*.safetensors")):
        try:
            load_file(weights)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint weights {str(weights)!r} are truncated or corrupt: {err}") from err


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, state: dict, total_limit: int | None
) -> Path:
    """Write ``checkpoint-{step}`` atomically (all ranks call this), then rotate old ones (main rank).

    On failure (disk full, permissions) the temporary folder is removed and earlier checkpoints are
    left untouched; the error names the folder.
    """
    root = Path(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f".checkpoint-{step}.tmp"
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2, default=list))
            _fsync_tree(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stale = root / f".checkpoint-{step}.old"
            if final.exists():  # moved aside atomically: `final` is whole or absent, never partial
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            f"could not write checkpoint {str(final)!r}: {err}; earlier checkpoints are intact"
        ) from err
    if accelerator.is_main_process:
        rotate_checkpoints(root, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``total_limit``; returns the deleted folders."""
    checkpoints = list_checkpoints(output_dir)
    if total_limit is None or len(checkpoints) <= total_limit:
        return []
    doomed = checkpoints[: len(checkpoints) - total_limit]
    for path in doomed:
        trash = path.with_name(f".{path.name}.deleting")  # not a checkpoint name: never listed or resumed
        os.replace(path, trash)
        shutil.rmtree(trash)
    return doomed


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def check_writable(output_dir: str | os.PathLike) -> None:
    """Fail at once, naming the folder, if the run cannot write its outputs."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output_dir {str(root)!r} is not writable: {err}") from err
