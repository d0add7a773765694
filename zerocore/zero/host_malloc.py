"""glibc's mmap threshold for host training: return freed gradient-sized blocks to the OS.

Why: on a CPU model autograd allocates every large weight gradient (e.g. 16 MiB for Linear(1024, 4096)) with
malloc. Once glibc's *dynamic* mmap threshold has risen above that size, these blocks come from the heap; the
engine frees each one in its gradient hook at once, but the next layer's small temporaries land in the hole, the
next gradient no longer fits, and the heap grows by one gradient per layer during the first backward. The freed
pages stay resident (measured: ~90 MiB of a 67M-param MLP's peak RSS, bench/results/zero.md).

Pinning the threshold just below the biggest gradient makes glibc mmap exactly those blocks (and munmap them on
free), while every smaller allocation stays on the heap. It is a process-wide setting (mallopt disables glibc's
dynamic threshold for the whole process), so ZeroOptimizer applies it only through its explicit
`host_mmap_threshold` option (off by default) and reports what it did in memory_report(). Its cost: every
gradient-sized block is a fresh mapping, page-faulted in on first touch (measured +10-40 % step time for the
bench MLP on this 2-core VM), so it trades speed for ~90 MiB of peak RSS.

>>> choose_threshold(largest_grad_bytes=16 << 20)
8388608
>>> choose_threshold(largest_grad_bytes=1 << 20) is None     # small models: leave malloc alone
True
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

_M_MMAP_THRESHOLD = -3          # glibc malloc.h
_MIN_THRESHOLD = 1 << 20        # below this, page faults on ordinary temporaries would cost speed
_MAX_THRESHOLD = 32 << 20       # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def choose_threshold(largest_grad_bytes: int) -> Optional[int]:
    """The "auto" threshold: half the biggest gradient, if that is at least 1 MiB; else None (change nothing)."""
    value = min(largest_grad_bytes // 2, _MAX_THRESHOLD)
    return value if value >= _MIN_THRESHOLD else None


def set_mmap_threshold(nbytes: int) -> bool:
    """Pin glibc's mmap threshold at `nbytes` for this process. Returns False where malloc is not glibc's."""
    if not 0 < nbytes <= _MAX_THRESHOLD:
        raise ValueError(f"host_mmap_threshold={nbytes} must be in 1..{_MAX_THRESHOLD} bytes "
                         "(glibc's limit), or None to leave malloc alone")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version        # only glibc has this symbol (and mallopt's M_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)) != 1:
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed; pass host_mmap_threshold=None to "
                           "leave malloc alone")
    return True
