"""Does a built-in set's FID extractor see what a generator gets wrong? And does a VAE cap the FID?

For a built-in image set (``photo_patches`` by default): the domain extractor's held-out accuracy, then
the FID against the train split of the test split (the floor) and of the test split under known
corruptions (noise, blur, swapped or dropped colour, shuffled pixels, flat patches). With ``--vae``
(an AutoencoderKL folder, e.g. the one ``--vae auto`` trained), also the FID of its reconstructions of
the test split: the best a latent model on that VAE can score. Prints JSON.

    python eval/extractor_checks.py --dataset photo_patches --vae runs/vae-photo_patches-16-<split key>
    python eval/extractor_checks.py --dataset fields      # every field set (skipdiff/field_patches.py)

With several datasets (``fields`` names them all) the JSON maps each dataset to its checks. Grey sets
skip the colour corruptions (reversed channels and grey are no-ops on one channel). ``usable_for_fid``
applies the rule docs/datasets.md states: every corruption scores at least :data:`USABLE_RATIO` times
the floor and at least :data:`USABLE_MARGIN` above it, so FID tells real from degraded images.
"""

from __future__ import annotations

import argparse
import json

import torch
from torchvision.transforms.functional import gaussian_blur

from skipdiff.data_options import IMAGE_DATASETS, DataOptions
from skipdiff.eval import (
    create_extractor,
    features_of,
    features_to_fid,
    images_to_uint8,
    real_splits,
    resolve_extractor,
)
from skipdiff.eval.domain_extractor import cached_domain_extractor
from skipdiff.eval.extractor_choice import auto_extractor
from skipdiff.eval.extractors import extractor_info
from skipdiff.field_patches import FIELD_DATASETS, FIELD_GROUPS, field_group

LUMA = (0.299, 0.587, 0.114)
COLOUR_ONLY = ("channels reversed", "grey")  # no-ops on grey images: left out for them
USABLE_RATIO = 3.0  # a corruption's FID must reach this multiple of the floor ...
USABLE_MARGIN = 1.0  # ... and exceed the floor by this much, for the extractor to count as usable


