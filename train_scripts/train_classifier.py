"""Train a classifier baseline (SkipResNet, residual MLP or transformers' ResNet) with switchable skips.

The command line lives in skipdiff/cli/train_classifier.py (usage examples: --help); the library does the work.
"""

import sys

from skipdiff.cli.train_classifier import main

if __name__ == "__main__":
    sys.exit(main())
