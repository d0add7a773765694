"""Python face of the host block cache: torch's CPU allocator with large blocks reused by size.

Why (csrc/memory/block_cache.h has the details): CPU training allocates the same large blocks every step,
above all autograd's weight gradients. glibc serves them either from its heap, which they fragment (the freed
holes stay resident: ~90 MiB per rank for the bench MLP), or from fresh mmaps, faulted in again every step
(+10-40 % step time). The cache keeps freed blocks mapped and hands them back for the next request of the same
size, bounded by the recent peak of blocks in use at once, so steady-state steps fault no pages and the
resident size stays at what is really in use.

`install(min_block_bytes)` makes it the process's CPU allocator for requests of that size and more (smaller ones
go to torch's allocator, untouched); `uninstall()` stops serving: every request goes to torch's allocator again
and the cached blocks are unmapped. (The allocator object itself stays registered, passing requests through,
because code such as oneDNN frees raw allocations through whichever CPU allocator is current.) ZeroOptimizer
installs it for models that live on the host (option `host_block_cache`) and ends a window at every step, which
returns blocks that nobody asked for during the last step.

>>> import torch
>>> from zerocore.ops import host_cache
>>> host_cache.install(min_block_bytes=1 << 20)
True
>>> a = torch.empty(1 << 20); del a          # 4 MiB: mapped once ...
>>> b = torch.empty(1 << 20)                 # ... and reused
>>> host_cache.stats()["hits"] >= 1
True
>>> del b; host_cache.uninstall(); host_cache.installed()
False
"""
from __future__ import annotations

from typing import Dict

from .builder import load


def _native():
    return load("host_cache")


def install(min_block_bytes: int = 1 << 20) -> bool:
    """Serve CPU allocations of `min_block_bytes` and more from the cache. False if another allocator that was
    registered with a higher priority keeps the place (nothing changes then)."""
    if min_block_bytes < 4096:
        raise ValueError(f"min_block_bytes={min_block_bytes}: blocks are whole pages, use 1 MiB (1 << 20) or more")
    return _native().install(int(min_block_bytes))


def uninstall() -> None:
    """Stop serving: every request goes to torch's allocator again; cached blocks are unmapped (live tensors keep
    theirs until they are freed)."""
    _native().uninstall()


def installed() -> bool:
    """Whether large CPU allocations are being served by the cache now."""
    return _native().installed()


def stats() -> Dict[str, int]:
    """live_bytes, cached_bytes, peak_live_bytes, hits, misses, unmaps, unmap_failures."""
    return dict(_native().stats())


def start_window() -> None:
    """End a window (the engine: one optimizer step): unmap cached blocks nobody asked for during it."""
    _native().start_window()


def empty_cache() -> None:
    """Unmap every cached block (like torch.cuda.empty_cache for the host)."""
    _native().empty_cache()


def reset_peak() -> None:
    _native().reset_peak()
