"""Cross-rank check that every rank is about to shard the same model the same way.

Every rank contributes a description (parameter names, shapes, dtypes, requires_grad, group, plus engine
options); all ranks receive all descriptions through one all_gather_object, so all of them reach the same
verdict and raise the same error naming the first difference: nobody is left waiting in a later collective.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch.distributed as dist


class RankMismatchError(RuntimeError):
    """Ranks disagree about the model or the engine options (raised on every rank)."""


def describe(named_params: Sequence[Tuple[str, object]], groups: Sequence[int], options: dict) -> dict:
    return {"options": dict(options),
            "params": [(n, tuple(p.shape), str(p.dtype), bool(p.requires_grad), int(g))
                       for (n, p), g in zip(named_params, groups)]}


def first_difference(a: dict, b: dict) -> str:
    """A sentence naming the first difference between two descriptions, or "" when they are equal."""
    for k in sorted(set(a["options"]) | set(b["options"])):
        if a["options"].get(k) != b["options"].get(k):
            return f"option {k!r}: {a['options'].get(k)!r} vs {b['options'].get(k)!r}"
    pa, pb = a["params"], b["params"]
    for i, (x, y) in enumerate(zip(pa, pb)):
        if x != y:
            fields_ = ("name", "shape", "dtype", "requires_grad", "param group")
            which = next(f for f, u, v in zip(fields_, x, y) if u != v)
            return f"parameter #{i} ({x[0]!r} vs {y[0]!r}): {which} {x[fields_.index(which)]!r} vs " \
                   f"{y[fields_.index(which)]!r}"
    if len(pa) != len(pb):
        extra = (pa if len(pa) > len(pb) else pb)[min(len(pa), len(pb))]
        return f"number of parameters: {len(pa)} vs {len(pb)} (first extra: {extra[0]!r})"
    return ""


def check_ranks_agree(description: dict, group=None) -> None:
    """Raise RankMismatchError on every rank if any rank's description differs from rank 0's."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    everyone: List[dict] = [None] * world
    dist.all_gather_object(everyone, description, group=group)
    for r in range(1, world):
        diff = first_difference(everyone[0], everyone[r])
        if diff:
            raise RankMismatchError(
                f"zerocore ZeroOptimizer: rank {r} differs from rank 0 in {diff}. Every rank must build the same "
                "model (same parameter names, shapes, dtypes, requires_grad and param groups) and pass the same "
                "options before constructing ZeroOptimizer.")
