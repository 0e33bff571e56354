"""Train a skip-controllable UNet as a (latent) diffusion model with Accelerate.

    accelerate launch --config_file accelerate_config.yaml train_scripts/train_unet.py            # the default job
    accelerate launch train_scripts/train_unet.py --skips scalelong:kappa=0.8 --output_dir runs/scalelong
    accelerate launch train_scripts/train_unet.py --vae none --model digits --output_dir runs/pixel  # pixel space
    accelerate launch train_scripts/train_unet.py --pretrained_model_name_or_path google/ddpm-cifar10-32 \
        --dataset_name cifar10 --resolution 32 --vae none --skips scalelong --output_dir runs/ddpm-ft
    accelerate launch train_scripts/train_unet.py --dry_run                                       # resolved options

Every option and its default: --help (defined in skipdiff/training/options.py). The loop itself, in the
order output folder -> accelerator -> data -> model -> scheduler -> optimizer -> prepare -> train, is
skipdiff/training/unet_trainer.py. Also: `skipdiff-train-unet`, `python -m skipdiff.cli.train_unet`.
"""

from __future__ import annotations

import sys

from ..training.options import TrainOptions
from . import run_command


def main(argv: list[str] | None = None) -> int:
    """Parse and check the options (no torch yet), then train; returns the exit code."""

    def train(options: TrainOptions) -> None:
        # heavy: torch only once the options are parsed and checked
        from ..training.unet_trainer import train_unet

        train_unet(options)

    def check(options: TrainOptions) -> None:  # what train_unet checks before its VAE stage: a typo fails here too
        # heavy: torch, only for --dry_run's model and geometry checks
        from ..training.model_source import check_model_options
        from ..training.runtime import check_geometry

        check_model_options(options)
        check_geometry(options)

    return run_command(TrainOptions, train, argv, __doc__, dry_run_check=check)


if __name__ == "__main__":
    sys.exit(main())
