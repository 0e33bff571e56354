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

from ..config import parse_args, to_json
from . import run_with_clean_errors


def main(argv: list[str] | None = None) -> int:
    """Parse and check the options, then train; returns the exit code."""
    from ..training.classifier.options import ClassifierOptions

    try:
        options = parse_args(ClassifierOptions, argv, description=__doc__)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options.dry_run:
        print(to_json(options))
        return 0

    def train():
        from ..training.classifier import train_classifier

        metrics = train_classifier(options)
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items() if k != "markov"})

    return run_with_clean_errors(train)


if __name__ == "__main__":
    sys.exit(main())
