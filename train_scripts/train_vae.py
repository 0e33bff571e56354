"""Train the VAE stage: an AutoencoderKL on a dataset, saved with save_pretrained.

The command line lives in skipdiff/cli/train_vae.py (usage examples: --help); the library does the work.
"""

import sys

from skipdiff.cli.train_vae import main

if __name__ == "__main__":
    sys.exit(main())
