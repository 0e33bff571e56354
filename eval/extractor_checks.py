"""Does a built-in set's FID extractor see what a generator gets wrong? And does a VAE cap the FID?

For a built-in image set (``photo_patches`` by default): the domain extractor's held-out accuracy, then
the FID against the train split of the test split (the floor) and of the test split under known
corruptions (noise, blur, swapped or dropped colour, shuffled pixels, flat patches). With ``--vae``
(an AutoencoderKL folder, e.g. the one ``--vae auto`` trained), also the FID of its reconstructions of
the test split: the best a latent model on that VAE can score. Prints JSON.

    python eval/extractor_checks.py --dataset photo_patches --vae runs/vae-photo_patches-16-<split key>
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
from skipdiff.eval.extractors import extractor_info

LUMA = (0.299, 0.587, 0.114)


def corruptions(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Test images x (N, C, H, W) in [-1, 1] and known corruptions of them, same shape."""
    generator = torch.Generator().manual_seed(seed)
    grey = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True) if x.shape[1] == 3 else x  # (N, 1, H, W)
    order = torch.randperm(x.shape[-1] * x.shape[-2], generator=generator)
    return {
        "test (floor)": x,
        "noise 0.1": x + 0.1 * torch.randn(x.shape, generator=generator),
        "noise 0.3": x + 0.3 * torch.randn(x.shape, generator=generator),
        "blur sigma 1": gaussian_blur(x, 5, 1.0),
        "channels reversed": x.flip(1),  # RGB -> BGR (a no-op on grey images)
        "grey": grey.expand_as(x),
        "pixels shuffled": x.flatten(2)[:, :, order].view_as(x),
        "flat (patch mean)": x.mean((2, 3), keepdim=True).expand_as(x),
    }


@torch.no_grad()
def vae_reconstructions(vae_dir: str, x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in [-1, 1] through an AutoencoderKL (posterior mean), same shape."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    return vae.decode(vae.encode(x).latent_dist.mean).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="photo_patches", choices=sorted(IMAGE_DATASETS))
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--vae", help="an AutoencoderKL folder whose reconstructions to score")
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    data = DataOptions(dataset=args.dataset, resolution=args.resolution)
    extractor = create_extractor(resolve_extractor("auto", data=data), cuda=False)
    real = real_splits({"dataset": args.dataset, "resolution": args.resolution})
    reference = features_of(real["train"].images, extractor, cuda=False)
    x = real["test"].images.float() / 127.5 - 1  # (N, C, r, r)
    cases = corruptions(x)
    if args.vae:
        cases["vae reconstruction"] = vae_reconstructions(args.vae, x)
    fids = {name: features_to_fid(features_of(images_to_uint8(v), extractor, cuda=False), reference)
            for name, v in cases.items()}  # fmt: skip
    info = extractor_info(cached_domain_extractor(data))
    print(json.dumps({"extractor": info["name"], "test_accuracy": info["test_accuracy"],
                      "fid_vs_train": {k: round(v, 3) for k, v in fids.items()}}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
