"""Checkpoints: ``checkpoint-{step}`` folders written atomically, rotated, and found again to resume.

A checkpoint is Accelerate's ``save_state`` (model weights in safetensors, optimizer, LR scheduler,
EMA, RNG states: everything an exact resume needs) plus ``skipdiff_state.json`` (step, epoch and the
UNet config it belongs to). It is written to ``.checkpoint-{step}.tmp`` and renamed only when
complete, so a run killed mid-write leaves at most a temporary folder that resuming ignores.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..runfolder import follow_umask, read_json
from .options import resume_differences

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "skipdiff_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, request: str | None) -> Path | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (None if the run has none) or a folder.

    Raises ``ValueError`` when an explicit folder does not exist, or when the chosen checkpoint has no
    state file (it was not written by skipdiff, or was damaged by hand).
    """
    if request is None:
        return None
    if request == "latest":
        checkpoints = list_checkpoints(output_dir)
        path = checkpoints[-1] if checkpoints else None
        if path is not None and not (path / STATE_FILE).is_file():
            raise ValueError(
                f"the latest checkpoint {str(path)!r} has no {STATE_FILE}: it is incomplete or not "
                "skipdiff's; move it away to resume from the one before it"
            )
        return path
    path = Path(request)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {request!r} does not exist (use 'latest' or a checkpoint-N folder)")
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {request!r} is not a complete skipdiff checkpoint (no {STATE_FILE})"
        )
    return path


def read_state(checkpoint: Path) -> dict:
    """The checkpoint's ``skipdiff_state.json`` (step, epoch, unet_config, training_options)."""
    return read_json(checkpoint / STATE_FILE, "checkpoint state")


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


def verify_state_files(checkpoint: Path, num_processes: int, num_custom: int) -> None:
    """Every file an exact resume reads must be there and load: the optimizer, the LR scheduler, one RNG
    state per process and ``num_custom`` registered objects (the EMA). A missing, truncated or corrupt
    one is a ``ValueError`` naming it, before any state is loaded; so is one whose pickle would run code
    (:func:`load_state_file`: nothing in it runs)."""
    names = [
        "optimizer.bin",
        "scheduler.bin",
        *(f"random_states_{rank}.pkl" for rank in range(num_processes)),
        *(f"custom_checkpoint_{i}.pkl" for i in range(num_custom)),
    ]
    for name in names:
        path = checkpoint / name
        if not path.is_file():
            raise ValueError(f"checkpoint {str(checkpoint)!r} lacks {name}: it cannot be resumed exactly")
        load_state_file(path)


def _safe_globals() -> list:
    """What a state file may name besides tensors and plain containers: exactly what Accelerate's own
    ``load`` allows (numpy arrays, dtypes and ``_codecs.encode`` for the RNG states), so that a file that
    passes here is one Accelerate loads too (it silently skips RNG states it cannot load)."""
    try:
        # accelerate (~1 s) only when a state file loads; older versions lack the list (the fallback)
        from accelerate.utils.other import TORCH_SAFE_GLOBALS
    except ImportError:  # an Accelerate without the list: the same types, named here
        return [np._core.multiarray._reconstruct, np.ndarray, codecs.encode, np.dtype, np.dtypes.UInt32DType]
    return list(TORCH_SAFE_GLOBALS)


# torch's weights-only unpickler names what it refused: "Unsupported global: GLOBAL posix.system ..." or
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
_REFUSED_GLOBAL = re.compile(r"unsupported (?:global[: ]+)?(?:GLOBAL )?([\w.]+)", re.IGNORECASE)


def load_state_file(path: Path):
    """One of a checkpoint's pickled state files (``optimizer.bin``, ``random_states_0.pkl``, ...), loaded
    without running code: ``torch.load(weights_only=True)`` with only :func:`_safe_globals` allowed.

    A checkpoint folder may come from someone else; a pickle that names any other function or class
    (``os.system``, a module of its own) is refused, naming the file and what it asked for; nothing of
    it runs. A truncated or corrupt file is refused as such."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused or "weights_only" in str(err).lower() or "weights only" in str(err).lower():
            what = refused.group(1) if refused else "an object that is not plain state"
            raise ValueError(
                f"checkpoint file {str(path)!r} would run code to load ({what}), which no state file "
                "skipdiff or Accelerate writes needs: refused, nothing in it was run; use checkpoints "
                "only from people you trust, or resume from another checkpoint"
            ) from None
        raise ValueError(f"checkpoint file {str(path)!r} is truncated or corrupt (UnpicklingError: {err})") from err
    except Exception as err:  # noqa: BLE001  torch and zipfile raise many types for damaged files
        raise ValueError(
            f"checkpoint file {str(path)!r} is truncated or corrupt ({type(err).__name__}: {err})"
        ) from err


def check_resumable(checkpoint: Path, unet_config: dict, options, num_processes: int, num_custom: int) -> None:
    """Everything a strict resume checks, before any state is loaded: the model config, the options that
    change what is trained (refused when different unless named in ``--allow_changed``), the weights and
    every state file."""
    check_compatible(checkpoint, unet_config)
    saved = read_state(checkpoint).get("training_options")
    if saved is not None:  # checkpoints written before options were saved in them check the model only
        now = dataclasses.asdict(options)
        differing = resume_differences(saved, now, list(options.allow_changed))
        if differing:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in differing)
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} was trained with other options ({details}); resume with the same "
                f"options, or allow the change with --allow_changed {' '.join(differing)}"
            )
    verify_state_files(checkpoint, num_processes, num_custom)


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
            follow_umask(tmp)  # safetensors writes its files 0600
            _fsync_tree(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stale = root / f".checkpoint-{step}.old"
            if final.exists():  # moved aside atomically: `final` is whole or absent, never partial
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException as err:  # disk full, permissions, Ctrl-C: no temporary folder is left behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError | SafetensorError):  # safetensors reports a full disk as its own error type
            raise OSError(
                f"could not write checkpoint {str(final)!r}: {err}; earlier checkpoints are intact; free "
                "space or make the folder writable, then resume with --resume_from_checkpoint latest"
            ) from err
        raise
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