def corruptions(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Test images x (N, C, H, W) in [-1, 1] and known corruptions of them, same shape."""
    generator = torch.Generator().manual_seed(seed)
    grey = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True) if x.shape[1] == 3 else x  # (N, 1, H, W)
    order = torch.randperm(x.shape[-1] * x.shape[-2], generator=generator)
    cases = {
        "test (floor)": x,
        "noise 0.1": x + 0.1 * torch.randn(x.shape, generator=generator),
        "noise 0.3": x + 0.3 * torch.randn(x.shape, generator=generator),
        "blur sigma 1": gaussian_blur(x, 5, 1.0),
        "channels reversed": x.flip(1),  # RGB -> BGR (a no-op on grey images)
        "grey": grey.expand_as(x),
        "pixels shuffled": x.flatten(2)[:, :, order].view_as(x),
        "flat (patch mean)": x.mean((2, 3), keepdim=True).expand_as(x),
    }
    return cases if x.shape[1] == 3 else {name: v for name, v in cases.items() if name not in COLOUR_ONLY}


def usable_for_fid(fids: dict[str, float]) -> bool:
    """True when every corruption's FID is at least ``USABLE_RATIO`` x the floor and ``USABLE_MARGIN``
    above it (``fids`` as :func:`check_dataset` computes them; a VAE's reconstructions do not count)."""
    floor = fids["test (floor)"]
    scores = [v for name, v in fids.items() if name not in ("test (floor)", "vae reconstruction")]
    return all(v >= USABLE_RATIO * floor and v >= floor + USABLE_MARGIN for v in scores)


@torch.no_grad()
def vae_reconstructions(vae_dir: str, x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in [-1, 1] through an AutoencoderKL (posterior mean), same shape."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    return vae.decode(vae.encode(x).latent_dist.mean).sample


def check_dataset(dataset: str, resolution: int, vae: str | None = None, which: str = "auto") -> dict:
    """The extractor's held-out accuracy and the FID against the train split of the test split, of its
    corruptions and (with ``vae``) of the VAE's reconstructions, for one built-in set. ``which``: the
    extractor FID's ``auto`` picks, the set's ``own``, or its ``group``'s (field sets in a group)."""
    data = DataOptions(dataset=dataset, resolution=resolution)
    choice = extractor_choice(dataset, which)
    extractor = create_extractor(resolve_extractor(choice, data=data), cuda=False)
    real = real_splits({"dataset": dataset, "resolution": resolution})
    reference = features_of(real["train"].images, extractor, cuda=False)
    x = real["test"].images.float() / 127.5 - 1  # (N, C, r, r)
    cases = corruptions(x)
    if vae:
        cases["vae reconstruction"] = vae_reconstructions(vae, x)
    fids = {
        name: features_to_fid(features_of(images_to_uint8(v), extractor, cuda=False), reference)
        for name, v in cases.items()
    }
    folder = cached_domain_extractor(data if choice == dataset else DataOptions(dataset=choice, resolution=resolution))
    info = extractor_info(folder)
    return {
        "extractor": info["name"],
        "extractor_dataset": info["dataset"],
        "test_accuracy": info["test_accuracy"],
        "accuracy_on_this_test_split": member_accuracy(folder, data, info),
        "train_size": len(real["train"].images),
        "test_size": len(x),
        "fid_vs_train": {k: round(v, 3) for k, v in fids.items()},
        "usable_for_fid": usable_for_fid(fids),
    }


def extractor_choice(dataset: str, which: str) -> str:
    """The built-in set whose extractor to check for ``dataset``: ``auto``'s pick, its ``own``, or its
    ``group``'s (``ValueError`` for a set in no group)."""
    if which == "auto":
        return auto_extractor(DataOptions(dataset=dataset))
    if which == "own":
        return dataset
    group = field_group(dataset)
    if which != "group" or group is None:
        raise ValueError(
            f"--extractor {which!r} needs auto, own, or group for a set in {sorted(FIELD_GROUPS)}; "
            f"got dataset {dataset!r}"
        )
    return group


def member_accuracy(folder, data: DataOptions, info: dict) -> float:
    """The extractor's accuracy on ``data``'s test split alone: its own labels, or for a group's extractor
    the member's index in the group (every test patch should be named as this dataset)."""
    from skipdiff.data import dataset_channels, load_image_splits
    from skipdiff.eval.domain_extractor import accuracy, labelled_pixels
    from skipdiff.eval.extractors import load_extractor

    splits = load_image_splits(data)
    x, y = labelled_pixels(splits["test"], data.resolution, dataset_channels(splits))
    if info["dataset"] != data.dataset:
        y = torch.full_like(y, FIELD_GROUPS[info["dataset"]].index(data.dataset))
    return round(accuracy(load_extractor(folder), x, y), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=["photo_patches"],
        choices=[*sorted(IMAGE_DATASETS), "fields"],
        help="one or more built-in sets; fields = every field set",
    )
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--vae", help="an AutoencoderKL folder whose reconstructions to score (one dataset only)")
    parser.add_argument(
        "--extractor",
        default="auto",
        choices=("auto", "own", "group"),
        help="FID's auto choice, the set's own extractor, or its field group's",
    )
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args()
    fields = [name for name in FIELD_DATASETS if name not in FIELD_GROUPS]
    if args.extractor == "group":
        fields = [name for name in fields if field_group(name)]
    names = [n for name in args.dataset for n in (fields if name == "fields" else [name])]
    if args.vae and len(names) > 1:
        parser.error(f"--vae scores one dataset's VAE; got datasets {names}")
    torch.set_num_threads(args.num_threads)
    results = {name: check_dataset(name, args.resolution, args.vae, args.extractor) for name in names}
    print(json.dumps(results[names[0]] if len(names) == 1 else results, indent=2))


if __name__ == "__main__":
    main()
