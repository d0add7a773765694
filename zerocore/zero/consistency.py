"""Cross-rank check that every rank is about to shard the same model the same way, and the copy of rank 0's
parameters and buffers that makes them start from the same values (sync_module_states).

Every rank contributes a description (parameter names, shapes, dtypes, requires_grad, group, optionally a
digest of each parameter's values, plus the engine's options and hyperparameters); all ranks receive all
descriptions through one exchange bounded by comm_timeout_s, so all of them reach the same verdict and raise
the same error naming the first difference: nobody is left waiting in a later collective.
"""
from __future__ import annotations

import zlib
from typing import List, Optional, Sequence, Tuple

import torch


class RankMismatchError(RuntimeError):
    """Ranks disagree about the model, the engine options or where they are in the training loop (raised on
    every rank that can tell)."""


def value_digest(t: torch.Tensor) -> int:
    """crc32 of a tensor's bytes (to compare values across ranks without sending them)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(memoryview(data))


def describe(named_params: Sequence[Tuple[str, object]], groups: Sequence[int], options: dict,
             digests: Optional[Sequence[int]] = None) -> dict:
    params = [(n, tuple(p.shape), str(p.dtype), bool(p.requires_grad), int(g))
              for (n, p), g in zip(named_params, groups)]
    return {"options": dict(options), "params": params,
            "digests": list(digests) if digests is not None else None}


_FIELDS = ("name", "shape", "dtype", "requires_grad", "param group")


def first_difference(a: dict, b: dict) -> str:
    """A sentence naming the first difference between two descriptions, or "" when they are equal."""
    for k in sorted(set(a["options"]) | set(b["options"])):
        if a["options"].get(k) != b["options"].get(k):
            return f"option {k!r}: {a['options'].get(k)!r} vs {b['options'].get(k)!r}"
    pa, pb = a["params"], b["params"]
    for i, (x, y) in enumerate(zip(pa, pb)):
        if x != y:
            which = next(f for f, u, v in zip(_FIELDS, x, y) if u != v)
            return f"parameter #{i} ({x[0]!r} vs {y[0]!r}): {which} {x[_FIELDS.index(which)]!r} vs " \
                   f"{y[_FIELDS.index(which)]!r}"
    if len(pa) != len(pb):
        extra = (pa if len(pa) > len(pb) else pb)[min(len(pa), len(pb))]
        return f"number of parameters: {len(pa)} vs {len(pb)} (first extra: {extra[0]!r})"
    da, db = a.get("digests"), b.get("digests")
    if da is not None and db is not None:
        for (name, *_), x, y in zip(pa, da, db):
            if x != y:
                return (f"the values of {name!r} (crc32 {x:08x} vs {y:08x}); with sync_module_states=False every "
                        "rank must initialize identical weights (same seed), or leave sync_module_states=True "
                        "to copy rank 0's")
    return ""


def check_ranks_agree(description: dict, comm) -> List[dict]:
    """Raise RankMismatchError on every rank if any rank's description differs from rank 0's; returns every
    rank's description (in rank order). `comm` is the engine's Collectives (its timeout bounds the wait)."""
    everyone = comm.all_gather_object(description, "the cross-rank check of the model and options")
    for r in range(1, len(everyone)):
        diff = first_difference(everyone[0], everyone[r])
        if diff:
            raise RankMismatchError(
                f"zerocore ZeroOptimizer: rank {r} differs from rank 0 in {diff}. Every rank must build the same "
                "model (same parameter names, shapes, dtypes, requires_grad and param groups) and pass the same "
                "options and hyperparameters before constructing ZeroOptimizer.")
    return everyone


@torch.no_grad()
def broadcast_module_states(model: torch.nn.Module, comm, skip=lambda t: False) -> None:
    """Give every rank rank 0's parameters and buffers (sync_module_states, as DDP and FSDP do); tensors for
    which skip(t) is true (parameters built under ZeroInit, synchronized there and holding no values here)
    are left alone."""
    tensors = [p for p in model.parameters() if not skip(p)] + list(model.buffers())
    pending = []
    for t in tensors:
        data = t.detach()
        if data.numel() == 0 or data.device.type != comm.device.type:
            continue              # (NCCL cannot broadcast a GPU model's host buffers; they stay per rank)
        target = data if data.is_contiguous() else data.contiguous()
        pending.append((data, target, comm.broadcast(target, 0, f"rank 0's {tuple(data.shape)} parameter or buffer")))
    for data, target, p in pending:
        p.wait()
        if target is not data:
            data.copy_(target)
    # Let go of the references kept for the backend ([Note: exit] in collectives.py) now: they would keep the
    # parameters' original storage alive after materialize() moved them into the unit buffers.
    del pending, tensors
    comm.settle()
