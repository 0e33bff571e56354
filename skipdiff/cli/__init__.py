"""Command lines: each parses and checks its options before importing torch, then runs the library.

    skipdiff-train-unet ...       python -m skipdiff.cli.train_unet ...       (train_scripts/train_unet.py)
    skipdiff-train-vae ...        python -m skipdiff.cli.train_vae ...        (train_scripts/train_vae.py)
    skipdiff-train-classifier ... python -m skipdiff.cli.train_classifier ... (train_scripts/train_classifier.py)

Known failures print one ``error: ...`` line (exit 1); Ctrl-C, SIGTERM or SIGUSR1 during training stops
after a step with a checkpoint and the command that resumes, and exits with 128 + the signal's number
(130, 143, 138; :func:`skipdiff.training.startup.interrupted_exit_status`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from ..config import REDACTED, SkipdiffError, parse_args, redact, to_json
from ..runfolder import io_error_line

Options = TypeVar("Options")


def run_with_clean_errors(function: Callable[[], object]) -> int:
    """Run ``function()``; known failures print ``error: <message>`` (one line) and return 1; a run a signal
    stopped after its checkpoint returns 128 + the signal's number (Ctrl-C 130, SIGTERM 143, SIGUSR1 138)."""
    try:
        function()
    except KeyboardInterrupt:
        print(
            "stopped at once (second Ctrl-C); resume from the last checkpoint with --resume_from_checkpoint latest",
            file=sys.stderr,
        )
        return 130
    except SkipdiffError as err:
        interrupted = type(err).__name__ == "TrainingInterrupted"  # (its module imports torch)
        print(f"{'stopped' if interrupted else 'error'}: {err}", file=sys.stderr)
        return getattr(err, "exit_status", 130) if interrupted else 1
    except (ValueError, OSError) as err:
        print(f"error: {io_error_line(err) if isinstance(err, OSError) else err}", file=sys.stderr)
        return 1
    return 0


def run_command(
    options_class: type[Options],
    train: Callable[[Options], object],
    argv: list[str] | None,
    description: str | None,
    dry_run_check: Callable[[Options], None] | None = None,
) -> int:
    """The shape of every training command line: parse and check ``options_class`` from ``argv`` (no torch
    yet; a bad value exits 2 naming it), for ``--dry_run`` run ``dry_run_check`` (the checks a real run
    makes before any work; a ``ValueError`` exits 2) and print the resolved options (a Hub token
    redacted), else ``train(options)`` with clean errors. Returns the exit code."""
    try:
        options = parse_args(options_class, argv, description=description)
        if options.dry_run and dry_run_check is not None:
            dry_run_check(options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options.dry_run:
        print(to_json(redact(options, REDACTED)))
        return 0
    return run_with_clean_errors(lambda: train(options))
