"""The host block cache while ZeroOptimizers train models that live on the host.

Why: on a CPU model autograd allocates every large weight gradient afresh each step (16 MiB for a
Linear(1024, 4096)). With torch's allocator these come from glibc, which either keeps them on its heap, where
the next layer's small temporaries land in the freed holes so the heap grows by a gradient per layer and stays
resident (~90 MiB of a 67M-param MLP's peak, bench/results/zero.md), or mmaps and unmaps each one, faulting
it in again every step (+10-40 % step time). zerocore.ops.host_cache reuses freed large blocks by size: the
resident size stays at what is in use at once, and steady-state steps fault no pages.

The cache is a process-wide CPU allocator (like torch's CUDA caching allocator on the GPU), so it is installed
while at least one ZeroOptimizer on a host model is open (option `host_block_cache`, on by default); when the
last one closes, every request goes to torch's allocator again. Only requests of MIN_BLOCK_BYTES and more go to it; smaller ones stay with
torch's allocator. Each optimizer step ends a cache window, which unmaps blocks nobody asked for during the
last step (a one-off large temporary does not stay resident).

>>> import torch
>>> from zerocore.zero import host_memory
>>> host_memory.acquire()
True
>>> host_memory.active()
True
>>> host_memory.release(); host_memory.active()
False
"""
from __future__ import annotations

import threading
from typing import Dict, Optional

from zerocore.ops import host_cache

# Below 1 MiB glibc's heap serves tensors well (they are not page-faulted, and small blocks pack densely);
# the fragmentation this module exists for comes from multi-MB blocks.
MIN_BLOCK_BYTES = 1 << 20

_lock = threading.RLock()   # reentrant: a collected optimizer may release() from a finalizer
_users = 0


def acquire() -> bool:
    """Install the cache (first user) or join it. False if another CPU allocator with a higher priority is
    installed; nothing changes then and release() must not be called."""
    global _users
    with _lock:
        if _users == 0:
            try:
                installed = host_cache.install(MIN_BLOCK_BYTES)
            except RuntimeError as e:
                raise RuntimeError(f"{e}\nzerocore: the host block cache could not be built; pass "
                                   "host_block_cache=False to ZeroOptimizer to train with torch's allocator") from e
            if not installed:
                return False
        _users += 1
        return True


def release() -> None:
    """Leave the cache; the last user hands every request back to torch's allocator and unmaps cached blocks."""
    global _users
    with _lock:
        if _users == 0:
            raise RuntimeError("zerocore: host_memory.release() without a matching acquire()")
        _users -= 1
        if _users == 0:
            host_cache.uninstall()


def active() -> bool:
    return _users > 0


def end_step() -> None:
    """One optimizer step is one cache window."""
    host_cache.start_window()


def trim() -> None:
    """Unmap every cached (free) block: after a one-off phase such as an optimizer's construction, whose
    temporaries (a ZeroInit model's pieces, full values rebuilt one unit at a time) are not asked for again."""
    if active():
        host_cache.empty_cache()


def report() -> Optional[Dict[str, int]]:
    """The cache's counters while it is installed, else None."""
    return host_cache.stats() if active() else None
