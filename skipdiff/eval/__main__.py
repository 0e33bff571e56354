"""``python -m skipdiff.eval``: score a skipdiff run or a diffusers UNet pipeline (folder or Hub id).

    python -m skipdiff.eval --checkpoint runs/digits-latent --fid --denoise_loss
    python -m skipdiff.eval --checkpoint runs/digits-latent --fid --kid --prc --num_samples 1000 --seeds 0 1 2
    python -m skipdiff.eval --checkpoint runs/a --grad_stability --skip_importance --importance_factors 0 0.5
    python -m skipdiff.eval --checkpoint google/ddpm-cifar10-32 --dataset_name cifar10 --image_column img --fid
    python -m skipdiff.eval --checkpoint stable-diffusion-v1-5/stable-diffusion-v1-5 --torch_dtype float16 \\
        --dataset_name <captioned set> --caption_column text --skip_importance --denoise_images 256
    python -m skipdiff.eval --checkpoint <pipeline> --skips freeu --prompts prompts.txt --grid --clip_score
    python -m skipdiff.eval --compare runs/a runs/b --out runs/compare      # side by side (each evaluated first)

A model with stochastic skips (``markov``, ``bernoulli``) is scored as it samples by default (each gate
at its expected value); ``--map`` (on by default) adds its MAP configuration: which skips it closes,
the FLOPs that removing them saves, and the denoising loss and FID under ``map``.

Writes ``eval.json`` (every number, the settings, what was loaded and a digest of the weights scored),
``eval.md`` and PNG plots to ``--out`` (default ``<checkpoint>/eval``, ``<checkpoint>/eval-<skips>`` with
``--skips``). The library behind it: ``skipdiff.eval`` (``evaluate``, ``evaluate_target``, ``compare``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import SkipdiffError, parse_args
from ..runfolder import io_error_line
from .options import EvalOptions
from .results import compare, summary_markdown


def main(argv: list[str] | None = None) -> None:
    """Parse, check and run; failures raise (``ValueError`` for bad input). :func:`cli` prints them."""
    options = parse_args(EvalOptions, argv, description=__doc__)
    options.check_sources()
    # heavy: torch only once the options are parsed and checked
    import torch

    from .evaluation import default_out, evaluate

    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    out = Path(options.out or ("runs/compare" if options.compare else default_out(options)))
    try:
        if options.compare:
            print(compare(options.compare, options.out))
            return
        result = evaluate(options)
    except OSError as err:  # a full disk or a read-only --out: one line naming the file (or the folder)
        raise OSError(io_error_line(err, out)) from err
    print(summary_markdown({Path(options.checkpoint).name: result}))
    print(f"wrote {out}/eval.json")


def cli(argv: list[str] | None = None) -> int:
    """``main`` with known failures printed as one ``error: ...`` line (exit status 2)."""
    try:
        main(argv)
    except (ValueError, OSError, SkipdiffError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _known(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _known(err: RuntimeError) -> bool:
    """Runtime errors evaluation expects and explains (no Inception weights offline)."""
    # heavy: torch; an error in the options is answered before it
    from .inception import InceptionUnavailableError

    return isinstance(err, (SkipdiffError, InceptionUnavailableError))


if __name__ == "__main__":
    sys.exit(cli())
