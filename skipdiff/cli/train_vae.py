"""Train the VAE stage: an AutoencoderKL on a dataset, saved with save_pretrained.

    accelerate launch --config_file accelerate_config.yaml train_scripts/train_vae.py --output_dir runs/vae-digits-16

Every option and its default: --help. Also: `skipdiff-train-vae`, `python -m skipdiff.cli.train_vae`.
"""

from __future__ import annotations

import sys

from ..config import parse_args, to_json
from . import run_with_clean_errors


def main(argv: list[str] | None = None) -> int:
    """Parse and check the options (no torch yet), then train; returns the exit code."""
    from ..training.vae_options import VaeOptions

    try:
        options = parse_args(VaeOptions, argv, description=__doc__)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options.dry_run:
        print(to_json(options))
        return 0

    def train():
        from ..training.vae import train_vae

        metrics = train_vae(options)
        print({k: round(v, 6) for k, v in metrics.items()})

    return run_with_clean_errors(train)


if __name__ == "__main__":
    sys.exit(main())
