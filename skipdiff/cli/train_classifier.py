"""Train a classifier baseline (SkipResNet, residual MLP or transformers' ResNet) with switchable skips.

    accelerate launch train_scripts/train_classifier.py --dataset digits --depth 8 \
        --no-skip_connections --no-batch_norm --output_dir runs/classifier-digits-plain-8
    accelerate launch train_scripts/train_classifier.py --dataset wine --model mlp --depth 4
    accelerate launch train_scripts/train_classifier.py --dataset digits --gating markov \
        --markov "warmup_steps=50,min_count=16"

Every flag and its default: --help; --dry_run prints the resolved options and exits. Also:
`skipdiff-train-classifier`, `python -m skipdiff.cli.train_classifier`.
"""

from __future__ import annotations

import sys

from ..training.classifier.options import ClassifierOptions
from . import run_command


def main(argv: list[str] | None = None) -> int:
    """Parse and check the options (no torch yet), then train; returns the exit code."""

    def train(options: ClassifierOptions) -> None:
        # heavy: torch only once the options are parsed and checked
        from ..training.classifier import train_classifier

        metrics = train_classifier(options)
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items() if k != "markov"})

    return run_command(ClassifierOptions, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
