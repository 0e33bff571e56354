"""How a cell's training starts: in this process through the library, or under ``accelerate launch``
as ``-m <the kind's command-line module>``.

Both start the training by module name, never by a script's file path, so a sweep runs the same from
an installed package as from a source checkout, from any working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from ..config import SkipdiffError, redact
from ..runfolder import read_json
from .kinds import CellKind

LAUNCHERS = ("inprocess", "accelerate")


class LaunchInterrupted(SkipdiffError):
    """The training subprocess was stopped by Ctrl-C, SIGTERM or SIGUSR1 (it checkpoints first): the sweep
    stops too. ``signum`` is the signal, read from the exit status."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


# The signals that stop a training after a checkpoint (skipdiff.training.startup.STOP_SIGNALS, without
# importing torch here).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def interrupting_signal(returncode: int) -> int | None:
    """The stop signal a training subprocess's exit status reports (128 + signal after its checkpoint, or
    -signal when the signal ended it), else None."""
    for signum in STOP_SIGNALS:
        if returncode in (128 + signum, -signum):
            return signum
    return None


@contextlib.contextmanager
def forwarding_stop_signals(process: subprocess.Popen):
    """While the sweep waits for a training subprocess, SIGTERM and SIGUSR1 sent to the sweep alone reach the
    training too (it checkpoints, then exits, and the sweep stops with it), rather than killing the sweep
    and leaving an orphan. SIGINT is left to the terminal, which sends it to both; the sweep ignores it
    meanwhile, so that it waits for the training's checkpoint instead of killing it."""
    previous = {}

    def forward(signum, frame):
        if process.poll() is None:
            process.send_signal(signum)

    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else forward)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@dataclasses.dataclass(frozen=True)
class Launcher:
    """``inprocess`` (the default) or ``accelerate`` with extra ``accelerate launch`` arguments."""

    how: str = "inprocess"
    accelerate_args: tuple[str, ...] = ()

    def __post_init__(self):
        if self.how not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {self.how!r}")
        if self.accelerate_args and self.how != "accelerate":
            raise ValueError(f"--accelerate_args {shlex.join(self.accelerate_args)!r} need --launcher accelerate")


def options_to_argv(cls: type, options: dict) -> list[str]:
    """The command line that gives ``options`` (only values that differ from the defaults)."""
    defaults = dataclasses.asdict(cls())
    argv = []
    for name, value in options.items():
        if value == defaults[name]:
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        elif value is None:
            raise ValueError(
                f"option {name!r} = None cannot be given on a command line (its default is "
                f"{defaults[name]!r}); set another option instead (e.g. max_train_steps)"
            )
        else:
            argv.append(f"--{name}={value}")
    return argv


def accelerate_command(kind: CellKind, options: dict, accelerate_args: tuple[str, ...] = ()) -> list[str]:
    """``python -m accelerate.commands.launch [args] -m <kind.cli_module> <options>``, with this
    interpreter (so the same environment trains, whatever ``PATH`` holds)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *accelerate_args,
        "-m",
        kind.cli_module,
        *options_to_argv(kind.options_class(), options),
    ]


@contextlib.contextmanager
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (mixed precision, gradient state); in-process runs with
    different settings one after the other need them forgotten before and after."""
    # heavy: accelerate (~1 s) only for in-process training
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def train_cell(kind: CellKind, options: dict, launcher: Launcher) -> dict:
    """Train one cell with ``options`` (its kind's options, as a dict); returns the run's metrics."""
    if launcher.how == "inprocess":
        with fresh_accelerate_state():
            return kind.train(options)
    command = accelerate_command(kind, options, launcher.accelerate_args)
    print("$ " + shlex.join(redact(command)), flush=True)
    process = subprocess.Popen(command)
    with forwarding_stop_signals(process):
        returncode = process.wait()
    signum = interrupting_signal(returncode)
    if signum is not None:
        raise LaunchInterrupted(
            f"training of {Path(options[kind.folder_option]).name} was interrupted "
            f"({signal.Signals(signum).name}); relaunch the sweep to resume it from its checkpoint",
            signum,
        )
    if returncode != 0:
        raise RuntimeError(f"training exited with status {returncode}: {shlex.join(redact(command))}")
    metrics = Path(options[kind.folder_option]) / kind.metrics_file
    return read_json(metrics, "training metrics") if metrics.is_file() else {}
