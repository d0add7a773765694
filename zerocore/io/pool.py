"""A pool of aligned (pinned) host buffers, reused by exact byte size."""
from __future__ import annotations

import contextlib
import math
import threading
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from .aligned import Shape, _shape_of, aligned_empty


class BufferPool:
    """Hands out page-aligned (and, with pin=True and CUDA, page-locked) tensors and takes them back for reuse,
    so steady-state swapping allocates and pins nothing. Buffers are matched by exact byte size.

    max_bytes bounds the memory the pool holds (idle plus handed out): asking beyond it raises MemoryError
    naming the numbers, instead of letting pinned memory exhaust host RAM.

    >>> import torch
    >>> from zerocore.io import BufferPool
    >>> pool = BufferPool(pin=False, max_bytes=1 << 20)
    >>> with pool.borrow((256,), torch.float32) as buf:
    ...     buf.shape
    torch.Size([256])
    >>> pool.idle_bytes
    1024
    """

    def __init__(self, pin: bool = True, max_bytes: Optional[int] = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"BufferPool: max_bytes must be >= 0 or None, got {max_bytes}")
        self.pin = pin
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._idle: Dict[int, List[torch.Tensor]] = defaultdict(list)  # nbytes -> uint8 base tensors
        self._out: Dict[int, torch.Tensor] = {}  # data_ptr -> base tensor handed out
        self.idle_bytes = 0
        self.used_bytes = 0

    def get(self, nbytes_or_shape: Shape, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """An aligned tensor of that shape (or byte count) and dtype; contents are arbitrary."""
        shape = _shape_of(nbytes_or_shape, dtype)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            idle = self._idle.get(nbytes)
            if idle:
                base = idle.pop()
                self.idle_bytes -= nbytes
            else:
                held = self.idle_bytes + self.used_bytes
                if self.max_bytes is not None and held + nbytes > self.max_bytes:
                    # Idle buffers of other sizes are dropped before giving up.
                    self._drop_idle_locked()
                    if self.used_bytes + nbytes > self.max_bytes:
                        raise MemoryError(
                            f"BufferPool: {nbytes} more bytes would exceed max_bytes={self.max_bytes} "
                            f"({self.used_bytes} bytes handed out): return buffers with put() or raise max_bytes")
                base = None
            self.used_bytes += nbytes
        if base is None:
            try:
                base = aligned_empty(nbytes, torch.uint8, pin=self.pin)
            except BaseException:
                with self._lock:
                    self.used_bytes -= nbytes
                raise
        with self._lock:
            self._out[base.data_ptr()] = base
        return base.view(dtype).view(shape)

    def put(self, tensor: torch.Tensor) -> None:
        """Returns a tensor from get() (any view starting at its first byte) to the pool."""
        with self._lock:
            base = self._out.pop(tensor.data_ptr(), None)
            if base is None:
                raise ValueError("BufferPool.put: this tensor was not handed out by this pool (or was returned "
                                 "already)")
            nbytes = base.numel()
            self.used_bytes -= nbytes
            self._idle[nbytes].append(base)
            self.idle_bytes += nbytes

    @contextlib.contextmanager
    def borrow(self, nbytes_or_shape: Shape, dtype: torch.dtype = torch.uint8):
        """`with pool.borrow(shape, dtype) as t:` gets a buffer and puts it back afterwards."""
        t = self.get(nbytes_or_shape, dtype)
        try:
            yield t
        finally:
            self.put(t)

    def clear(self) -> None:
        """Frees every idle buffer (handed-out ones are freed when their tensors die)."""
        with self._lock:
            self._drop_idle_locked()

    def _drop_idle_locked(self) -> None:
        self._idle.clear()
        self.idle_bytes = 0
