"""Python face of the multi-tensor bucket ops (`torch.ops.zerocore.pack` / `unpack`).

The CPU library (`buckets`) defines the ops and their CPU kernels (vectorised, multi-core); the CUDA library
(`cuda_buckets`) adds one-launch CUDA kernels under the same names.

Schemas (defined in csrc/buckets/pack_op.cpp):
    pack(Tensor[] srcs, Tensor(a!) dst, int[] offsets, float scale, bool accumulate) -> ()
        for each i: dst[offsets[i] : offsets[i] + srcs[i].numel()] (=|+=) cast(srcs[i].flatten() * scale)
    unpack(Tensor src, Tensor(a!)[] dsts, int[] offsets, float scale) -> ()
        for each i: dsts[i].view(-1)[:] = cast(src[offsets[i] : offsets[i] + dsts[i].numel()] * scale)
dst/src are contiguous 1-D; srcs/dsts contiguous, any of fp32 / bf16 / fp16 (casts in any direction, the
product taken in fp32, bf16 rounded to nearest even); ranges must lie inside the flat tensor.

Exactly: pack writes `(srcs[i].float() * scale).to(dst.dtype)`, or with accumulate
`(dst_slice.float() + srcs[i].float() * scale).to(dst.dtype)` (one rounding to dst's dtype, no FMA), bit for bit
what these torch expressions give, on CPU and CUDA. The tensors of one call are processed in parallel, so pack's
destination ranges must not overlap, unpack's dsts must not share memory, and a list member may share memory with
the flat tensor only as its own slot (same address and dtype: an in-place scale). Bad input raises RuntimeError
naming the tensor and the fix. CPU: split over torch.get_num_threads() threads, SIMD level per ZEROCORE_SIMD.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .builder import load


def _ensure_loaded(device: torch.device) -> None:
    load("cuda_buckets" if device.type == "cuda" else "buckets")


def contiguous_offsets(tensors: Sequence[torch.Tensor]) -> list:
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += t.numel()
    return offsets


def pack(srcs: Sequence[torch.Tensor], dst: torch.Tensor, offsets: Optional[Sequence[int]] = None,
         scale: float = 1.0, accumulate: bool = False) -> torch.Tensor:
    """Copy (or add, with accumulate) many tensors into one flat tensor, casting and scaling; returns dst.

    >>> import torch, zerocore.ops.buckets as B
    >>> a, b = torch.randn(3), torch.randn(2, 2)
    >>> flat = B.pack([a, b], torch.empty(7, dtype=torch.bfloat16), scale=0.5)   # doctest: +SKIP
    """
    _ensure_loaded(dst.device)
    offsets = contiguous_offsets(srcs) if offsets is None else list(offsets)
    torch.ops.zerocore.pack(list(srcs), dst, offsets, float(scale), bool(accumulate))
    return dst


_FRESH_TENSOR_REFS: Optional[int] = None


def is_sole_owner(t: torch.Tensor) -> bool:
    """Whether writing into `t` in place and then freeing its memory cannot affect anything else: `t` is
    contiguous, covers all of a storage torch allocated, no other tensor (a view included) uses that storage and
    no one else holds this tensor object (e.g. a hook that kept a parameter's .grad).

    >>> import torch, zerocore.ops.buckets as B
    >>> a = torch.randn(4)
    >>> B.is_sole_owner(a), B.is_sole_owner(a[:2])
    (True, False)
    >>> v = a.view(2, 2); B.is_sole_owner(a)       # a view shares a's storage
    False
    >>> import numpy; B.is_sole_owner(torch.from_numpy(numpy.zeros(4)))   # numpy owns that memory
    False
    """
    global _FRESH_TENSOR_REFS
    if torch.compiler.is_compiling():
        # Reference counts exist only on real tensors at run time: traced, the op would read a FakeTensor's and
        # the graph would return them as constants. Unknown ownership is "not the sole owner" (callers copy).
        return False
    _ensure_loaded(torch.device("cpu"))
    if _FRESH_TENSOR_REFS is None:          # what the op call itself adds to a tensor's reference count
        _FRESH_TENSOR_REFS = torch.ops.zerocore.ownership(torch.empty(1))[0]
    tensor_refs, storage_refs, whole = torch.ops.zerocore.ownership(t)
    return whole == 1 and storage_refs == 1 and tensor_refs == _FRESH_TENSOR_REFS


def unpack(src: torch.Tensor, dsts: Sequence[torch.Tensor], offsets: Optional[Sequence[int]] = None,
           scale: float = 1.0) -> None:
    """Copy slices of one flat tensor out into many tensors, casting and scaling.

    >>> import torch, zerocore.ops.buckets as B
    >>> a, b = torch.empty(3), torch.empty(2, 2)
    >>> B.unpack(torch.randn(7), [a, b])   # doctest: +SKIP
    """
    _ensure_loaded(src.device)
    offsets = contiguous_offsets(dsts) if offsets is None else list(offsets)
    torch.ops.zerocore.unpack(src, list(dsts), offsets, float(scale))
