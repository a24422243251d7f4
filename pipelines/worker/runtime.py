"""Process-level runtime settings for training processes (the driver's local loop, Ray workers, benches)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def tune_malloc() -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    The EBM step allocates and frees several (B, 1+M, hidden) activations (67 MB each for the image
    head at M = 1024) every step. By default glibc serves blocks that large with fresh mmap'd pages,
    and the page faults that zero them cost about as much as the matmuls (measured: fwd+bwd of the
    head's joint layer 199 ms -> 108 ms). Returns whether the settings were applied (glibc only).
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
              and libc.mallopt(_M_TOP_PAD, 512 << 20) == 1)
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
