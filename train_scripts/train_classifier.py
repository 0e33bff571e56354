"""Train a classifier baseline (SkipResNet, residual MLP or transformers' ResNet) with switchable skips.

    accelerate launch train_scripts/train_classifier.py --dataset digits --depth 8 \\
        --no-skip_connections --no-batch_norm --output_dir runs/classifier-digits-plain-8
    accelerate launch train_scripts/train_classifier.py --dataset wine --model mlp --depth 4
    accelerate launch train_scripts/train_classifier.py --dataset digits --gating markov \\
        --markov "warmup_steps=50,min_count=16"

Every flag and its default: ``--help``; ``--dry_run`` prints the resolved options and exits.
"""

from skipdiff.config import parse_args, to_json
from skipdiff.training.classifier import ClassifierOptions, train_classifier


def main(argv=None):
    options = parse_args(ClassifierOptions, argv, description=__doc__.split("\n\n")[0])
    if options.dry_run:
        print(to_json(options))
        return
    metrics = train_classifier(options)
    print({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items() if k != "markov"})


if __name__ == "__main__":
    main()
