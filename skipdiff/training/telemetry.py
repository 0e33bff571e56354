"""What a skip-connection study logs: loss by timestep, gradient norms per block, gate states.

Records go to ``stats.jsonl`` (append-only, one JSON object per line; see :mod:`skipdiff.runfolder`) and
to the Accelerate trackers. Gradient groups follow the UNet's blocks from input to output:
``conv_in``, ``down_blocks.i``, ``mid_block``, ``up_blocks.i``, ``conv_out``, plus ``gates``.

Per-step bookkeeping stays on the device (:class:`WindowStats`): the loop adds each step's losses,
timesteps and finiteness to device tensors and reads them to the host once per logging step, so a step
that does not log never waits for the device (on a GPU, such a read costs more than a small model's step).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..runfolder import STATS_FILE, append_record, truncate_stats


def timestep_buckets(timesteps: torch.Tensor, num_train_timesteps: int, buckets: int) -> torch.Tensor:
    """Bucket index of each timestep: equal-width buckets over [0, num_train_timesteps)."""
    return (timesteps.long() * buckets // num_train_timesteps).clamp_(0, buckets - 1)


def bucket_labels(buckets: int, num_train_timesteps: int) -> list[str]:
    """``["t000-249", ...]``: the name of each bucket in the logs."""
    width = num_train_timesteps / buckets
    return [f"t{int(b * width):03d}-{int((b + 1) * width) - 1:03d}" for b in range(buckets)]


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class WindowStats:
    """Sums since the last log record, kept on the device; :meth:`read` brings them to the host.

    ``add`` takes a step's per-example losses and timesteps and whether the step counted (``finite``, a
    0-d bool tensor): only finite steps enter the loss sums. Non-finite steps are counted in total, in the
    window, and as the current and the longest run in a row. With several processes :meth:`read`
    all-reduces the sums first, so the logged loss is the global batch's.
    """

    def __init__(self, buckets: int, num_train_timesteps: int, device: torch.device):
        self.buckets, self.num_train_timesteps = buckets, num_train_timesteps
        self.device = torch.device(device)
        dtype = _accumulator_dtype(self.device)
        self.sums = torch.zeros(buckets, dtype=dtype, device=self.device)
        self.counts = torch.zeros(buckets, dtype=dtype, device=self.device)
        self.finite_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.nonfinite_total = torch.zeros((), dtype=torch.long, device=self.device)
        self.nonfinite_window = torch.zeros((), dtype=torch.long, device=self.device)
        self.in_row = torch.zeros((), dtype=torch.long, device=self.device)
        self.longest_in_row = torch.zeros((), dtype=torch.long, device=self.device)
        self.step_sums: list[torch.Tensor] = []  # per step of the window: [loss sum, count] (device tensors)

    def add(self, losses: torch.Tensor, timesteps: torch.Tensor, finite: torch.Tensor) -> None:
        weight = finite.to(self.sums.dtype)
        index = timestep_buckets(timesteps, self.num_train_timesteps, self.buckets)
        # A non-finite loss times a zero weight is still NaN: replace it before summing.
        values = torch.nan_to_num(losses.detach().to(self.sums.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        self.sums.index_add_(0, index, values * weight)
        self.counts.index_add_(0, index, weight.expand(index.shape[0]))
        self.step_sums.append(torch.stack([values.sum() * weight, weight * index.shape[0]]))
        bad = (~finite).long()
        self.finite_steps += 1 - bad
        self.nonfinite_total += bad
        self.nonfinite_window += bad
        self.in_row.mul_(bad).add_(bad)
        torch.maximum(self.longest_in_row, self.in_row, out=self.longest_in_row)

    def read(self, accelerator=None) -> dict:
        """The window's figures on the host (one device read), then the window restarts.

        Returns ``loss`` (mean over the finite steps' examples, None if none), ``loss_by_timestep``,
        ``step_losses`` (each step's mean loss over the global batch, None for a skipped step: spikes are
        counted on these, not on window means), ``finite_steps``, ``nonfinite_total``, ``nonfinite_window``,
        ``in_row`` and ``longest_in_row``."""
        steps = (
            torch.stack(self.step_sums)
            if self.step_sums
            else torch.zeros(0, 2, dtype=self.sums.dtype, device=self.device)
        )
        packed = torch.cat([self.sums, self.counts, steps.flatten()])
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, "sum")
        host = packed.tolist()
        ints = torch.stack(
            [self.finite_steps, self.nonfinite_total, self.nonfinite_window, self.in_row, self.longest_in_row]
        ).tolist()
        sums_h, counts_h = host[: self.buckets], host[self.buckets : 2 * self.buckets]
        per_step = host[2 * self.buckets :]
        total = sum(counts_h)
        labels = bucket_labels(self.buckets, self.num_train_timesteps)
        out = {
            "loss": sum(sums_h) / total if total > 0 else None,
            "loss_by_timestep": {
                name: (s / c if c > 0 else None) for name, s, c in zip(labels, sums_h, counts_h, strict=True)
            },
            "step_losses": [s / c if c > 0 else None for s, c in zip(per_step[0::2], per_step[1::2], strict=True)],
            "finite_steps": ints[0],
            "nonfinite_total": ints[1],
            "nonfinite_window": ints[2],
            "in_row": ints[3],
            "longest_in_row": ints[4],
        }
        self.sums.zero_()
        self.counts.zero_()
        self.step_sums = []
        self.finite_steps.zero_()
        self.nonfinite_window.zero_()
        self.longest_in_row.copy_(self.in_row)
        return out


class StatsWriter:
    """Append-only JSONL log in the run folder (main process only) plus the trackers."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, filename: str = STATS_FILE):
        self.accelerator = accelerator
        self.path = Path(output_dir) / filename

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run logs the steps after its checkpoint again)."""
        if self.accelerator.is_main_process:
            truncate_stats(self.path, step)

    def write(self, record: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        append_record(self.path, {"step": step, **record})
        scalars = {k: v for k, v in flatten(record).items() if isinstance(v, int | float) and math.isfinite(v)}
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
