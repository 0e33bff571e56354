"""Train the VAE stage: an AutoencoderKL on a dataset, saved with save_pretrained.

    accelerate launch --config_file accelerate_config.yaml train_scripts/train_vae.py --output_dir runs/vae-digits-16

Every option and its default: --help. Also: `skipdiff-train-vae`, `python -m skipdiff.cli.train_vae`.
"""

from __future__ import annotations

import sys

from ..training.vae_options import VaeOptions
from . import run_command


def main(argv: list[str] | None = None) -> int:
    """Parse and check the options (no torch yet), then train; returns the exit code."""

    def train(options: VaeOptions) -> None:
        # heavy: torch only once the options are parsed and checked
        from ..training.vae import train_vae

        metrics = train_vae(options)
        print({k: round(v, 6) for k, v in metrics.items()})

    return run_command(VaeOptions, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
