"""keep_freed_memory: large host allocations come from malloc's heap, not a fresh mmap per allocation."""

import subprocess
import sys

import pytest

from zeropad.train.host_alloc import _libc

# mallinfo2's hblkhd: bytes held in mmap'd chunks; run in a child so this worker's allocator stays as it was
_PROBE = """
import ctypes, sys
import torch
from zeropad.train.host_alloc import _libc, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = _libc()
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2()
buffer = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MB: past glibc's largest mmap threshold
during = libc.mallinfo2()
del buffer
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, after.arena + after.hblkhd - during.arena - during.hblkhd)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    mapped, returned = map(int, out.split())
    return mapped, returned


@pytest.mark.skipif(_libc() is None or not hasattr(_libc(), "mallinfo2"), reason="glibc >= 2.33 only")
def test_large_buffers_stay_in_the_heap():
    mapped, returned = _probe("default")
    assert mapped >= 64 << 20 and returned <= -(64 << 20)  # control: glibc maps it, and unmaps it on free
    mapped, returned = _probe("keep")
    assert mapped == 0 and returned == 0  # from the heap, and kept there after the free
