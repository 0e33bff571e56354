"""Before and around a training run: the output folder's policy, the checkpoint to resume, Ctrl-C, errors.

* A folder that holds another run is never written into by accident (:func:`prepare_output_dir`): the
  run refuses, naming the folder and the three ways forward; ``--overwrite_output_dir`` empties it first
  (no stale checkpoint, log or evaluation survives); ``--resume_from_checkpoint`` continues it.
* While it trains, a run holds its folder's lock (:class:`skipdiff.runfolder.RunLock`).
* Ctrl-C (SIGINT) stops after the current step with a checkpoint and prints the command that resumes
  (:class:`StopRequest`); a second Ctrl-C stops at once.
* Known failures reach the command line as one ``error: ...`` line (:func:`run_with_clean_errors`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

from ..config import SkipdiffError
from ..runfolder import LOCK_FILE, OPTIONS_FILE, STATS_FILE, RunLock, RunLockedError
from . import checkpoints


class TrainingStopped(SkipdiffError):
    """Too many non-finite losses or gradients in a row: the run stops, its checkpoints intact."""


class TrainingInterrupted(SkipdiffError):
    """Ctrl-C: the run stopped after a step, with a checkpoint to resume from."""


def is_main_process() -> bool:
    """Whether this is the launcher's rank 0 (read from the environment, before any Accelerator exists)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


RUN_MARKERS = (OPTIONS_FILE, STATS_FILE, "model_index.json", "train_metrics.json", "unet")


def describe_run(folder: Path) -> list[str]:
    """What of a training run ``folder`` holds (empty when it holds none)."""
    found = [name for name in RUN_MARKERS if (folder / name).exists()]
    found += [f"{len(checkpoints.list_checkpoints(folder))} checkpoint(s)"] if checkpoints.list_checkpoints(folder) else []
    found += ["eval/"] if (folder / "eval").is_dir() else []
    return found


def prepare_output_dir(options) -> Path:
    """The run's folder, checked writable; refused when it holds another run, emptied for
    ``--overwrite_output_dir``. Called on every process (they all reach the same verdict)."""
    folder = Path(options.output_dir)
    holds = describe_run(folder) if folder.is_dir() else []
    if holds and not options.resume_from_checkpoint:
        if not options.overwrite_output_dir:
            raise ValueError(
                f"output_dir {str(folder)!r} holds another run ({', '.join(holds)}): resume it with "
                "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose another --output_dir"
            )
        if is_main_process():
            _empty(folder)
    checkpoints.check_writable(folder)
    return folder


def _empty(folder: Path) -> None:
    """Delete everything in ``folder`` (refused while another live process holds the run's lock)."""
    lock = RunLock(folder)
    owner = lock.owner()
    if owner is not None and not RunLock._is_stale(owner):
        raise RunLockedError(f"{str(folder)!r} is in use by another training process (pid {owner.get('pid')}); "
                             "it cannot be overwritten now")  # fmt: skip
    for path in folder.iterdir():
        if path.name == LOCK_FILE:
            path.unlink(missing_ok=True)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def resume_checkpoint(options) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` asks for (None for a fresh start); the folder's name and
    state file are checked here, the options and state files once the model exists
    (:func:`skipdiff.training.checkpoints.check_resumable`)."""
    return checkpoints.resolve_checkpoint(options.output_dir, options.resume_from_checkpoint)


def resume_command() -> str:
    """The command line that resumes this run: the one that started it, with ``--resume_from_checkpoint latest``."""
    argv = [a for a in sys.argv]
    for flag in ("--resume_from_checkpoint",):
        while flag in argv:
            index = argv.index(flag)
            del argv[index : index + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    return shlex.join([Path(sys.executable).name, *argv, "--resume_from_checkpoint", "latest"])


class StopRequest:
    """Turns the first SIGINT into a request to stop after the current step (a second one interrupts).

    In one process the loop asks after every step; with several processes only at logging steps, where
    the ranks agree through one all-reduce, so that all of them stop at the same step and write one
    checkpoint together."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\ninterrupt: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, accelerator, logging_step: bool) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        if not logging_step:
            return False
        import torch

        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    @staticmethod
    def exit(step: int, saved: list[Path]) -> None:
        where = saved[-1] if saved else "none"
        raise TrainingInterrupted(f"interrupted after step {step}; checkpoint {where}. Resume with:\n  {resume_command()}")
