"""Train a skip-controllable UNet as a (latent) diffusion model with Accelerate.

    accelerate launch --config_file accelerate_config.yaml train_scripts/train_unet.py            # the default job
    accelerate launch train_scripts/train_unet.py --skips scalelong:kappa=0.8 --output_dir runs/scalelong
    accelerate launch train_scripts/train_unet.py --vae none --model digits                       # pixel space
    accelerate launch train_scripts/train_unet.py --dry_run                                       # resolved options

Every option and its default: ``--help`` (defined in skipdiff/training/options.py). The loop itself,
in the order accelerator -> data -> model -> scheduler -> optimizer -> prepare -> train, is
skipdiff/training/unet_trainer.py.
"""

import sys

from skipdiff.training import unet_trainer


def main(argv: list[str] | None = None) -> dict:
    return unet_trainer.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(unet_trainer.run_cli(description=__doc__))
