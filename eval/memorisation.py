"""Does the default model copy its training images? (skipdiff.eval.memorisation on a trained run.)

Samples ``--num_samples`` images per sampling seed and compares them with the run's train and test splits,
in the FID extractor's feature space and in pixels: nearest-neighbour distances (and their baselines: test
images to train, train images to other train images), the copy rate, FID against train and against test
at the same sample count (the test split's size), and precision/recall against each. Train and test
references differ in size (a nearest neighbour among more images is nearer, and FID's bias moves with N),
so every figure is also computed against a fixed draw of train images as many as the test split
(``equal_n``): the comparison of train against test that the summary leads with. Writes
``results.json``, ``table.md`` and ``nearest.png`` (samples next to their nearest training image).

    python eval/memorisation.py runs/digits-latent --out eval/results/memorisation
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from skipdiff.runfolder import write_json_atomic


def evaluate_seed(target, real: dict, extractor, count: int, seed: int) -> dict:
    """Every figure for one sampling seed's ``count`` samples, against the whole train split and against
    a train draw as large as the test split (``equal_n``)."""
    from skipdiff.eval.fid import features_of, features_to_fid, features_to_prc, images_to_uint8
    from skipdiff.eval.memorisation import equal_size_indices, memorisation_statistics, pixels_as_features
    from skipdiff.sampling import sample_images

    samples = images_to_uint8(sample_images(target, count, seed, steps=50, progress=False).images)
    features = {name: features_of(images.images, extractor) for name, images in real.items()}
    generated, generated_pixels = features_of(samples, extractor), pixels_as_features(samples)
    pixels = {name: pixels_as_features(images.images) for name, images in real.items()}
    size = len(real["test"])  # FID at the same N against both splits
    fid_vs_test = features_to_fid(generated[:size], features["test"])  # the same whichever train reference

    def against(train: slice | torch.Tensor) -> dict:
        """The figures against the train images ``train`` selects."""
        return {
            "features": memorisation_statistics(generated, features["train"][train], features["test"]),
            "pixels": memorisation_statistics(generated_pixels, pixels["train"][train], pixels["test"]),
            "fid_vs_train": features_to_fid(generated[:size], features["train"][train]),
            "fid_vs_test": fid_vs_test,
            "fid_test_vs_train": features_to_fid(features["test"], features["train"][train]),
        }

    equal = equal_size_indices(len(real["train"]), size)  # a train reference of the test split's size
    return {
        "equal_n": {"train_size": size, **against(equal)},
        "seed": seed,
        **against(slice(None)),
        "prc_vs_train": features_to_prc(generated, features["train"]),
        "prc_vs_test": features_to_prc(generated, features["test"]),
        "samples": samples,
    }


def nearest_grid(samples: torch.Tensor, train: torch.Tensor, indices: list[int], path: Path, count: int = 16) -> None:
    """Pairs (sample, its nearest training image) side by side, four pairs a row, labelled, as one PNG."""
    from diffusers.utils import numpy_to_pil

    from skipdiff.grids import image_grid

    pairs = torch.stack([t for i in range(count) for t in (samples[i], train[indices[i]])])  # (2n, C, H, W)
    pil = numpy_to_pil((pairs.permute(0, 2, 3, 1).float() / 255.0).numpy())
    image_grid(
        pil,
        columns=8,
        column_labels=["sample", "nearest train"] * 4,
        legend="nearest neighbour in the FID extractor's features",
    ).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from skipdiff.config import subset
    from skipdiff.data_options import DataOptions
    from skipdiff.eval.extractor_choice import resolve_extractor
    from skipdiff.eval.extractors import create_extractor
    from skipdiff.eval.fid import real_splits
    from skipdiff.targets import load_target

    target = load_target(args.run)
    data = subset(DataOptions, target.training_options)
    real = real_splits(target.training_options)
    extractor = create_extractor(resolve_extractor("auto", data=data))
    per_seed = [evaluate_seed(target, real, extractor, args.num_samples, seed) for seed in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = per_seed[0]
    nearest_grid(first["samples"], real["train"].images, first["features"]["nearest_train_index"], out / "nearest.png")
    for row in per_seed:
        del row["samples"]
        for block in (row, row["equal_n"]):
            for space in ("features", "pixels"):
                del block[space]["nearest_train_index"]
    result = {
        "run": args.run,
        "num_samples": args.num_samples,
        "seeds": args.seeds,
        "extractor": extractor.get_name(),
        "per_seed": per_seed,
        "summary": summarise(per_seed),
        "command": f"python eval/memorisation.py {args.run} --out {args.out}",
    }
    write_json_atomic(out / "results.json", result)
    (out / "table.md").write_text(markdown(result["summary"]))
    print(markdown(result["summary"]))


def _ms(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


FID_KEYS = ("fid_vs_train", "fid_vs_test", "fid_test_vs_train")


def _summarise_block(blocks: list[dict], prefix: str, neighbour_keys: tuple[str, ...], copy_rates: bool) -> dict:
    """Mean ± std over sampling seeds of one reference's figures (``blocks``: one per seed)."""
    out = {}
    for space in ("features", "pixels"):
        for key in neighbour_keys:
            out[f"{prefix}{space}.{key}.median"] = _ms([b[space][key]["median"] for b in blocks])
        out[f"{prefix}{space}.ratio"] = _ms(
            [b[space]["ratio_median_generated_to_train_over_test_to_train"] for b in blocks]
        )
        if copy_rates:
            for key in blocks[0][space]["copy_rate"]:
                out[f"{prefix}{space}.copy_rate.{key}"] = _ms([b[space]["copy_rate"][key] for b in blocks])
    for key in FID_KEYS:
        out[f"{prefix}{key}"] = _ms([b[key] for b in blocks])
    return out


def summarise(per_seed: list[dict]) -> dict:
    """Mean ± std over sampling seeds of the headline figures: first against references of equal size
    (``equal_n.*``), then against the whole train split."""
    neighbours = ("generated_to_train", "generated_to_test", "test_to_train")
    out = _summarise_block([r["equal_n"] for r in per_seed], "equal_n.", neighbours, copy_rates=False)
    out.update(_summarise_block(per_seed, "", (*neighbours, "train_to_other_train"), copy_rates=True))
    for split in ("train", "test"):
        for key in ("precision", "recall"):
            out[f"{key}_vs_{split}"] = _ms([r[f"prc_vs_{split}"][key] for r in per_seed])
    return out


def markdown(summary: dict) -> str:
    lines = ["| figure | mean ± std over sampling seeds |", "|---|---|"]
    for key, entry in summary.items():
        std = "" if entry["std"] is None else f" ± {entry['std']:.2g}"
        lines.append(f"| {key} | {entry['mean']:.4g}{std} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
