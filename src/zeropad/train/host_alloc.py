"""Training on a CPU: keep freed host memory for the next step instead of handing it back to the kernel.

glibc's malloc serves every allocation above its mmap threshold (32 MB at most) with a fresh mmap and
returns it with munmap on free, so a buffer that size pays one page fault per 4 KB page on every step:
allocating and filling a [4096, 8192] fp32 chunk of the loss (128 MB) took 60-75 ms on a 2-core VM, against
10-45 ms from memory kept, and 8 ms to fill a buffer already held. A training step allocates the same large buffers every step, so zeropad turns off malloc's mmap
path and its trimming (`mallopt`, glibc's public tuning interface; what jemalloc and tcmalloc, which
PyTorch's CPU performance guide recommends preloading, do by design). The process keeps its peak host
memory between steps, which the next step needs anyway. On issue 16's CPU configuration: 1.03-1.08x a
step, median (benchmarks/host_alloc.py). Elsewhere (no glibc: macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_ABOVE = 2**31 - 1  # mallopt takes an int: trim the heap's free top only past 2 GB


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def keep_freed_memory() -> bool:
    """Serve large host allocations from malloc's heap and keep freed memory there; True when applied."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
