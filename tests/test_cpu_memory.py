"""The CPU training processes keep freed memory (glibc's trim and mmap thresholds raised): checked by its
effect on the process's resident memory, in fresh subprocesses where nothing else moved the thresholds."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Allocate and touch 16 MiB with malloc, free it, and print how much of it is still resident.
PROBE = """
import ctypes, os, sys
from skipdiff.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * page
size = 16 << 20
before = resident()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
print((resident() - before) / size)
"""


def _kept_fraction(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(result.stdout)


def test_freed_memory_stays_in_the_process_only_with_the_thresholds_raised():
    assert _kept_fraction("default") < 0.5  # glibc's default: a 16 MiB block is an mmap, returned on free
    assert _kept_fraction("keep") > 0.9  # raised: it comes from the heap and stays for the next step


def test_the_trainers_raise_the_thresholds_on_a_cpu(monkeypatch):
    from skipdiff import cpu_memory
    from skipdiff.training import runtime
    from skipdiff.training.options import TrainOptions

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append("cpu") or True)
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    runtime.setup_backends(TrainOptions())
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    runtime.setup_backends(TrainOptions())  # on a GPU machine the host allocator is left as it is
    assert calls == ["cpu"]
