"""Train the VAE stage: an AutoencoderKL on a dataset, saved with save_pretrained.

    accelerate launch --config_file accelerate_config.yaml train_scripts/train_vae.py --output_dir runs/vae-digits-16
"""

from skipdiff.config import parse_args, to_json
from skipdiff.training.vae import VaeOptions, train_vae


def main(argv=None):
    options = parse_args(VaeOptions, argv, description=__doc__)
    if options.dry_run:
        print(to_json(options))
        return
    metrics = train_vae(options)
    print({k: round(v, 6) for k, v in metrics.items()})


if __name__ == "__main__":
    main()
