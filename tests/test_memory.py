"""Process memory helpers (glibc)."""

import ctypes
import sys

import pytest

from zsfw.memory import _libc, release_free_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None
                                or not hasattr(_libc(), "malloc_trim"), reason="needs glibc")


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_release_free_heap_returns_freed_small_blocks():
    """Freed heap blocks below the mmap threshold stay resident until trimmed (what tokenizing
    leaves behind); the last block stays allocated so glibc cannot just shrink the heap's top."""
    libc = _libc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(16 << 10) for _ in range(12_800)]  # 200 MB in 16 KB blocks
    for block in blocks:
        ctypes.memset(block, 1, 16 << 10)
    for block in blocks[:-1]:
        libc.free(block)
    held = _rss_mb()
    assert release_free_heap()
    assert held - _rss_mb() > 100
    libc.free(blocks[-1])
