"""Fake kernels for zerocore's tensor ops, so meta tensors, FakeTensor (torch.compile's tracing) and
`torch.library.opcheck`'s fake-tensor test work.

Every tensor op of zerocore (adam_step, pack, unpack) writes its results into tensors it was given and returns
nothing, so its fake kernel has no shape to compute: it returns None (the real kernel checks the arguments).
`ownership` (whether a tensor's storage is referenced elsewhere) reads reference counts of real storage and
has no fake: traced by torch.compile it would return a FakeTensor's counts as constants, so its only caller,
buckets.is_sole_owner, answers False while compiling. Registered once per op, when the library that defines it
is loaded (builder.load).

>>> import torch, zerocore.ops
>>> _ = zerocore.ops.load("buckets")
>>> m = torch.empty(4, device="meta")
>>> torch.ops.zerocore.pack([torch.empty(4, device="meta")], m, [0], 1.0, False)   # no data, no error
"""
from __future__ import annotations

import torch

# Library -> the ops its schema block defines (csrc/*/…_op.cpp, TORCH_LIBRARY_FRAGMENT).
OPS_OF_LIBRARY = {"cpu_adam": ("adam_step",), "buckets": ("pack", "unpack")}
_registered = set()


def _writes_in_place(*args, **kwargs) -> None:
    return None


def register(library: str) -> None:
    """Register the fake kernels of the ops `library` defines (no-op for the others, and the second time)."""
    for op in OPS_OF_LIBRARY.get(library, ()):
        if op not in _registered:
            torch.library.register_fake(f"zerocore::{op}")(_writes_in_place)
            _registered.add(op)
