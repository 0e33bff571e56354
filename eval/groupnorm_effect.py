"""How much of a constant skip scale survives the receiving resnet's GroupNorm? Measured, per skip.

Every decoder resnet starts with ``norm1 = GroupNorm(G, C_main + C_skip)`` on the concatenation
``[backbone, skip]``. A group whose channels all come from the skip is normalised by its own statistics,
so multiplying the skip by s leaves that group's output unchanged: the scale is cancelled on the conv1
path, and reaches the output only through the resnet's 1x1 shortcut (when it has one) and through groups
that straddle backbone and skip channels. This script measures it on a trained model, for each skip k and
factor s, on held-out latents noised at several timesteps:

* ``effective_scale``: |norm1(x with the skip scaled by s)[skip channels]| / |norm1(x)[skip channels]|:
  1 = fully cancelled, s = passed through unchanged (as without normalisation);
* ``groups_inside_skip`` / ``groups_straddling``: the group layout that explains it;
* ``output_change``: the relative change of the resnet's output, |R(s) - R(1)| / |R(1)|, which includes the
  shortcut path.

    python eval/groupnorm_effect.py runs/digits-latent --factors 0.5 0.25 --out eval/results/groupnorm
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from skipdiff.runfolder import write_json_atomic


@torch.no_grad()
def measure(unet, router, latents: torch.Tensor, timesteps: torch.Tensor, factors: list[float]) -> list[dict]:
    """One dict per skip: its group layout and, per factor, the effective scale after norm1 and the
    relative change of the resnet's output."""
    rows = []
    for info in router.skips:
        resnet = unet.up_blocks[info.up_block].resnets[info.layer]
        groups = resnet.norm1.num_groups
        size = resnet.norm1.num_channels // groups
        inside = sum(1 for g in range(groups) if g * size >= info.main_channels)
        straddling = sum(1 for g in range(groups) if g * size < info.main_channels < (g + 1) * size)
        captured: dict = {}

        def capture(module, args, kwargs, captured=captured):
            captured["input"], captured["temb"] = args[0], args[1] if len(args) > 1 else kwargs.get("temb")

        handle = resnet.register_forward_pre_hook(capture, with_kwargs=True)
        unet(latents, timesteps)
        handle.remove()
        hidden, temb = captured["input"], captured["temb"]  # (B, C_main + C_skip, H, W): as the gates left it
        base_norm = resnet.norm1(hidden)[:, info.main_channels :]
        base_out = resnet(hidden, temb)
        per_factor = {}
        for factor in factors:
            scaled = hidden.clone()
            scaled[:, info.main_channels :] *= factor
            norm = resnet.norm1(scaled)[:, info.main_channels :]
            out = resnet(scaled, temb)
            per_factor[str(factor)] = {
                "effective_scale": float(norm.norm() / base_norm.norm().clamp_min(1e-12)),
                "output_change": float((out - base_out).norm() / base_out.norm().clamp_min(1e-12)),
            }
        rows.append(
            {
                "skip": info.index,
                "resolution": info.resolution,
                "main_channels": info.main_channels,
                "skip_channels": info.skip_channels,
                "groups": groups,
                "groups_inside_skip": inside,
                "groups_straddling": straddling,
                "has_shortcut": resnet.conv_shortcut is not None,
                "factors": per_factor,
            }
        )
    return rows


def held_out_latents(run: Path, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` test images of the run, encoded and noised at timesteps spread over [0, T)."""
    from skipdiff.encoders import batch_latents
    from skipdiff.eval.run import held_out_batches
    from skipdiff.targets import load_target

    target = load_target(str(run))
    batches, _ = held_out_batches(target.training_options, batch_size=count, limit=count)
    latents = batch_latents(target.encoder, batches[0])[:count]
    generator = torch.Generator().manual_seed(seed)
    steps = target.noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, steps - 1, len(latents)).round().long()
    noise = torch.randn(latents.shape, generator=generator)
    return target, target.noise_scheduler.add_noise(latents, noise, timesteps), timesteps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained skipdiff run folder")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", default=None, help="folder for results.json and table.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, latents, timesteps = held_out_latents(Path(args.run), args.images)
    rows = measure(target.unet, target.unet.skip_router, latents, timesteps, args.factors)
    lines = [
        "| skip | res | backbone ch | skip ch | groups inside skip / straddling / all | shortcut | "
        + " | ".join(f"effective scale at s={f} | output change at s={f}" for f in args.factors)
        + " |",
        "|---|---|---|---|---|---|" + "---|---|" * len(args.factors),
    ]
    for r in rows:
        cells = " | ".join(
            f"{r['factors'][str(f)]['effective_scale']:.3f} | {r['factors'][str(f)]['output_change']:.3f}"
            for f in args.factors
        )
        lines.append(
            f"| {r['skip']} | {r['resolution']} | {r['main_channels']} | {r['skip_channels']} | "
            f"{r['groups_inside_skip']} / {r['groups_straddling']} / {r['groups']} | {r['has_shortcut']} | {cells} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            out / "results.json",
            {
                "run": str(args.run),
                "images": args.images,
                "factors": args.factors,
                "skips": rows,
                "command": "python eval/groupnorm_effect.py "
                f"{args.run} --factors {' '.join(map(str, args.factors))} --out {args.out}",
            },
        )
        (out / "table.md").write_text(table)


if __name__ == "__main__":
    main()
