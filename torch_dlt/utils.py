"""Process settings that make CPU training loops faster.

Large CPU tensors come from the C library's ``malloc``. glibc's defaults hand large freed blocks
back to the operating system (blocks served by ``mmap``, and free memory beyond the trim
threshold at the top of the heap), so the next tensor of that size is mapped afresh and every
one of its pages is faulted in and zeroed by the kernel on first touch: a pass over memory that
costs as much as a few elementwise operations. A loop that allocates large tensors each step,
such as CROWN-IBP training (A-matrices of tens of megabytes), pays it every step; jemalloc and
tcmalloc (``LD_PRELOAD``) keep freed memory, and :func:`retain_freed_memory` makes glibc do so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Keep memory freed by CPU tensors in the process for reuse (glibc's ``malloc`` only).

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap instead of fresh ``mmap`` s) and
    ``M_TRIM_THRESHOLD = trim_threshold`` (that much free memory may stay at the top of the heap
    instead of being returned to the system). A training step that allocates the same large
    tensors every time then reuses them without page faults; in exchange the process keeps its
    peak memory instead of shrinking after it. The setting is process-wide and lasts until the
    process ends; it changes no numerical result.

    Args:
        trim_threshold (int): bytes of free memory the heap may keep; positive.

    Returns:
        bool: whether the setting was applied (False, and nothing changed, where the C library
        is not glibc, e.g. macOS, Windows or musl).

    Example:
        >>> isinstance(retain_freed_memory(), bool)
        True
    """
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int):
        raise TypeError(
            "retain_freed_memory: trim_threshold must be an int, got "
            f"{type(trim_threshold).__name__}"
        )
    if not 0 < trim_threshold < 2**31:
        raise ValueError(
            "retain_freed_memory: trim_threshold must be in [1, 2**31 - 1] bytes, got "
            f"{trim_threshold}"
        )
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc's settings only
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
