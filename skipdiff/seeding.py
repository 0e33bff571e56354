"""Random numbers that do not depend on how a run is split over processes or interrupted.

* :func:`rank_share`: each data-parallel process draws the whole global batch's random numbers from a
  generator every process seeds alike and keeps its own slice, so N processes consume the same numbers,
  example for example, as one process with the global batch (noise, timesteps, gate states).
* :func:`uniform`: ``torch.rand`` that also compiles with a dynamic batch size.
* :func:`derived_seed`: a seed for one (epoch or step, stream) of a run, so that a resumed run replays
  the same data order and gate draws without having saved a generator's state.
* :func:`rng_untouched`: a block (such as the VAE stage inside a diffusion run) that leaves the global
  random states as it found them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(world size, rank) of ``torch.distributed``; (1, 0) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def rank_share(draw, batch_size: int):
    """This process's rows of a draw made for the whole data-parallel batch.

    ``draw(n)`` makes n rows from a generator that every process seeds alike; each process draws all
    ``world_size * batch_size`` rows and keeps its own slice.
    """
    size, rank = world()
    if size == 1:
        return draw(batch_size)
    return draw(size * batch_size)[rank * batch_size : (rank + 1) * batch_size]


def uniform(rows, columns: int, generator=None, device=None):
    """``torch.rand(rows, columns)`` from ``generator`` (the global RNG when None).

    The generator argument is left out when there is none: ``torch.rand(n, k, generator=None)`` takes
    its generator overload, which accepts no symbolic sizes, and fails under ``torch.compile`` with a
    dynamic batch size."""
    if generator is None:
        return torch.rand(rows, columns, device=device)
    return torch.rand(rows, columns, generator=generator, device=device)


def derived_seed(seed: int, index: int, stream: int) -> int:
    """A seed for one epoch's data order (stream 0) or one step's draws (stream 1).

    Everything random after the weight init is a function of (seed, epoch or step, stream), so a resumed
    run replays the same draws; different seeds never share a stream. Every process seeds alike and keeps
    its slice of the global batch's draws (:func:`rank_share`).
    """
    return ((seed * 1_000_003 + index) * 4099 + stream) % (2**63)


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Run the block, then put back the global random states it found: Python's, NumPy's and torch's (CPU
    and every CUDA device), the ones ``accelerate.utils.set_seed`` seeds.

    A diffusion run with ``--vae auto`` trains the VAE stage (which seeds and draws) only when its folder
    does not exist yet; without this the UNet's initial weights would depend on whether this run or an
    earlier one trained it.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
