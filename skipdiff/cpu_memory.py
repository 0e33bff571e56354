"""Keep freed memory in the process on glibc, so that a CPU training step does not fault its memory back in.

A training step allocates its activations, frees them all at the end of the backward pass, and allocates
them again in the next step. glibc's malloc hands memory back to the kernel when the free space at the top
of its heap grows past ``M_TRIM_THRESHOLD`` and serves blocks above ``M_MMAP_THRESHOLD`` with fresh ``mmap``
calls; both thresholds start low (128 KiB) and only adapt as far as the process's history happens to push
them. Memory handed back is page-faulted and zeroed again on the next step, so the same forward pass runs
at a speed that depends on what else the process allocated before: inside skipdiff's training loop the
default model's forward ran slower than in the bare step's plain loop, with the same model, inputs,
layout, threads and grad mode, and as fast with the thresholds raised (``bench/train_loop.py`` with and
without ``--default_malloc``; docs/performance.md gives the ratios). PyTorch's CPU
performance guide swaps in jemalloc or tcmalloc for the same reason; raising glibc's thresholds is the
equivalent that needs no install.

The cost: the process keeps up to ``TRIM_THRESHOLD`` of freed heap resident instead of returning it. The
trainers call :func:`keep_freed_memory_for_cpu_training`, which leaves the host allocator of a CUDA machine as
it is (there the activations live in CUDA's own caching allocator).
"""

from __future__ import annotations

import ctypes
import platform

import torch

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap in the process
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: blocks under 32 MiB come from the reusable heap


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True when both were set, False where the C
    library is not glibc (macOS, Windows, musl), which is left as it is."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def keep_freed_memory_for_cpu_training() -> bool:
    """:func:`keep_freed_memory` when training runs on the CPU (no CUDA GPU); False, and nothing set, otherwise."""
    return not torch.cuda.is_available() and keep_freed_memory()
