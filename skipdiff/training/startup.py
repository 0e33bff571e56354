"""Before and around a training run: the output folder's policy, the checkpoint to resume, Ctrl-C, errors.

* A folder that holds another run is never written into by accident (:func:`prepare_output_dir`): the
  run refuses, naming the folder and the three ways forward; ``--overwrite_output_dir`` empties it first
  (no stale checkpoint, log or evaluation survives), deleting only what skipdiff writes: a folder that
  holds anything else (``.git``, a user's notes, a source tree) is refused, naming it, and nothing is
  deleted (:func:`check_overwritable`); ``--resume_from_checkpoint`` continues it.
* While it trains, a run holds its folder's lock (:class:`skipdiff.runfolder.RunLock`).
* Ctrl-C (SIGINT), SIGTERM (what SLURM preemption, ``timeout``, Kubernetes and most schedulers send) and
  SIGUSR1 (SLURM's ``--signal=USR1@<seconds>`` warning) stop after the current step with a checkpoint and
  print the command that resumes (:class:`StopRequest`); a second Ctrl-C stops at once, a repeated
  SIGTERM or SIGUSR1 (a launcher forwarding the scheduler's signal) changes nothing. The command line then
  exits with ``128 + the signal's number`` (130, 143, 138: what a shell reports for a process that signal
  stopped), after the checkpoint (:func:`interrupted_exit_status`).
* Known failures reach the command line as one ``error: ...`` line (:func:`run_with_clean_errors`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import torch

from ..config import SkipdiffError
from ..runfolder import LOCK_FILE, OPTIONS_FILE, STATS_FILE, RunLock, RunLockedError
from . import checkpoints
from .options import RunOptions


class TrainingStopped(SkipdiffError):
    """Too many non-finite losses or gradients in a row: the run stops, its checkpoints intact."""


class TrainingInterrupted(SkipdiffError):
    """Ctrl-C, SIGTERM or SIGUSR1: the run stopped after a step, with a checkpoint to resume from.

    ``signum`` is the signal that asked; :attr:`exit_status` what the command line exits with."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        return interrupted_exit_status(self.signum)


# The signals that ask a run to checkpoint and stop (SIGUSR1 does not exist on Windows).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def interrupted_exit_status(signum: int) -> int:
    """The exit status of a run a signal stopped after its checkpoint: 128 + the signal's number, the shell's
    convention for a process that signal ended (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1), which schedulers and
    ``accelerate launch`` report the same way; a sweep reads any of them as an interruption."""
    return 128 + int(signum)


