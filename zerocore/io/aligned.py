"""Page-aligned, optionally page-locked host tensors."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ._native import lib

Shape = Union[int, Sequence[int], torch.Size]


def _shape_of(nbytes_or_shape: Shape, dtype: torch.dtype):
    if isinstance(nbytes_or_shape, int):
        itemsize = torch.empty((), dtype=dtype).element_size()
        if nbytes_or_shape < 0 or nbytes_or_shape % itemsize:
            raise ValueError(f"aligned_empty: {nbytes_or_shape} bytes is not a non-negative multiple of {dtype}'s "
                             f"{itemsize}-byte elements; pass a shape instead")
        return (nbytes_or_shape // itemsize,)
    shape = tuple(int(d) for d in nbytes_or_shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"aligned_empty: negative dimension in shape {shape}")
    return shape


def cuda_usable() -> bool:
    return torch.cuda.is_available()


def aligned_empty(nbytes_or_shape: Shape, dtype: torch.dtype = torch.uint8, pin: bool = True) -> torch.Tensor:
    """An uninitialised CPU tensor whose data starts on a page boundary, sized exactly (rounded up to whole
    pages only, unlike torch's pinned caching allocator, which rounds up to a power of two).

    nbytes_or_shape: an int is a byte count (a multiple of dtype's size) giving a 1-D tensor; a sequence is a
    shape. pin=True page-locks the memory (cudaHostRegister) when CUDA is available, so copies to and from the
    GPU can be asynchronous; without CUDA it is ignored. The memory (and its page-locking) is released when the
    tensor's storage dies, views included. Page-aligned memory lets `AsyncIO` use O_DIRECT without a bounce copy.

    >>> import torch
    >>> from zerocore.io import aligned_empty
    >>> t = aligned_empty((3, 5), dtype=torch.float32)
    >>> t.shape, t.data_ptr() % 4096
    (torch.Size([3, 5]), 0)
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"aligned_empty: dtype must be a torch.dtype, got {dtype!r}")
    shape = _shape_of(nbytes_or_shape, dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    pin = bool(pin) and cuda_usable()
    if pin:
        torch.cuda.init()  # the runtime needs a context before cudaHostRegister
    raw = lib().aligned_bytes(nbytes, pin)
    return raw.view(dtype).view(shape)
