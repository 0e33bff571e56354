"""What a skip-connection study logs: loss by timestep, gradient norms per block, gate states.

Records go to ``stats.jsonl`` (append-only, one JSON object per line) and to the Accelerate
tracker (tensorboard). Gradient groups follow the UNet's blocks from input to output:
``conv_in``, ``down_blocks.i``, ``mid_block``, ``up_blocks.i``, ``conv_out``, plus ``gates``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn


def block_of(parameter_name: str) -> str:
    """The block a parameter belongs to: ``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks.0``."""
    parts = parameter_name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:2])
    if parts[0] == "skip_router":
        return "gates"
    if parts[0] in ("time_embedding", "class_embedding", "time_proj"):
        return "embedding"
    if parts[0] in ("conv_norm_out", "conv_act"):
        return "conv_out"
    return parts[0]


@torch.no_grad()
def grad_norms_by_block(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each block (parameters without a gradient are left out)."""
    squares: dict[str, float] = defaultdict(float)
    for name, param in model.named_parameters():
        if param.grad is not None:
            squares[block_of(name)] += float(param.grad.detach().float().square().sum())
    return {block: math.sqrt(total) for block, total in squares.items()}


def timestep_buckets(timesteps: torch.Tensor, num_train_timesteps: int, buckets: int) -> torch.Tensor:
    """Bucket index of each timestep: equal-width buckets over [0, num_train_timesteps)."""
    return (timesteps.long() * buckets // num_train_timesteps).clamp_(0, buckets - 1)


class LossByBucket:
    """Running sums of per-example losses by timestep bucket, between two log records."""

    def __init__(self, buckets: int, num_train_timesteps: int):
        self.buckets, self.num_train_timesteps = buckets, num_train_timesteps
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(self.buckets, dtype=torch.float64)
        self.counts = torch.zeros(self.buckets, dtype=torch.float64)

    def add(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        index = timestep_buckets(timesteps.cpu(), self.num_train_timesteps, self.buckets)
        self.sums.index_add_(0, index, losses.detach().double().cpu())
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def means(self) -> dict[str, float | None]:
        """``{"t000-249": mean, ...}``; a bucket without examples is None."""
        width = self.num_train_timesteps / self.buckets
        out = {}
        for b in range(self.buckets):
            label = f"t{int(b * width):03d}-{int((b + 1) * width) - 1:03d}"
            out[label] = float(self.sums[b] / self.counts[b]) if self.counts[b] > 0 else None
        return out


class StatsWriter:
    """Append-only JSONL log in the run folder (main process only) plus the tracker."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, filename: str = "stats.jsonl"):
        self.accelerator = accelerator
        self.path = Path(output_dir) / filename

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a run killed after its last checkpoint logged steps that the
        resumed run logs again. Rewritten to a temporary file and renamed (main process only)."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def write(self, record: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **record}, allow_nan=True) + "\n")
        scalars = {
            k: v for k, v in flatten(record).items() if isinstance(v, int | float) and math.isfinite(v)
        }
        self.accelerator.log(scalars, step=step)


def flatten(record: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def read_stats(path: str | os.PathLike) -> list[dict]:
    """Every record of a ``stats.jsonl`` (for evaluation and reports)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