def is_main_process() -> bool:
    """Whether this is the launcher's rank 0 (read from the environment, before any Accelerator exists)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


RUN_MARKERS = (OPTIONS_FILE, STATS_FILE, "model_index.json", "train_metrics.json", "unet")


def describe_run(folder: Path) -> list[str]:
    """What of a training run ``folder`` holds (empty when it holds none)."""
    found = [name for name in RUN_MARKERS if (folder / name).exists()]
    found += (
        [f"{len(checkpoints.list_checkpoints(folder))} checkpoint(s)"] if checkpoints.list_checkpoints(folder) else []
    )
    found += ["eval/"] if (folder / "eval").is_dir() else []
    return found


def prepare_output_dir(run: RunOptions) -> Path:
    """The run's folder, checked writable; refused when it holds another run, emptied for
    ``--overwrite_output_dir``. Called on every process (they all reach the same verdict)."""
    folder = Path(run.output_dir)
    holds = describe_run(folder) if folder.is_dir() else []
    if holds and not run.resume_from_checkpoint:
        if not run.overwrite_output_dir:
            raise ValueError(
                f"output_dir {str(folder)!r} holds another run ({', '.join(holds)}): resume it with "
                "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose another --output_dir"
            )
        check_overwritable(folder)  # on every process: all refuse, or none does
        if is_main_process():
            _empty(folder)
    checkpoints.check_writable(folder)
    return folder


# Everything skipdiff writes at the top of a run folder (training, export, evaluation, sweeps, trackers):
# --overwrite_output_dir deletes these, and only these.
RUN_ENTRIES = frozenset(
    {
        OPTIONS_FILE,
        STATS_FILE,
        LOCK_FILE,
        ".write-test",
        "model_index.json",
        "skipdiff_pipeline.py",
        "README.md",
        "train_metrics.json",
        "cell.json",
        "unet",
        "unet_raw",
        "unet_ema",
        "vae",
        "scheduler",
        "skip_gates",
        "samples",
        "logs",
        "wandb",
        "eval",
        "variants",
        ".export-unfinished",
    }
)
RUN_ENTRY_PATTERN = re.compile(r"^(checkpoint-\d+|\.checkpoint-\d+\.(tmp|old|deleting)|eval-.+|\..+\.tmp\d+)$")
# ... and inside its evaluation folders (eval/, eval-<skips>/).
EVAL_ENTRY_PATTERN = re.compile(r"^(eval\.json|eval\.md|[^/]+\.png|\.eval\.lock|\..+\.tmp\d+)$")


def foreign_entries(folder: Path) -> list[str]:
    """What of ``folder`` skipdiff never writes into a run folder (relative paths, sorted)."""
    foreign = []
    for path in sorted(folder.iterdir()):
        if path.name not in RUN_ENTRIES and not RUN_ENTRY_PATTERN.match(path.name):
            foreign.append(path.name + ("/" if path.is_dir() else ""))
        elif path.name == "eval" or path.name.startswith("eval-"):
            if path.is_dir() and not path.is_symlink():
                foreign += [
                    f"{path.name}/{p.name}" for p in sorted(path.iterdir()) if not EVAL_ENTRY_PATTERN.match(p.name)
                ]
            else:
                foreign.append(path.name)
    return foreign


def check_overwritable(folder: Path) -> None:
    """Refuse ``--overwrite_output_dir`` on a folder that holds anything skipdiff did not write (``.git``, a
    source tree, a user's files), naming the folder and the first entries; nothing is deleted."""
    foreign = foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ValueError(
            f"--overwrite_output_dir refused: {str(folder)!r} holds files that skipdiff never writes in a "
            f"run folder ({shown}), so it is not only a skipdiff run; nothing was deleted. Choose another "
            "--output_dir, or move those files away first"
        )


def _empty(folder: Path) -> None:
    """Delete everything in ``folder``, a skipdiff run (:func:`check_overwritable`; refused while another live
    process holds the run's lock)."""
    lock = RunLock(folder)
    owner = lock.owner()
    if owner is not None and not RunLock._is_stale(owner):
        raise RunLockedError(
            f"{str(folder)!r} is in use by another training process (pid {owner.get('pid')}); "
            "it cannot be overwritten now"
        )
    for path in folder.iterdir():
        if path.name == LOCK_FILE:
            path.unlink(missing_ok=True)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def resume_checkpoint(run: RunOptions) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` asks for (None for a fresh start); the folder's name and
    state file are checked here, the options and state files once the model exists
    (:func:`skipdiff.training.checkpoints.check_resumable`)."""
    return checkpoints.resolve_checkpoint(run.output_dir, run.resume_from_checkpoint)


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
    """Turns the first SIGINT, SIGTERM or SIGUSR1 into a request to stop after the current step, with a
    checkpoint. A second SIGINT interrupts at once (the user insists); a repeated SIGTERM or SIGUSR1 is only
    noted: a scheduler signals every process of a job and ``accelerate launch`` forwards the signal to its
    workers again, and neither must cut the checkpoint short.

    In one process the loop asks after every step; with several processes only at logging steps, where
    the ranks agree through one all-reduce, so that all of them stop at the same step and write one
    checkpoint together. The previous handlers are restored on exit (the library may run inside a
    program with its own, e.g. a search worker's)."""

    def __init__(self):
        self.flag = False
        self.signum: int | None = None  # the signal that asked first
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                break
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.flag:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            print(f"\n{name}: already stopping after this step", file=sys.stderr, flush=True)
            return
        self.flag, self.signum = True, signum
        again = "Ctrl-C again to stop at once" if signum == signal.SIGINT else "writing a checkpoint first"
        print(
            f"\n{'interrupt' if signum == signal.SIGINT else name}: stopping after this step ({again})",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, accelerator, logging_step: bool) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        if not logging_step:
            return False
        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def exit(self, step: int, saved: list[Path]) -> None:
        """Raise :class:`TrainingInterrupted` naming the step, the checkpoint and the command that resumes.
        On ranks whose own flag is not set (another rank was signalled), the signal is the first one's
        SIGINT default."""
        where = saved[-1] if saved else "none"
        signum = self.signum or signal.SIGINT
        how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        raise TrainingInterrupted(
            f"interrupted{how} after step {step}; checkpoint {where}. Resume with:\n  {resume_command()}", signum
        )
