"""Reduction buckets: unit-sized host or device buffers, pooled so steady-state steps allocate none.

A bucket holds a unit's gradients packed back to back (cast and pre-divided by N) for one collective. Host
buckets of 1 MiB and more live on mmaps of their own (host_buffer) and are kept by a BucketPool of same-sized
slabs, as many as backward can have live at once.
"""
from __future__ import annotations

import mmap
from typing import Dict, List, Optional

import torch


def host_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor on its own anonymous mmap, outside glibc's heap.

    Why: a multi-MB torch.empty is mmapped by glibc, and freeing it raises glibc's *dynamic* mmap threshold to
    its size; from then on every gradient and bucket of that size comes from the heap, where gradients (e.g.
    16 MiB) and buckets (e.g. 16.8 MiB) of different sizes fragment it and the freed holes stay resident
    (~90 MiB per rank in bench/results/zero.md). Buffers of our own never touch that threshold, and are
    returned to the OS as soon as they are dropped.
    """
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=numel)


class BucketPool:
    """Reuses freed unit buckets so steady-state steps neither allocate nor fault pages.

    With `slab_numel` every request of up to that many elements is served by a view of one same-sized slab
    (the biggest unit), so units of different sizes share slabs and the pool never holds more than
    max_free_bytes // slab bytes of them. Host slabs of 1 MiB and more live on their own mmap (host_buffer).
    Without `slab_numel`, buffers are kept per exact (numel, dtype, device).
    """

    def __init__(self, max_free_bytes: int, slab_numel: Optional[int] = None):
        self.max_free_bytes = max_free_bytes
        self.slab_numel = slab_numel
        self.free: Dict[tuple, List[torch.Tensor]] = {}
        self.free_bytes = 0
        self.base_of: Dict[int, torch.Tensor] = {}    # data_ptr of a handed-out view -> its slab

    def _alloc(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type == "cpu" and numel * torch.empty((), dtype=dtype).element_size() >= (1 << 20):
            return host_buffer(numel, dtype)
        return torch.empty(numel, dtype=dtype, device=device)

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = self.slab_numel if self.slab_numel is not None and numel <= self.slab_numel else numel
        lst = self.free.get((size, dtype, device))
        if lst:
            t = lst.pop()
            self.free_bytes -= t.numel() * t.element_size()
        else:
            t = self._alloc(size, dtype, device)
        if size == numel:
            return t
        view = t[:numel]
        self.base_of[view.data_ptr()] = t
        return view

    def put(self, t: torch.Tensor) -> None:
        t = self.base_of.pop(t.data_ptr(), t)
        nbytes = t.numel() * t.element_size()
        if self.free_bytes + nbytes <= self.max_free_bytes:
            self.free.setdefault((t.numel(), t.dtype, t.device), []).append(t)
            self.free_bytes += nbytes

    def clear(self) -> None:
        self.free.clear()
        self.base_of.clear()
        self.free_bytes = 0
