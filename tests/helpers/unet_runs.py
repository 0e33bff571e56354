"""Tiny ``train_scripts/train_unet.py`` runs for the tests: seconds each on a shared 2-core CPU.

``tiny_args(out)`` is the option list every test starts from: the ``tiny`` UNet preset in pixel
space on 8x8 digits, batch 16, 4 steps, a 4-image validation grid with 2 DDIM steps, a record every
step, no tracker, one thread. ``run_train_unet(argv)`` calls the script's ``main`` in this process
(importing the script once), with Accelerate's process-wide state reset before and after, so that
runs with different settings can follow each other in one pytest session.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file

from skipdiff.runfolder import read_stats

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_scripts" / "train_unet.py"
ACCELERATE_CONFIG = REPO / "accelerate_config.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")

TINY_ARGS = [
    "--model",
    "tiny",
    "--vae",
    "none",
    "--resolution",
    "8",
    "--train_batch_size",
    "16",
    "--max_train_steps",
    "4",
    "--num_validation_images",
    "4",
    "--validation_inference_steps",
    "2",
    "--report_to",
    "none",
    "--log_every",
    "1",
    "--num_threads",
    "1",
    "--checkpointing_steps",
    "0",
]
# With an EMA (the default), unet/ holds the EMA weights (what samplers load) and unet_raw/ the raw ones.
UNET_WEIGHTS = "unet_raw/diffusion_pytorch_model.safetensors"
EMA_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def tiny_args(output_dir: str | Path, *extra: str) -> list[str]:
    """The tiny run's options writing to ``output_dir``; later options in ``extra`` override earlier ones."""
    return [*TINY_ARGS, "--output_dir", str(output_dir), *extra]


def train_unet_module() -> ModuleType:
    """The training loop's module (``train_scripts/train_unet.py`` is its thin command line)."""
    from skipdiff.training import unet_trainer

    return unet_trainer


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (mixed precision, gradient state...)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_train_unet(argv: list[str]) -> dict:
    """The training of ``train_scripts/train_unet.py``'s command line ``argv``, in this process (exceptions
    raised, not printed); returns its metrics."""
    from skipdiff.config import parse_args
    from skipdiff.training.options import TrainOptions

    reset_accelerate_state()
    try:
        return train_unet_module().train_unet(parse_args(TrainOptions, argv))
    finally:
        reset_accelerate_state()


def stats(output_dir: str | Path) -> list[dict]:
    return read_stats(Path(output_dir) / "stats.jsonl")


def loss_records(output_dir: str | Path) -> list[dict]:
    """The per-step training records (those with a loss) of a run's ``stats.jsonl``."""
    return [r for r in stats(output_dir) if "loss" in r]


def tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys and shapes."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        if a[key].numel():
            worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    return worst


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
