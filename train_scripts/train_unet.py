"""Train a skip-controllable UNet as a (latent) diffusion model with Accelerate.

The command line lives in skipdiff/cli/train_unet.py (usage examples: --help); the library does the work.
"""

import sys

from skipdiff.cli.train_unet import main

if __name__ == "__main__":
    sys.exit(main())
