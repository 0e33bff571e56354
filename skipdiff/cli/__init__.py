"""Command lines: each parses and checks its options before importing torch, then runs the library.

    skipdiff-train-unet ...       python -m skipdiff.cli.train_unet ...       (train_scripts/train_unet.py)
    skipdiff-train-vae ...        python -m skipdiff.cli.train_vae ...        (train_scripts/train_vae.py)
    skipdiff-train-classifier ... python -m skipdiff.cli.train_classifier ... (train_scripts/train_classifier.py)

Known failures print one ``error: ...`` line (exit 1); Ctrl-C during training stops after a step with a
checkpoint and the command that resumes (exit 130).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..config import SkipdiffError


def run_with_clean_errors(function: Callable[[], object]) -> int:
    """Run ``function()``; known failures print ``error: <message>`` (one line) and return 1, Ctrl-C 130."""
    try:
        function()
    except KeyboardInterrupt:
        print("stopped at once (second Ctrl-C); resume from the last checkpoint with --resume_from_checkpoint latest",
              file=sys.stderr)  # fmt: skip
        return 130
    except SkipdiffError as err:
        interrupted = type(err).__name__ == "TrainingInterrupted"
        print(f"{'stopped' if interrupted else 'error'}: {err}", file=sys.stderr)
        return 130 if interrupted else 1
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
